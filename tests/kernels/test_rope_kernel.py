"""The standalone RoPE kernel (interpret mode on CPU) against a float64 numpy reference.

The reference follows the model's semantics: float32 angles ``positions * inv_freq`` with
``inv_freq = 1 / base**(arange(0, rot, 2) / rot)``, then rotate-half on the first ``rot`` dims in
float64. The gradient of a rotation is the inverse rotation; the reference applies it explicitly.
Outputs are poisoned (start as NaN) so unwritten tiles fail the comparison.

float32 ``pow`` is not correctly rounded everywhere (XLA and numpy differ by an ulp of inv_freq for
base 10000), and the angle multiplies that ulp by the position; the float64 comparison therefore uses
base 2**32, whose inverse frequencies 2**-i every implementation computes exactly, and the default
base is checked against the model's own jnp formula instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.kernels import rope
from polyglot_jax.rope import apply_rope


def reference_rope(x, positions, rotary_dim, base, inverse=False):
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)
    angles = (positions.astype(np.float32)[..., None] * inv_freq).astype(np.float64)
    c, s = np.cos(angles)[:, :, None, :], np.sin(angles)[:, :, None, :]
    if inverse:
        s = -s
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., rotary_dim:]], axis=-1)


EXACT_BASE = 2.0**32


@pytest.mark.parametrize(
    "b,t,h,d,rot,dtype,shared,heads_per_program,block_t",
    [
        (2, 64, 3, 128, 64, jnp.float32, False, 1, 16),  # 1.3B: rotary 64 of 128
        (1, 67, 2, 256, 64, jnp.bfloat16, False, 1, 32),  # 5.8B: 64 of 256; ragged length
        (
            2,
            40,
            2,
            128,
            128,
            jnp.float32,
            True,
            2,
            8,
        ),  # full rotation, shared positions, TPU tiling
        (1, 24, 2, 80, 32, jnp.float32, False, 1, 8),  # pass-through split into 32 + 16
    ],
)
def test_rope_matches_reference(b, t, h, d, rot, dtype, shared, heads_per_program, block_t):
    rng = np.random.default_rng(t + d)
    x = np.asarray(jnp.asarray(rng.standard_normal((b, t, h, d)), dtype).astype(jnp.float32))
    ct = rng.standard_normal((b, t, h, d))
    positions = rng.integers(0, 4096, (1 if shared else b, t)).astype(np.int32)

    def apply(x):
        return rope(
            x,
            jnp.asarray(positions),
            rotary_dim=rot,
            base=EXACT_BASE,
            block_t=block_t,
            heads_per_program=heads_per_program,
            poison_outputs=True,
        )

    out, grad = jax.jit(lambda x, ct: (apply(x), jax.vjp(apply, x)[1](ct)[0]))(
        jnp.asarray(x, dtype), jnp.asarray(ct, dtype)
    )
    assert out.dtype == dtype and grad.dtype == dtype and out.shape == (b, t, h, d)
    full_positions = np.broadcast_to(positions, (b, t))
    want_out = reference_rope(x.astype(np.float64), full_positions, rot, EXACT_BASE)
    ct_rounded = np.asarray(jnp.asarray(ct, dtype).astype(jnp.float32), np.float64)
    want_grad = reference_rope(ct_rounded, full_positions, rot, EXACT_BASE, inverse=True)
    # float32: a few ulps of the float32 angle's cos/sin; bfloat16: one rounding of the result.
    rtol, atol = (1e-5, 1e-5) if dtype == jnp.float32 else (8e-3, 8e-3)
    for got, want in ((out, want_out), (grad, want_grad)):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    # Dims past rotary_dim are copied bit for bit.
    np.testing.assert_array_equal(
        np.asarray(out[..., rot:]), np.asarray(jnp.asarray(x, dtype))[..., rot:]
    )


def test_default_base_matches_model_jnp_rope():
    """base 10000 against the model's formula as the contract states it (jnp, float32)."""
    rng = np.random.default_rng(1)
    b, t, h, d, rot = 2, 32, 2, 128, 64
    x = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 2048, (b, t)), jnp.int32)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x_rot = x[..., :rot]
    rotated_half = jnp.concatenate([-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]], axis=-1)
    want = jnp.concatenate([x_rot * jnp.cos(emb) + rotated_half * jnp.sin(emb), x[..., rot:]], -1)
    got = rope(x, positions, rotary_dim=rot, block_t=16, poison_outputs=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_matches_the_models_apply_rope():
    """The kernel against ``polyglot_jax.rope.apply_rope`` itself (what the xla and cudnn attention
    paths rotate with), at restarting positions and a partial rotary_dim."""
    rng = np.random.default_rng(2)
    b, t, h, d, rot = 2, 48, 3, 64, 32
    x = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    positions = jnp.asarray(np.concatenate([np.arange(20), np.arange(28)])[None].repeat(b, 0))
    want = apply_rope(x, positions, rot, 10000.0)
    got = rope(x, positions, rotary_dim=rot, block_t=16, poison_outputs=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_rotary_zero_is_identity_and_bad_inputs_raise():
    x = jnp.ones((1, 8, 2, 128), jnp.float32)
    positions = jnp.zeros((1, 8), jnp.int32)
    assert rope(x, positions, rotary_dim=0) is x
    assert rope(x, positions, rotary_dim=0, backend="triton") is x
    for empty in ((0, 8, 2, 128), (1, 0, 2, 128), (1, 8, 0, 128)):  # nothing to rotate
        e = jnp.ones(empty, jnp.float32)
        assert rope(e, jnp.zeros(empty[:2], jnp.int32), rotary_dim=64).shape == empty
    with pytest.raises(InputError, match="positions"):
        rope(x, jnp.zeros((1, 7), jnp.int32), rotary_dim=64)
    with pytest.raises(InputError, match="positions"):
        rope(x, positions.astype(jnp.float32), rotary_dim=64)
    with pytest.raises(ConfigError, match="rotary_dim"):
        rope(x, positions, rotary_dim=130)
    with pytest.raises(ConfigError, match="heads_per_program"):
        rope(x, positions, rotary_dim=64, heads_per_program=3)
    with pytest.raises(ConfigError, match="Triton"):
        rope(x, positions, rotary_dim=24, backend="triton")
