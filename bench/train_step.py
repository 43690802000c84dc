"""Times the jitted, sharded train step of a config on this machine's devices.

    python bench/train_step.py --config=configs/tiny.py --steps=20 --out=bench/results/train_step_cpu.json
    python bench/train_step.py --config=configs/polyglot_ko_1_3b.py --config.train.batch_size=8 \
        --config.train.grad_accum=1 --out=bench/results/train_step_h100_1_3b.json

The batch is random tokens (the step's cost does not depend on their values), so no data needs to
be prepared; compile time is reported apart from the steady-state step time. Results: JSON with
the device, versions, shapes, step time, tokens/s, MFU and (on GPU/TPU) peak device memory.
"""

from __future__ import annotations

import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from polyglot_jax import flops
from polyglot_jax.config import validate_run
from polyglot_jax.data.batch import Batch
from polyglot_jax.partitioning import make_mesh, rules_from_config
from polyglot_jax.train import build_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one compile-and-warm-up step).")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")


def main(argv):
    import flax.linen as nn

    config = _CONFIG.value
    run = validate_run(config, jax.device_count())
    model_cfg, mesh_shape = run.model, run.mesh_shape
    t = config.train
    mesh, rules = make_mesh(mesh_shape), rules_from_config(config.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fns = build_step(config, model_cfg, mesh, rules)
        params = fns.init_params(t.seed)
        opt_state = fns.init_opt(params)
        rng = np.random.default_rng(0)
        tokens = rng.integers(
            0, model_cfg.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32
        )
        batch = jax.device_put(Batch(tokens), fns.batch_sharding)

        start = time.perf_counter()
        params, opt_state, metrics = fns.train_step(params, opt_state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start

        start = time.perf_counter()
        for _ in range(_STEPS.value):
            params, opt_state, metrics = fns.train_step(params, opt_state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / _STEPS.value

    tokens_per_step = t.batch_size * t.seq_len
    peak = t.peak_flops_per_device or flops.peak_flops_per_device()
    flops_per_step = flops.training_flops_per_token(model_cfg, t.seq_len) * tokens_per_step
    memory = jax.devices()[0].memory_stats() or {}
    result = {
        "benchmark": "train_step",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "platform": jax.default_backend(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax")},
        "model": {k: getattr(model_cfg, k) for k in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "dtype", "attention_impl", "remat_policy")},
        "mesh": mesh_shape,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum": t.grad_accum,
        "compile_and_first_step_s": compile_s,
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "mfu": flops_per_step / step_s / (peak * jax.device_count()) if peak else None,
        "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
        "loss": float(metrics["loss"]),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if _OUT.value:
        pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    app.run(main)
