"""Chunked cross entropy equals a float64 numpy computation over full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.loss import chunked_cross_entropy


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
