"""Best mesh layouts, remat and grad accumulation for a config on N devices: memory, step time, days.

    polyglot-jax plan --config=configs/polyglot_ko_12_8b.py --devices=256 --device_kind=a100-40gb
    polyglot-jax plan --config=configs/small.py --devices=8 --device_kind=h100-80gb --json --top=0
    polyglot-jax plan --config=... --devices=256 --device_kind=a100-40gb --mesh=fsdp:8,dcn_data:32

Needs no devices: shapes come from `jax.eval_shape`. Without --json: a table of the best --top
candidates (fitting first, by step time) and the assumptions behind the figures. With --json: a
JSON list of the same candidates (`planner.Candidate.to_json`). polyglot_jax/planner.py documents
the memory and time models.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from polyglot_jax.errors import ConfigError
from polyglot_jax.hardware import DEVICE_KINDS
from polyglot_jax.partitioning import layout_text
from polyglot_jax.planner import DEFAULT_MFU, REMAT_ORDER, Candidate, Planner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/polyglot_ko_1_3b.py[:variant]."
)
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices the run has (all nodes).")
_KIND = flags.DEFINE_string("device_kind", None, f"Device kind, one of: {', '.join(DEVICE_KINDS)}.")
_JSON = flags.DEFINE_bool("json", False, "Print a JSON list of candidates instead of a table.")
_TOP = flags.DEFINE_integer("top", 10, "Candidates shown (table and JSON); 0 shows all.")
_TOKENS = flags.DEFINE_float(
    "tokens",
    None,
    "Token budget for `days` (e.g. 2.13e11); default steps x batch_size x seq_len of the config.",
)
_MFU = flags.DEFINE_float(
    "mfu",
    DEFAULT_MFU,
    "Assumed fraction of bf16 peak the executed matmuls reach (communication is modelled apart). "
    "0.4: below PaLM's 46-58 percent on TPU v4, above the 21-30 percent that paper lists for "
    "GPT-3 and Megatron-Turing NLG on GPUs.",
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Evaluate only this layout, e.g. fsdp:8,dcn_data:32 (axes data, fsdp, model, dcn_data, "
    "dcn_fsdp, dcn_model; sizes multiply to --devices).",
)
_REMAT = flags.DEFINE_list(
    "remat", None, f"Remat policies to consider (default all: {', '.join(REMAT_ORDER)})."
)
_GRAD_ACCUM = flags.DEFINE_list(
    "grad_accum", None, "Gradient-accumulation counts to consider (default every one that divides)."
)
_MEMORY_FRACTION = flags.DEFINE_float(
    "memory_fraction", None, "Share of device memory a step may use (default the kind's, 0.9)."
)
_INTER_NODE = flags.DEFINE_float(
    "inter_node_gbs",
    None,
    "Network bandwidth between nodes per device, GB/s one way (default the kind's).",
)


def _ints(name: str, values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            raise ConfigError(f"--{name}={','.join(values)}: {v!r} is not an int") from None
        if out[-1] <= 0:
            raise ConfigError(f"--{name}={','.join(values)}: {v} must be positive")
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def table(candidates: list[Candidate], planner: Planner) -> str:
    """The readable table: one row per candidate, then the assumptions."""
    header = (
        f"{'#':>3}  {'mesh':<36} {'remat':<13} {'accum':>5} {'rows':>4} {'GiB/dev':>8} "
        f"{'fits':>4} {'step s':>8} {'comp s':>8} {'comm s':>7} {'MFU':>5} "
        f"{'Btok/day':>9} {'days':>7}"
    )
    lines = [header, "-" * len(header)]
    for i, c in enumerate(candidates, 1):
        lines.append(
            f"{i:>3}  {layout_text(c.mesh):<36} {c.remat_policy:<13} {c.grad_accum:>5} "
            f"{c.rows_per_device:>4} {_gib(c.bytes_per_device):>8} {'yes' if c.fits else 'no':>4} "
            f"{c.step_time_s:>8.3g} {c.compute_s:>8.3g} {c.exposed_comm_s:>7.2g} "
            f"{c.mfu:>5.1%} {c.tokens_per_day / 1e9:>9.4g} {c.days:>7.3g}"
        )
    usable = planner.kind.usable_bytes
    lines += [
        "",
        f"GiB/dev: predicted peak bytes per device (fits: <= {_gib(usable)} GiB usable); rows: "
        "sequences per device per microbatch; comm s: exposed communication per step; MFU: model "
        "FLOPs / (step time x devices x peak).",
        "assumptions:",
        *(f"  - {a}" for a in planner.assumptions()),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if _CONFIG.value is None:
        raise ConfigError("--config is required (e.g. --config=configs/polyglot_ko_1_3b.py)")
    if _DEVICES.value is None:
        raise ConfigError("--devices is required (the run's device count, e.g. --devices=256)")
    if _DEVICES.value <= 0:
        raise ConfigError(f"--devices={_DEVICES.value} must be a positive int")
    if _KIND.value is None:
        raise ConfigError(f"--device_kind is required; known kinds: {', '.join(DEVICE_KINDS)}")
    if _TOP.value < 0:
        raise ConfigError(f"--top={_TOP.value} must be >= 0 (0 shows all)")
    inter = None if _INTER_NODE.value is None else _INTER_NODE.value * 1e9
    planner = Planner(
        _CONFIG.value,
        _DEVICES.value,
        _KIND.value,
        mfu=_MFU.value,
        tokens=_TOKENS.value,
        memory_fraction=_MEMORY_FRACTION.value,
        inter_node_bw=inter,
    )
    meshes = None if _MESH.value is None else [planner.parse_layout(_MESH.value)]
    candidates = planner.plan(
        meshes=meshes,
        policies=_REMAT.value,
        grad_accums=_ints("grad_accum", _GRAD_ACCUM.value),
    )
    shown = candidates if _TOP.value == 0 else candidates[: _TOP.value]
    if _JSON.value:
        print(json.dumps([c.to_json() for c in shown]))
        return
    print(table(shown, planner))
