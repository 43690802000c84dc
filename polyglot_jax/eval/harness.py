"""lm-evaluation-harness (0.4.13) model `polyglot_jax`: our JAX scorer and generator behind the
harness's `LM` interface, plus KoBEST tasks that read local jsonl.

lm-eval 0.4.13 discovers no external models (no entry-point group; its registry is filled by its
own `lm_eval.models` and by whatever has been imported), so `lm_eval --model polyglot_jax` works
only once this module is imported. `python -m polyglot_jax.eval.harness ARGS` does that and then
runs the harness's own CLI on ARGS:

    python -m polyglot_jax.eval.harness write_kobest_tasks --data ../shared/data/kobest --out TASKS
    python -m polyglot_jax.eval.harness run --model polyglot_jax \
        --model_args hf=DIR,dtype=float32 --include_path TASKS --tasks kobest_copa_local \
        --num_fewshot 5 --output_path results/

From Python: `import polyglot_jax.eval.harness` (registers), then
`lm_eval.simple_evaluate(model="polyglot_jax", model_args={"hf": DIR}, ...)`.

model_args: `workdir=DIR` [`step=N`] or `hf=DIR`; `dtype` (float32|bfloat16|float16, default the
checkpoint's), `batch_tokens` (rows x padded length per scoring call, 2048), `max_gen_batch` (rows
per generation call, 16), `max_gen_toks` (default generation length, 256, as HFLM), `tokenizer=DIR`
(else the model's), `prefix_token_id` (else eos), `mesh_data`/`mesh_fsdp`/`mesh_model` (the
`config.mesh` axes; default -1/1/1 = data parallel over every device; without a -1 the first
data x fsdp x model devices). The harness's own arguments (batch_size, device, ...) are ignored.

What each request type does, as the harness's HFLM does it:
- loglikelihood: a context's trailing spaces move to the continuation, whole-text ids are split
  after the context's (`kobest.encode_pair`, HFLM's `_encode_pair`); an empty context is the prefix
  token (eos) unless the continuation starts with it; then `Scorer` (left truncation to max_len).
- loglikelihood_rolling: `get_rolling_token_windows(ids, prefix, max_len, context_len=1)` made
  disjoint, summed.
- generate_until: the context left-truncated to max_len - max_gen_toks, greedy unless
  do_sample (normalised by the harness's `normalize_gen_kwargs`); generation stops at eos or at a
  token-level occurrence of an `until` string, and the decoded text (special tokens skipped) is cut
  at the first `until` string, which is what defines the result.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's lazy entries first: get_model fills them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from polyglot_jax.errors import ConfigError, InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM.max_gen_toks
# Arguments the harness passes to every model (simple_evaluate's additional_config) or that
# HFLM users commonly set; they mean nothing here.
HARNESS_ARGS = frozenset(
    {"batch_size", "max_batch_size", "device", "trust_remote_code", "parallelize", "revision"}
)
# Sampling knobs of gen_kwargs that Sampling implements (after normalize_gen_kwargs).
_GEN_KEYS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "min_new_tokens"}
)

KOBEST_TASKS = ("boolq", "copa", "hellaswag", "sentineg", "wic")
TASKS_DIR = pathlib.Path(__file__).resolve().parent / "tasks"


def _int(name: str, value: Any, low: int) -> int:
    """An int model_arg (the harness passes ints, or strings from a plain arg string)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"model_args {name}={value!r} must be an int")
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"model_args {name}={value!r} must be an int") from None
    if out < low:
        raise ConfigError(f"model_args {name}={value!r} must be >= {low}")
    return out


def _registered(cls):
    """`register_model("polyglot_jax")`, done by the importable module only: run as
    `python -m polyglot_jax.eval.harness` this file is also `__main__`, whose copy of the class
    stays unregistered (a second class under the name would be a registry collision)."""
    if __name__ == "__main__":
        return cls
    return register_model("polyglot_jax")(cls)


