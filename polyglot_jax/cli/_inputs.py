"""What `generate` and `eval` share: the flags that name a model (--workdir [--step] or --hf,
--dtype, --config.mesh.*) and its loading, and the prompts file format."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from polyglot_jax.config import base_config
from polyglot_jax.errors import ConfigError, InputError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint, or --step).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_HF = flags.DEFINE_string("hf", None, "Hugging Face GPT-NeoX directory (instead of --workdir).")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Compute and weight dtype (default: the checkpoint's for --hf, the run's compute dtype for "
    "--workdir).",
)
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    ml_collections.ConfigDict({"mesh": base_config().mesh}).lock(),
    "The mesh to run on (config.mesh of configs/*.py): --config.mesh.model=2 etc.",
)


def check() -> None:
    """The source flags, before anything is loaded: one ConfigError."""
    if bool(_WORKDIR.value) == bool(_HF.value):
        raise ConfigError("give exactly one of --workdir and --hf")
    if _STEP.value is not None and _STEP.value < 0:
        raise ConfigError(f"--step={_STEP.value} must be an int >= 0")
    if _STEP.value is not None and _HF.value:
        raise ConfigError("--step selects a checkpoint of --workdir; --hf has none")


def describe() -> str:
    """The model as the flags name it (for reports)."""
    if _WORKDIR.value:
        return f"workdir={_WORKDIR.value}" + (
            f" step={_STEP.value}" if _STEP.value is not None else ""
        )
    return f"hf={_HF.value}"


def load() -> tuple[Any, Any, Any, Any, Any]:
    """(decode model config, params, tokenizer or None, mesh, rules) from the flags."""
    import jax

    from polyglot_jax.generate_weights import load_from_hf, load_from_workdir, load_tokenizer_dir
    from polyglot_jax.partitioning import make_mesh, resolve_mesh_shape, rules_from_config

    mesh = make_mesh(resolve_mesh_shape(_CONFIG.value.mesh, jax.device_count()))
    rules = rules_from_config(_CONFIG.value.mesh.rules)
    place = {"dtype": _DTYPE.value, "mesh": mesh, "rules": rules}
    if _WORKDIR.value:
        cfg, params, tokenizer_dir = load_from_workdir(_WORKDIR.value, _STEP.value, **place)
    else:
        cfg, params, tokenizer_dir = load_from_hf(_HF.value, **place)
    return cfg, params, load_tokenizer_dir(tokenizer_dir), mesh, rules


def read_prompts_file(path: str) -> list[str | list[int]]:
    """Each line's prompt: text, or a list of ids; InputError naming file:line."""
    file = pathlib.Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    prompts: list[str | list[int]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}:{n}: not a JSON object ({e})") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_ids" in obj):
            raise InputError(f'{path}:{n}: give exactly one of "prompt" and "prompt_ids"')
        value = obj.get("prompt", obj.get("prompt_ids"))
        if "prompt" in obj and not isinstance(value, str):
            raise InputError(f'{path}:{n}: "prompt" must be a string')
        if "prompt_ids" in obj and not (
            isinstance(value, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        ):
            raise InputError(f'{path}:{n}: "prompt_ids" must be a list of ints')
        prompts.append(value)
    if not prompts:
        raise InputError(f"{path}: holds no prompts")
    return prompts
