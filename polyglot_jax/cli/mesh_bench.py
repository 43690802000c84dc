r"""Compile the train step per mesh layout: memory per device, FLOPs, collective bytes, step time.

    polyglot-jax mesh-bench --config=configs/small.py --devices=8 \
        --meshes="data:8 fsdp:8 data:2,model:4" --out=bench.json

`--out` gets a JSON list, one entry per layout (`polyglot_jax/mesh_bench.py` defines the fields),
`--chart` (default: `--out` with .png) a PNG comparing them; stdout gets a table. `--devices=N` runs
on N fake CPU devices (compile-only by default); without it the layouts use this machine's devices.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version

from absl import flags
from ml_collections import config_flags

from polyglot_jax.errors import ConfigError, InputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:variant]."
)
_MESHES = flags.DEFINE_string(
    "meshes",
    None,
    'Layouts separated by spaces, axes by commas, e.g. "data:8 fsdp:8 data:2,model:4"; axes: '
    "data, fsdp, model, dcn_data, dcn_fsdp, dcn_model (missing ones are 1).",
)
_OUT = flags.DEFINE_string("out", None, "Write the results here (JSON).")
_CHART = flags.DEFINE_string("chart", None, "Write the chart here (PNG; default: --out with .png).")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Run on this many fake CPU devices instead of this machine's devices."
)
_STEPS = flags.DEFINE_integer(
    "steps",
    None,
    "Timed steps per layout after one warm-up (default: 3 on GPU/TPU, 0 on CPU: compile only).",
)
_BENCH = flags.DEFINE_bool(
    "bench",
    False,
    "Write --out as a benchmark record {device, versions, config, command, results} instead of "
    "the bare list.",
)

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _use_fake_cpu_devices(count: int) -> None:
    """N CPU devices for jax; takes effect only before its backend starts (main checks it did)."""
    import jax

    xla = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla.strip()} {_DEVICE_COUNT_FLAG}={count}".strip()
    jax.config.update("jax_platforms", "cpu")


def _check_output(flag: str, path: pathlib.Path) -> None:
    if path.is_dir():
        raise InputError(f"{flag}={path} is a directory, not a file")
    if not path.parent.is_dir():
        raise InputError(f"{flag}={path}: directory {path.parent} does not exist")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str]) -> None:
    if _CONFIG.value is None:
        raise ConfigError("--config is required (e.g. --config=configs/tiny.py)")
    if not _MESHES.value:
        raise ConfigError('--meshes is required (e.g. --meshes="data:8 fsdp:8 data:2,model:4")')
    if not _OUT.value:
        raise ConfigError("--out is required (a JSON file)")
    if _DEVICES.value is not None and _DEVICES.value <= 0:
        raise ConfigError(f"--devices={_DEVICES.value} must be a positive int")
    if _STEPS.value is not None and _STEPS.value < 0:
        raise ConfigError(f"--steps={_STEPS.value} must be an int >= 0")
    out = pathlib.Path(_OUT.value)
    chart = pathlib.Path(_CHART.value) if _CHART.value else out.with_suffix(".png")
    if chart.resolve() == out.resolve():
        raise ConfigError(f"--chart and --out are both {out}; give the chart a path of its own")
    _check_output("--out", out)
    _check_output("--chart", chart)
    if _DEVICES.value is not None:
        _use_fake_cpu_devices(_DEVICES.value)

    import jax

    from polyglot_jax import mesh_bench
    from polyglot_jax.partitioning import layout_text

    devices = jax.devices()
    wanted = _DEVICES.value
    if wanted is not None and (len(devices) != wanted or devices[0].platform != "cpu"):
        raise ConfigError(
            f"--devices={wanted}: jax had already started on {len(devices)} "
            f"{devices[0].platform} devices"
        )
    config = _CONFIG.value
    layouts = mesh_bench.parse_meshes(_MESHES.value, len(devices))
    for layout in layouts:  # every layout is checked before the first compile
        mesh_bench.validate_layout(config, layout, len(devices))
    steps = _STEPS.value
    if steps is None:
        steps = 0 if devices[0].platform == "cpu" else 3
    results = []
    for layout in layouts:
        name = layout_text(layout)
        print(f"mesh-bench: compiling {name} ...", file=sys.stderr, flush=True)
        results.append(mesh_bench.measure(config, layout, timed_steps=steps, devices=devices))
    record = results
    if _BENCH.value:
        record = {
            "benchmark": "mesh_bench",
            "device": devices[0].device_kind,
            "devices": len(devices),
            "fake_devices": _DEVICES.value is not None,
            "versions": _versions(),
            "config": _config_path(),
            "command": "polyglot-jax mesh-bench " + " ".join(_quote(a) for a in sys.argv[2:]),
            "results": results,
        }
    mesh_bench.write_json(record, out)
    mesh_bench.write_chart(results, chart)
    print(mesh_bench.format_table(results))
    print(f"wrote {out} and {chart}")


def _config_path() -> str:
    flag = flags.FLAGS["config"]
    return getattr(flag, "config_filename", None) or str(flag.serialize())


def _quote(arg: str) -> str:
    name, eq, value = arg.partition("=")
    return f'{name}="{value}"' if eq and " " in value else arg
