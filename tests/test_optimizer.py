"""The schedule against its closed form; weight decay only on matrices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.config import base_config
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
