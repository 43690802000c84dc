"""Exact parameter count and a shape summary of a config's model (no allocation); with
``--show_devices``, which backend, platform version and devices JAX sees on this machine."""

from __future__ import annotations

import importlib.metadata
import json
import math

import flax.linen as nn
import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from polyglot_jax.config import validate_run
from polyglot_jax.errors import ConfigError
from polyglot_jax.model import abstract_params

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:variant]."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Device count to check the mesh against (default: this machine's)."
)
_SHOW_DEVICES = flags.DEFINE_bool(
    "show_devices",
    False,
    "Print the backend, platform version and devices JAX sees (and the installed accelerator "
    "plugins); --config is then optional.",
)

# What `pip install -e '.[cuda12]'`, `'.[cuda13]'` and `'.[tpu]'` bring (setup.cfg's extras).
ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")


def device_report() -> dict:
    """The jax and jaxlib versions, the default backend and its platform version, every device
    (global, across processes) and the accelerator plugin packages installed."""
    import jaxlib

    devices = jax.devices()
    plugins = {}
    for name in ACCELERATOR_PACKAGES:
        try:
            plugins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "platform_version": " ".join(str(devices[0].client.platform_version).split()),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": len(devices),
        "devices": [
            {"id": d.id, "kind": d.device_kind, "platform": d.platform, "process": d.process_index}
            for d in devices
        ],
        "plugins": plugins,
    }


def _print_devices(report: dict) -> None:
    print(f"jax         {report['jax']} (jaxlib {report['jaxlib']})")
    print(f"backend     {report['backend']} (platform version: {report['platform_version']})")
    print(
        f"devices     {report['device_count']} ({report['local_device_count']} local, "
        f"process {report['process_index']} of {report['process_count']})"
    )
    for d in report["devices"]:
        print(f"  {d['id']:<4} {d['platform']:<6} {d['kind']}  (process {d['process']})")
    plugins = ", ".join(f"{k} {v}" for k, v in report["plugins"].items())
    print(f"plugins     {plugins or 'none (CPU only)'}")


def summarize(config: ml_collections.ConfigDict, num_devices: int) -> dict:
    """Parameter count, shapes with logical axes, and the resolved mesh of a config.

    Checks the train and data sections too (as `train` does, except the attention kernel against
    this machine's backend and data directories absent here: the config may well be meant for
    another machine)."""
    run = validate_run(config, num_devices, this_machine=False)
    model_cfg, mesh_shape = run.model, run.mesh_shape
    boxed = abstract_params(model_cfg)
    shapes, total = {}, 0
    flat = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        shapes[name] = {"shape": list(leaf.value.shape), "axes": [a or "-" for a in leaf.names]}
        total += math.prod(leaf.value.shape)
    return {
        "parameters": total,
        "head_dim": model_cfg.head_dim,
        "param_bytes": total * jax.numpy.dtype(model_cfg.param_dtype).itemsize,
        "mesh": mesh_shape,
        "shapes": shapes,
    }


def main(argv: list[str]) -> None:
    report = device_report() if _SHOW_DEVICES.value else None
    if _CONFIG.value is None and report is not None:
        if _JSON.value:
            print(json.dumps(report))
        else:
            _print_devices(report)
        return
    if _CONFIG.value is None:
        raise ConfigError(
            "--config is required (e.g. --config=configs/tiny.py), or --show_devices alone"
        )
    if _DEVICES.value is not None and _DEVICES.value <= 0:
        raise ConfigError(f"--devices={_DEVICES.value} must be a positive int")
    info = summarize(_CONFIG.value, _DEVICES.value or jax.device_count())
    if report is not None:
        info["backend"] = report
    if _JSON.value:
        print(json.dumps(info))
        return
    if report is not None:
        _print_devices(report)
    print(
        f"parameters  {info['parameters']:,}  ({info['param_bytes'] / 2**30:.2f} GiB of master weights)"
    )
    print(f"head_dim    {info['head_dim']}")
    print("mesh        " + " ".join(f"{k}={v}" for k, v in info["mesh"].items()))
    for name, s in info["shapes"].items():
        shape = "x".join(map(str, s["shape"]))
        print(f"  {name:<45} {shape:>22}  ({', '.join(s['axes'])})")
