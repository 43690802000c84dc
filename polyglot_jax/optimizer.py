"""The optimizer: optax AdamW with GPT-NeoX's schedule, global-norm clipping, decay only on matrices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from polyglot_jax.errors import ConfigError

DECAYS = ("cosine", "linear")  # config.train.decay


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at `steps`.

    A warmup longer than the run is clipped to it (`config.check_train` warns about that): the rate
    then only warms up. The other fields are checked by `config.check_train` before this runs."""
    steps, peak = train["steps"], train["lr"]
    warmup = min(train["warmup_steps"], steps)
    floor = peak * train["min_lr_ratio"]
    if train["decay"] not in DECAYS:
        raise ConfigError(f"config.train.decay={train['decay']!r} is not one of {DECAYS}")
    if warmup < 0:
        raise ConfigError(f"config.train.warmup_steps={train['warmup_steps']} must be >= 0")
    decay_steps = max(steps - warmup, 1)  # 1 when the warmup takes the whole run
    if train["decay"] == "cosine":
        # optax's, which is join_schedules([linear warmup, cosine_decay_schedule]) bit for bit
        # (tests/test_optimizer.py compares every step).
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps, floor)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay = optax.linear_schedule(peak, floor, decay_steps)
    return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for weight matrices; biases and LayerNorm parameters (vectors per layer) get no decay."""

    def is_matrix(path, leaf) -> bool:
        name = str(path[-1].key)
        return not (name.endswith("bias") or name == "scale")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW(b1, b2, eps, weight_decay) after clipping the global gradient norm to `clip_norm`."""
    chain = []
    if train["clip_norm"] > 0:
        chain.append(optax.clip_by_global_norm(train["clip_norm"]))
    chain.append(
        optax.adamw(
            learning_rate_schedule(train),
            b1=train["b1"],
            b2=train["b2"],
            eps=train["eps"],
            weight_decay=train["weight_decay"],
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)
