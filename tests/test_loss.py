"""Chunked cross entropy and its (hand-written) gradient equal a float64 numpy computation over
full logits, on one device and on a sharded mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.config import base_config
from polyglot_jax.loss import chunked_cross_entropy
from polyglot_jax.partitioning import make_mesh, resolve_mesh_shape, rules_from_config


def _reference(hidden, w, targets, mask):
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((log_z - target) * mask).sum(), (log_z**2 * mask).sum(), mask.sum()


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])  # 7 does not divide 13 positions; 64 > seq
def test_matches_float64_reference(chunk):
    rng = np.random.default_rng(chunk)
    hidden = rng.normal(size=(3, 13, 16)).astype(np.float32)
    w = rng.normal(size=(16, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 13))
    mask = (rng.random((3, 13)) > 0.3).astype(np.float32)
    ce, zl, count = chunked_cross_entropy(
        jnp.asarray(hidden),
        jnp.asarray(w),
        jnp.asarray(targets),
        jnp.asarray(mask),
        chunk=chunk,
        z_loss=1e-3,
    )
    ref_ce, ref_z, ref_count = _reference(hidden, w, targets, mask)
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-5)
    np.testing.assert_allclose(zl, 1e-3 * ref_z, rtol=1e-5)
    assert count == ref_count


def test_gradient_matches_unchunked():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 30, (2, 10)))
    mask = jnp.ones((2, 10))

    def full(h, w):
        logits = h @ w
        return jnp.sum(
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        )

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk=3)[0]

    for a, b in zip(
        jax.grad(full, (0, 1))(hidden, w), jax.grad(chunked, (0, 1))(hidden, w), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _reference_gradients(hidden, w, targets, mask, z_loss, ce_weight=1.0, z_weight=1.0):
    """d(ce_weight * ce_sum + z_weight * z_loss * sum log(Z)^2) / d(hidden, w) in float64,
    written out by hand: dlogits = mask * (a (softmax - onehot) + b 2 z_loss log(Z) softmax)."""
    h, w64 = hidden.astype(np.float64), w.astype(np.float64)
    logits = h @ w64
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    p = e / e.sum(-1, keepdims=True)
    log_z = m + np.log(e.sum(-1, keepdims=True))
    onehot = np.eye(w.shape[1])[targets]
    dlogits = mask[..., None] * (ce_weight * (p - onehot) + z_weight * 2.0 * z_loss * log_z * p)
    return dlogits @ w64.T, np.einsum("btd,btv->dv", h, dlogits)


def _problem(seed, batch=4, seq=13, d=16, vocab=48):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, seq, d)).astype(np.float32)
    w = rng.normal(size=(d, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, seq))
    mask = (rng.random((batch, seq)) > 0.3).astype(np.float32)
    return hidden, w, targets, mask


def _loss_grads(hidden, w, targets, mask, chunk, z_loss):
    def total(h, w):
        ce, zl, _ = chunked_cross_entropy(h, w, targets, mask, chunk=chunk, z_loss=z_loss)
        return ce + zl

    return jax.jit(jax.grad(total, (0, 1)))(hidden, w)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_gradients_match_float64_reference(chunk, z_loss):
    hidden, w, targets, mask = _problem(chunk)
    dh, dw = _loss_grads(
        jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask), chunk, z_loss
    )
    ref_dh, ref_dw = _reference_gradients(hidden, w, targets, mask, z_loss)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.5, 3.0)])
def test_each_term_has_its_own_gradient(weights):
    """The two sums get their own cotangents: a loss that weighs them differently (or uses one
    alone) has the gradient of that weighting, not of their plain sum."""
    a, b = weights
    hidden, w, targets, mask = _problem(5)

    def weighted(h, w):
        ce, zl, _ = chunked_cross_entropy(h, w, targets, mask, chunk=7, z_loss=0.1)
        return a * ce + b * zl

    dh, dw = jax.jit(jax.grad(weighted, (0, 1)))(jnp.asarray(hidden), jnp.asarray(w))
    ref_dh, ref_dw = _reference_gradients(hidden, w, targets, mask, 0.1, a, b)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layout", [{"data": 4, "fsdp": 1, "model": 2}, {"data": 2, "fsdp": 2, "model": 2}]
)
def test_gradients_on_a_mesh_match_float64_reference(layout):
    """The kernel gradient is summed per data shard and reduced once: on a mesh it must still be
    the whole batch's sum (batch over data x fsdp, the kernel over fsdp x model)."""
    mesh_cfg = base_config().mesh
    mesh_cfg.update(**layout)
    mesh = make_mesh(resolve_mesh_shape(mesh_cfg, jax.device_count()))
    rules = rules_from_config(mesh_cfg.rules)
    hidden, w, targets, mask = _problem(3, batch=8, d=16, vocab=64)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = nn.logical_to_mesh_sharding(
            jax.sharding.PartitionSpec("batch", "length"), mesh, rules
        )
        embed = nn.logical_to_mesh_sharding(
            jax.sharding.PartitionSpec("embed", "vocab"), mesh, rules
        )
        h3 = nn.logical_to_mesh_sharding(
            jax.sharding.PartitionSpec("batch", "length", "embed"), mesh, rules
        )
        args = (
            jax.device_put(hidden, h3),
            jax.device_put(w, embed),
            jax.device_put(targets, batch),
            jax.device_put(mask, batch),
        )
        dh, dw = _loss_grads(*args, chunk=4, z_loss=1e-2)
    ref_dh, ref_dw = _reference_gradients(hidden, w, targets, mask, 1e-2)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-4, atol=1e-5)