def _mesh(data: int, fsdp: int, model: int):
    """(mesh, rules) of config.mesh with these axes, as the CLI makes them."""
    import jax

    from polyglot_jax.config import base_config
    from polyglot_jax.partitioning import make_mesh, resolve_mesh_shape, rules_from_config

    mesh_cfg = base_config().mesh
    mesh_cfg.update(data=data, fsdp=fsdp, model=model)
    fixed = [v for v in (data, fsdp, model) if v != -1]
    devices = jax.devices()
    if -1 not in (data, fsdp, model):
        if math.prod(fixed) > len(devices):
            raise ConfigError(
                f"model_args mesh_*: {data}x{fsdp}x{model} needs more than the {len(devices)} devices"
            )
        devices = devices[: math.prod(fixed)]
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    return make_mesh(shape, devices), rules_from_config(mesh_cfg.rules)


@_registered
class PolyglotJaxLM(LM):
    """The harness's view of a polyglot_jax model (see the module docstring for model_args)."""

    def __init__(
        self,
        workdir: str | None = None,
        hf: str | None = None,
        step: int | str | None = None,
        dtype: str | None = None,
        batch_tokens: int | str = 2048,
        max_gen_batch: int | str = 16,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        tokenizer: str | None = None,
        prefix_token_id: int | str | None = None,
        mesh_data: int | str = -1,
        mesh_fsdp: int | str = 1,
        mesh_model: int | str = 1,
        **ignored: Any,
    ) -> None:
        from polyglot_jax.generate_weights import (
            load_from_hf,
            load_from_workdir,
            load_tokenizer_dir,
        )

        unknown = sorted(set(ignored) - HARNESS_ARGS)
        if unknown:
            log.warning("polyglot_jax: ignoring unknown model_args %s", ", ".join(unknown))
        if bool(workdir) == bool(hf):
            raise ConfigError("model_args: give exactly one of workdir=DIR and hf=DIR")
        if step is not None and hf:
            raise ConfigError("model_args: step selects a checkpoint of workdir; hf has none")
        mesh, rules = _mesh(
            _int("mesh_data", mesh_data, -1),
            _int("mesh_fsdp", mesh_fsdp, -1),
            _int("mesh_model", mesh_model, -1),
        )
        dtype = None if dtype in (None, "", "auto") else dtype  # HFLM's "auto": the checkpoint's
        place = {"dtype": dtype, "mesh": mesh, "rules": rules}
        if workdir:
            step = None if step is None else _int("step", step, 0)
            cfg, params, tokenizer_dir = load_from_workdir(workdir, step, **place)
        else:
            cfg, params, tokenizer_dir = load_from_hf(hf, **place)
        if tokenizer:
            tokenizer_dir = pathlib.Path(tokenizer)
        tok = load_tokenizer_dir(tokenizer_dir)
        if tok is None:
            raise ConfigError("this model has no known tokenizer: pass model_args tokenizer=DIR")
        self._setup(
            cfg, params, tok, mesh=mesh, rules=rules,
            batch_tokens=_int("batch_tokens", batch_tokens, 1),
            max_gen_batch=_int("max_gen_batch", max_gen_batch, 1),
            max_gen_toks=_int("max_gen_toks", max_gen_toks, 1),
            prefix_token_id=None if prefix_token_id is None else _int("prefix_token_id", prefix_token_id, 0),
            source=f"workdir={workdir}" if workdir else f"hf={hf}",
        )  # fmt: skip

    @classmethod
    def from_params(
        cls,
        cfg: Any,
        params: Any,
        tokenizer: Any,
        *,
        mesh: Any = None,
        rules: Sequence[tuple[str, Any]] = (),
        batch_tokens: int = 2048,
        max_gen_batch: int = 16,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        prefix_token_id: int | None = None,
    ) -> PolyglotJaxLM:
        """A model already loaded (generate_weights' config and params, a LoadedTokenizer)."""
        self = cls.__new__(cls)
        self._setup(
            cfg, params, tokenizer, mesh=mesh, rules=rules, batch_tokens=batch_tokens,
            max_gen_batch=max_gen_batch, max_gen_toks=max_gen_toks,
            prefix_token_id=prefix_token_id, source="params",
        )  # fmt: skip
        return self

    def _setup(
        self, cfg, params, tokenizer, *, mesh, rules, batch_tokens, max_gen_batch, max_gen_toks,
        prefix_token_id, source,
    ) -> None:  # fmt: skip
        from polyglot_jax.eval.loglikelihood import Scorer
        from polyglot_jax.generate import Generator

        LM.__init__(self)
        self.cfg, self.tokenizer, self.source = cfg, tokenizer, source
        self.scorer = Scorer(params, cfg, mesh=mesh, rules=rules, batch_tokens=batch_tokens)
        self.generator = Generator(params, cfg, mesh=mesh, rules=rules, batch_size=max_gen_batch)
        self.max_gen_toks = max_gen_toks
        self.eot_token_id = tokenizer.eos_id
        self.prefix_token_id = tokenizer.eos_id if prefix_token_id is None else prefix_token_id
        for name, token in (("eos", self.eot_token_id), ("prefix", self.prefix_token_id)):
            if not 0 <= token < cfg.vocab_size:
                raise ConfigError(f"{name} token id {token} is outside the model's vocabulary")

    # ------------------------------------------------------------ what the harness asks

    @property
    def max_length(self) -> int:
        return self.cfg.max_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_dtype": self.cfg.dtype}

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (HFLM's `skip_special_tokens=True`)."""
        return self.tokenizer.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a loglikelihood request, as HFLM encodes it."""
        from polyglot_jax.eval.kobest import encode_pair

        if context == "":
            ids = self.tok_encode(continuation)
            if ids and ids[0] == self.prefix_token_id:
                return ids[:1], ids[1:]
            return [self.prefix_token_id], ids
        return encode_pair(self.tok_encode, context, continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        pairs = [self.encode_request(context, continuation) for context, continuation in args]
        results = self.scorer.loglikelihood(pairs, progress=not disable_tqdm)
        for a, result in zip(args, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", a, result)
        return results

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """HFLM's disjoint windows of a document's ids (max_seq_len = max_len, context_len 1)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
            context_len=1,
        )  # fmt: skip
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        windows, owner = [], []
        for n, text in enumerate(strings):
            for window in self.rolling_windows(self.tok_encode(text)):
                windows.append(window)
                owner.append(n)
        totals = [0.0] * len(strings)
        for n, (ll, _) in zip(
            owner, self.scorer.loglikelihood(windows, progress=not disable_tqdm), strict=True
        ):
            totals[n] += ll
        for text, total in zip(strings, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for n, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(n)
        out: list[str | None] = [None] * len(args)
        for indices in groups.values():
            gen_kwargs = args[indices[0]][1]
            texts = self._generate([args[i][0] for i in indices], gen_kwargs, disable_tqdm)
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]

    def sampling(self, gen_kwargs: dict) -> tuple[Any, list[str]]:
        """(Sampling, until strings) of a request's gen_kwargs, normalised as the harness does."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from polyglot_jax.generate import Sampling

        if not isinstance(gen_kwargs, dict):
            raise InputError(f"generate_until: gen_kwargs {gen_kwargs!r} is not a dict")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tokenizer.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if int(kwargs.pop("num_beams", 1)) != 1:
            raise ConfigError("generate_until: num_beams > 1 is not supported")
        extra = sorted(set(kwargs) - _GEN_KEYS)
        if extra:
            raise ConfigError(f"generate_until: unsupported gen_kwargs {', '.join(extra)}")
        if max_gen_toks >= self.max_length:
            raise ConfigError(
                f"generate_until: max_gen_toks={max_gen_toks} leaves no room for a context in "
                f"max_len {self.max_length}"
            )
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
        # Token-level stops: the ids of each `until` string end a row early. Safe: those ids
        # decode to text containing the string, so the text cut below lands at or before them.
        stops = []
        for text in until:
            ids = tuple(self.tok_encode(text)) if text else ()
            if ids and ids != (self.eot_token_id,) and ids not in stops:
                stops.append(ids)
        sampling = Sampling(
            max_new_tokens=max_gen_toks,
            min_new_tokens=int(kwargs.get("min_new_tokens", 0)),
            greedy=not sample,
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 1.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            seed=int(kwargs.get("seed") or 0),
            eos_id=self.eot_token_id,
            stop=tuple(stops),
        )
        return sampling, until

    def _generate(self, contexts: list[str], gen_kwargs: dict, disable_tqdm: bool) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        sampling, until = self.sampling(gen_kwargs)
        window = self.max_length - sampling.max_new_tokens
        prompts = []
        for context in contexts:
            ids = self.tok_encode(context)[-window:]
            prompts.append(ids or [self.prefix_token_id])
        completions = self.generator.generate(prompts, sampling, progress=not disable_tqdm)
        return [
            postprocess_generated_text(self.tok_decode(c[0].ids), until, None) for c in completions
        ]


# ---------------------------------------------------------------- KoBEST from local files


def write_kobest_tasks(
    data_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    tasks: Sequence[str] = KOBEST_TASKS,
    suffix: str = "_local",
    cache_dir: str | pathlib.Path | None = None,
) -> list[str]:
    """Writes `kobest_<task><suffix>.yaml` for each task (and a group `kobest<suffix>`) into
    `out_dir`: the harness's kobest task (prompts, choices, metrics: our templates in
    `polyglot_jax/eval/tasks/`) reading `data_dir/<task>/{train,validation,test}.jsonl` through the
    `json` dataset builder, so `lm_eval --include_path out_dir --tasks kobest_copa_local` runs
    offline. `cache_dir`: the datasets cache for the converted splits (default: datasets'
    own). Returns the task names written."""
    data_dir = pathlib.Path(data_dir).resolve()
    out_dir = pathlib.Path(out_dir)
    names = []
    texts = {}
    for task in tasks:
        if task not in KOBEST_TASKS:
            raise ConfigError(
                f"unknown KoBEST task {task!r}; choose from {', '.join(KOBEST_TASKS)}"
            )
        files = {s: data_dir / task / f"{s}.jsonl" for s in ("train", "validation", "test")}
        if not files["test"].is_file():
            raise InputError(
                f"{files['test']} does not exist (expected KoBEST jsonl in DIR/<task>/)"
            )
        present = {s: str(p) for s, p in files.items() if p.is_file()}
        kwargs: dict[str, Any] = {"data_files": present}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(pathlib.Path(cache_dir).resolve())
        name = f"kobest_{task}{suffix}"
        lines = [
            f"# Written by polyglot_jax.eval.harness.write_kobest_tasks: lm-eval's kobest_{task}",
            f"# on {data_dir / task}.",
            f"include: {json.dumps(str(TASKS_DIR / f'kobest_{task}_template_yaml'))}",
            f"task: {name}",
            "dataset_path: json",
            f"dataset_kwargs: {json.dumps(kwargs)}",
        ]
        for split in ("train", "validation"):
            if split not in present:  # the template names it; a missing file means no such split
                lines.append(f"{'training' if split == 'train' else split}_split: null")
        texts[f"{name}.yaml"] = "\n".join(lines) + "\n"
        names.append(name)
    group = [
        "# Written by polyglot_jax.eval.harness.write_kobest_tasks: lm-eval's kobest group.",
        f"group: kobest{suffix}",
        f"task: {json.dumps(names)}",
        "aggregate_metric_list:",
        *(
            f"  - {{metric: {m}, aggregation: mean, weight_by_size: true}}"
            for m in ("acc", "acc_norm", "f1")
        ),
        "metadata:",
        "  version: 1.0",
    ]
    texts[f"_kobest{suffix}.yaml"] = "\n".join(group) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, text in texts.items():
        (out_dir / file).write_text(text, encoding="utf-8")
    return names


# ---------------------------------------------------------------- python -m polyglot_jax.eval.harness


def main(argv: Sequence[str] | None = None) -> None:
    """`write_kobest_tasks --data DIR --out DIR [--tasks a,b] [--cache_dir DIR]`, or else the
    harness's CLI (`lm_eval ...`) with `polyglot_jax` registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "write_kobest_tasks":
        import argparse

        parser = argparse.ArgumentParser(
            prog="python -m polyglot_jax.eval.harness write_kobest_tasks"
        )
        parser.add_argument("--data", required=True, help="KoBEST directory: <task>/*.jsonl")
        parser.add_argument("--out", required=True, help="Directory for the task YAMLs")
        parser.add_argument("--tasks", default=",".join(KOBEST_TASKS))
        parser.add_argument("--suffix", default="_local")
        parser.add_argument("--cache_dir", default=None)
        a = parser.parse_args(argv[1:])
        names = write_kobest_tasks(
            a.data, a.out, tasks=[t for t in a.tasks.split(",") if t], suffix=a.suffix,
            cache_dir=a.cache_dir,
        )  # fmt: skip
        print(f"wrote {', '.join(names)} (group kobest{a.suffix}) to {a.out}")
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *argv]  # the harness's CLI parses sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    from polyglot_jax.eval import harness  # the registered module (see _registered)

    harness.main()
