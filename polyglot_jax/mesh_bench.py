"""What a mesh layout costs: the real train step compiled per layout, read from XLA's own analyses.

    layouts = parse_meshes("data:8 fsdp:8 data:2,model:4", num_devices=8)
    result = measure(config, layouts[0])          # compile only; timed_steps > 0 also runs it
    result["bytes_per_device"], result["flops"], result["collective_bytes"]["all-reduce"]

Each layout is a mesh shape over the axes of `partitioning` (`data, fsdp, model` within a node,
`dcn_data, dcn_fsdp, dcn_model` across nodes; a missing axis is 1). The step is `train.build_step`'s
jitted train step with the config's rules, lowered on abstract (ShapeDtypeStruct) parameters,
optimizer state and a token batch, so nothing is allocated unless the step is timed.

Conventions of a result (all per device, for one optimizer step of `config.train.batch_size`):

- `bytes_per_device` = argument + output + temp - alias bytes of the compiled memory analysis: the
  state and batch the step takes, what it returns (less the donated buffers it writes in place) and
  its scratch. The breakdown is under `memory`.
- `flops`: XLA's cost analysis (kept as `flops_xla`) counts a loop body once whatever its trip
  count; `flops` adds each loop body's dots for every further run (the scanned layers, the
  grad-accumulation and loss-chunk scans). `matmul_flops` is the dots alone: 2 x output elements
  x contracted size, each counted as often as it runs.
- `collective_bytes[kind]` for all-reduce, all-gather, reduce-scatter, all-to-all: over the ops of
  that kind in the compiled HLO, each weighted by how often its computation runs, the bytes of the
  whole array the group shares (the all-reduce operand, the all-gather result, the reduce-scatter
  operand, the all-to-all operand) x (n - 1) / n for a group of n devices: what each device sends
  in a ring. Data-parallel float32 gradients of P parameters thus give 4 x P x (n - 1) / n of
  all-reduce (or as much reduce-scatter, where XLA splits the all-reduce into a reduce-scatter and
  an all-gather of the updated parameters). `collective-permute` counts
  the bytes each device sends. An async op (`*-start` / `*-done`) is counted once, at its start.
- `step_time_s`: the median of `timed_steps` runs after one warm-up (None when not timed).

How often a computation runs comes from the `known_trip_count` XLA records on each while loop (a
loop without one counts once; each branch of a conditional counts as run). The mesh is
`partitioning.make_mesh`'s, as in training (on fake CPU devices dcn axes are laid out as on GPU
nodes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from polyglot_jax.errors import ConfigError
from polyglot_jax.hlo_costs import COLLECTIVE_KINDS, collective_bytes, matmul_flops
from polyglot_jax.partitioning import (
    AXES,
    LAYOUTS_LISTED,
    full_layout,
    layout_list,
    layout_text,
    layouts_over,
    parse_layout,
)

_MIB, _GIB = 2.0**20, 2.0**30


# --- layouts -----------------------------------------------------------------------------------


def parse_meshes(spec: str, num_devices: int) -> list[dict[str, int]]:
    """Layouts separated by spaces, axes by commas: `"data:8 data:2,model:4 fsdp:4,data:2"`.

    Returns one full mesh shape per layout (all six axes of `AXES`, missing ones 1). A layout must
    use all `num_devices` devices; anything else is one ConfigError that says what would be valid
    (`partitioning.parse_layout`).
    """
    layouts = spec.split()
    if not layouts:
        raise ConfigError(
            f'no mesh layouts given: write them like "data:{num_devices} '
            f'data:2,model:{max(num_devices // 2, 1)}" (axes: {", ".join(AXES)})'
        )
    return [parse_layout(layout, num_devices) for layout in layouts]


def _with_mesh(
    config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int]
) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    for axis, size in mesh_shape.items():
        config.mesh[axis] = size
    return config


def validate_layout(
    config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int], num_devices: int
) -> tuple[ml_collections.ConfigDict, Any]:
    """The config with its mesh set to `mesh_shape`, checked as `train` checks it (its data need
    not be on this machine), and the `config.Run` that comes out. One ConfigError naming the
    layout, the field that does not divide, and the layouts over the same axes that would work."""
    from polyglot_jax.config import validate_run

    shape = full_layout(mesh_shape)
    try:
        if math.prod(shape.values()) != num_devices:
            raise ConfigError(
                f"its sizes multiply to {math.prod(shape.values())}, not the {num_devices} devices"
            )
        config = _with_mesh(config, shape)
        return config, validate_run(config, num_devices, this_machine=False)
    except ConfigError as e:
        # Over the same axes, and data: the axis that takes up whatever the others leave.
        axes = [a for a in AXES if shape[a] != 1 or a == "data"]
        working = []
        for option in layouts_over(num_devices, axes):
            try:
                validate_run(_with_mesh(config, option), num_devices, this_machine=False)
            except ConfigError:
                continue
            working.append(option)
            if len(working) > LAYOUTS_LISTED:  # enough to list; the rest would only take time
                break
        message = f"mesh layout {layout_text(shape)!r}: {str(e).splitlines()[0]}"
        if working:
            message += f"; layouts over {', '.join(axes)} that work: {layout_list(working)}"
        raise ConfigError(message) from e


# --- measuring one layout ----------------------------------------------------------------------


def _cost(compiled) -> dict[str, float]:
    """`compiled.cost_analysis()` as one dict (older jax returns a list with one per program)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        merged: dict[str, float] = {}
        for part in cost:
            for k, v in (part or {}).items():
                merged[k] = merged.get(k, 0.0) + float(v)
        return merged
    return dict(cost or {})


