"""The schedule against its closed form; weight decay only on matrices."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polyglot_jax.config import base_config, load_config
from polyglot_jax.errors import ConfigError
from polyglot_jax.optimizer import learning_rate_schedule, make_optimizer


def _train(**kw):
    t = base_config().train
    t.update(kw)
    return t


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_closed_form(decay):
    t = _train(steps=1000, warmup_steps=100, lr=3e-4, min_lr_ratio=0.1, decay=decay)
    sched = learning_rate_schedule(t)
    for step in (0, 50, 100, 400, 999, 1000, 5000):
        if step < 100:
            want = 3e-4 * step / 100
        else:
            frac = min((step - 100) / 900, 1.0)
            shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1 - frac
            want = 3e-5 + (3e-4 - 3e-5) * shape
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"decay": "step"}, r"config\.train\.decay='step' is not one of \('cosine', 'linear'\)"),
        ({"warmup_steps": -1}, r"config\.train\.warmup_steps=-1 must be >= 0"),
    ],
)
def test_bad_schedule_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        learning_rate_schedule(_train(**fields))


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_longer_than_the_run_is_clipped_to_it(decay):
    """warmup_steps > steps (a short run of a long config) warms up over the whole run."""
    sched = learning_rate_schedule(
        _train(steps=1000, warmup_steps=2000, lr=1e-3, min_lr_ratio=0.1, decay=decay)
    )
    for step in (0, 250, 999):
        assert float(sched(step)) == pytest.approx(1e-3 * step / 1000, rel=1e-5, abs=1e-12), step
    assert float(sched(1000)) == pytest.approx(1e-3)


def test_weight_decay_skips_biases_and_layernorm():
    """With zero gradients AdamW's update is pure decay: -lr * wd * p on matrices, nothing elsewhere."""
    t = _train(
        steps=10,
        warmup_steps=0,
        lr=0.1,
        weight_decay=0.5,
        clip_norm=0.0,
        decay="linear",
        min_lr_ratio=1.0,
    )
    params = {
        "layers": {
            "mlp": {"up_kernel": jnp.ones((2, 3)), "up_bias": jnp.ones(3)},
            "ln": {"scale": jnp.ones(2)},
        },
        "embed_in": jnp.ones((4, 2)),
    }
    tx = make_optimizer(t)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up_kernel"], -0.05)
    np.testing.assert_allclose(updates["embed_in"], -0.05)
    np.testing.assert_allclose(updates["layers"]["mlp"]["up_bias"], 0.0)
    np.testing.assert_allclose(updates["layers"]["ln"]["scale"], 0.0)


def _joined_schedule(train):
    """The schedule as it was built before optax's `warmup_cosine_decay_schedule` replaced it."""
    steps, peak = train["steps"], train["lr"]
    warmup = min(train["warmup_steps"], steps)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_steps = max(steps - warmup, 1)
    if train["decay"] == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train["min_lr_ratio"])
    else:
        decay = optax.linear_schedule(peak, peak * train["min_lr_ratio"], decay_steps)
    return optax.join_schedules([warm, decay], [warmup])


def _config_schedules():
    """(steps, warmup_steps, lr) of every config in configs/."""
    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.py")):
        t = load_config(str(path)).train
        yield pytest.param(t.steps, t.warmup_steps, t.lr, t.min_lr_ratio, id=path.stem)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize(
    "steps, warmup, lr, ratio",
    [
        (1000, 100, 3e-4, 0.1),
        (1000, 0, 3e-4, 0.1),  # no warmup
        (1000, 2000, 1e-3, 0.1),  # warmup clipped to the run
        (1000, 1000, 1e-3, 0.1),  # warmup exactly the run
        (999, 1, 2e-4, 0.0),
        (7, 3, 1.6e-4, 0.3),
        (5000, 50, 1.2e-4, 0.07),
        (1, 0, 1e-3, 0.5),
        *_config_schedules(),
    ],
)
def test_schedule_equals_the_joined_schedule_at_every_step(decay, steps, warmup, lr, ratio):
    """optax's warmup_cosine_decay_schedule (what learning_rate_schedule uses for cosine) gives
    exactly the float32 values of the hand-joined warmup + cosine it replaced, at every step
    (eagerly, over all steps at once, and jitted on one step as the optimizer runs it)."""
    t = _train(steps=steps, warmup_steps=warmup, lr=lr, min_lr_ratio=ratio, decay=decay)
    ours, joined = learning_rate_schedule(t), _joined_schedule(t)
    every = jnp.arange(steps + 3, dtype=jnp.int32)  # and past the end
    np.testing.assert_array_equal(np.asarray(ours(every)), np.asarray(joined(every)))
    some = sorted({0, 1, min(warmup, steps), steps // 2, steps - 1, steps, steps + 1})
    for step in some:
        count = jnp.int32(step)
        assert jax.jit(ours)(count).tobytes() == jax.jit(joined)(count).tobytes(), step
