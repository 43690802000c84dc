"""Exact parameter count and a shape summary of a config's model (no allocation)."""

from __future__ import annotations

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
    if _CONFIG.value is None:
        raise ConfigError("--config is required (e.g. --config=configs/tiny.py)")
    if _DEVICES.value is not None and _DEVICES.value <= 0:
        raise ConfigError(f"--devices={_DEVICES.value} must be a positive int")
    info = summarize(_CONFIG.value, _DEVICES.value or jax.device_count())
    if _JSON.value:
        print(json.dumps(info))
        return
    print(
        f"parameters  {info['parameters']:,}  ({info['param_bytes'] / 2**30:.2f} GiB of master weights)"
    )
    print(f"head_dim    {info['head_dim']}")
    print("mesh        " + " ".join(f"{k}={v}" for k, v in info["mesh"].items()))
    for name, s in info["shapes"].items():
        shape = "x".join(map(str, s["shape"]))
        print(f"  {name:<45} {shape:>22}  ({', '.join(s['axes'])})")