def _memory(compiled) -> dict[str, int] | None:
    stats = compiled.memory_analysis()
    if stats is None:  # some backends do not implement it
        return None
    fields = ("argument", "output", "temp", "alias", "generated_code")
    return {f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in fields}


def _batch(config: ml_collections.ConfigDict, vocab_size: int, sharding, abstract: bool):
    """The step's batch: [batch_size, seq_len + 1] int32 rows (with segment ids and positions when
    the config packs), as ShapeDtypeStructs or as random tokens placed by `sharding`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from polyglot_jax.data.batch import Batch

    t = config.train
    shape = (t.batch_size, t.seq_len + 1)
    packed = config.data.get("mode", "concat") == "packed"
    if abstract:
        spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
        return Batch(spec, spec, spec) if packed else Batch(spec)
    tokens = np.random.default_rng(0).integers(0, vocab_size, shape, dtype=np.int32)
    if packed:  # one document per row: the step's cost does not depend on where documents start
        positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
        batch = Batch(tokens, np.ones(shape, np.int32), positions)
    else:
        batch = Batch(tokens)
    return jax.device_put(batch, sharding)


def measure(
    config: ml_collections.ConfigDict,
    mesh_shape: Mapping[str, int],
    *,
    timed_steps: int = 0,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Compiles the train step of `config` on a `mesh_shape` mesh of `devices` (default: all of
    this process's) and reads what it costs; see the module docstring for every field.

    `mesh_shape` maps axis names to sizes (missing axes 1) and must use every device. With
    `timed_steps > 0` the step also runs on freshly initialised parameters and a random batch.
    """
    import flax.linen as nn
    import jax

    from polyglot_jax.attention import check_attention_backend
    from polyglot_jax.model import count_params
    from polyglot_jax.partitioning import make_mesh, rules_from_config
    from polyglot_jax.train import build_step

    devices = list(jax.devices() if devices is None else devices)
    config, run = validate_layout(config, mesh_shape, len(devices))
    check_attention_backend(run.model.attention_impl, devices[0])
    shape = run.mesh_shape
    rules = rules_from_config(config.mesh.rules)
    mesh = make_mesh(shape, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fns = build_step(config, run.model, mesh, rules)
        abstract_batch = _batch(config, run.model.vocab_size, fns.batch_sharding, abstract=True)
        start = time.perf_counter()
        compiled = fns.train_step.lower(
            fns.abstract_params, fns.abstract_opt, abstract_batch
        ).compile()
        compile_s = time.perf_counter() - start
        step_time_s = _time_steps(config, run, fns, compiled, timed_steps) if timed_steps else None

    memory = _memory(compiled)
    text = compiled.as_text()
    cost = _cost(compiled)
    flops_xla = float(cost.get("flops", 0.0))
    dots, dots_beyond_first_run = matmul_flops(text)
    return {
        "layout": layout_text(shape),
        "mesh": shape,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "parameters": count_params(run.model),
        "bytes_per_device": (
            memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
            if memory
            else None
        ),
        "memory": memory,
        "flops": flops_xla + dots_beyond_first_run,
        "flops_xla": flops_xla,
        "bytes_accessed_xla": float(cost.get("bytes accessed", 0.0)),
        "matmul_flops": dots,
        "collective_bytes": collective_bytes(text),
        "step_time_s": step_time_s,
        "timed_steps": timed_steps,
        "compile_s": compile_s,
    }


def _time_steps(config, run, fns, compiled, steps: int) -> float:
    """Median seconds of `steps` runs of the compiled step, after one warm-up run."""
    import jax

    params = fns.init_params(config.train.seed)
    opt_state = fns.init_opt(params)
    batch = _batch(config, run.model.vocab_size, fns.batch_sharding, abstract=False)
    params, opt_state, metrics = compiled(params, opt_state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- reporting ---------------------------------------------------------------------------------


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per layout: memory (GiB per device), TFLOP per device per step, collective MiB
    per device per step by kind, and the step time in seconds (`-` where not measured)."""
    heads = ["layout", "GiB/device", "TFLOP/device"]
    heads += [f"{k} MiB" for k in COLLECTIVE_KINDS] + ["step s"]
    rows = []
    for r in results:
        memory = r.get("bytes_per_device")
        step = r.get("step_time_s")
        row = [r["layout"], "-" if memory is None else f"{memory / _GIB:.3f}"]
        row.append(f"{r['flops'] / 1e12:.4f}")
        row += [f"{r['collective_bytes'][k] / _MIB:.2f}" for k in COLLECTIVE_KINDS]
        row.append("-" if step is None else f"{step:.4f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(heads, widths, strict=True))
        )
    ]
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
    return "\n".join(lines)


def write_chart(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """A PNG comparing the layouts: memory per device (arguments, new outputs, temp), FLOPs per
    device, collective MiB by kind, and step time where measured. Written atomically."""
    # A Figure without pyplot renders with Agg and leaves the caller's backend and figures alone.
    from matplotlib.figure import Figure

    names = [r["layout"] for r in results]
    x = range(len(results))
    fig = Figure(figsize=(max(8.0, 1.6 * len(results) + 4), 8))
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    bottom = [0.0] * len(results)
    parts = (
        ("arguments", lambda m: m["argument"]),
        ("outputs not aliased", lambda m: m["output"] - m["alias"]),
        ("temp", lambda m: m["temp"]),
    )
    for label, part in parts:
        values = [part(r["memory"]) / _GIB if r.get("memory") else 0.0 for r in results]
        ax.bar(x, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(title="memory per device", ylabel="GiB")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.bar(x, [r["flops"] / 1e12 for r in results], color="tab:purple")
    ax.set(title="FLOPs per device per step", ylabel="TFLOP")
    ax = axes[1][0]
    bottom = [0.0] * len(results)
    for kind in COLLECTIVE_KINDS:
        values = [r["collective_bytes"][kind] / _MIB for r in results]
        ax.bar(x, values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(title="collectives per device per step", ylabel="MiB")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    steps = [r.get("step_time_s") for r in results]
    if any(s is not None for s in steps):
        ax.bar(x, [s or 0.0 for s in steps], color="tab:green")
        ax.set(title="step time (median)", ylabel="s")
    else:
        ax.text(0.5, 0.5, "step time not measured\n(compile only)", ha="center", va="center")
        ax.set(title="step time", xticks=[], yticks=[])
    for ax in (a for row in axes for a in row):
        if ax.patches:  # the panels with bars
            ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    first = results[0] if results else {}
    fig.suptitle(
        f"train step per mesh layout ({first.get('devices', '?')} x "
        f"{first.get('device_kind', '?')}, {first.get('parameters', 0) / 1e6:.1f}M parameters)"
    )
    fig.tight_layout()
    path = pathlib.Path(path)
    with _atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_json(value: Any, path: str | os.PathLike) -> None:
    """`value` as indented JSON at `path`, written to a temporary file beside it, then renamed."""
    path = pathlib.Path(path)
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _atomic(path: pathlib.Path):
    """A temporary path beside `path` that replaces it on success and is removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
