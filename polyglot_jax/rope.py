"""Rotary position embedding as GPT-NeoX applies it: rotate-half on the first `rotary_dim` dims of each head.

This is the reference (plain jnp) version; `polyglot_jax.kernels` fuses the same rotation into attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables.

    Args:
      positions: int [batch, seq] token positions (packed documents restart at 0).
      rotary_dim: number of rotated dims (even).
      base: RoPE base (10000 for Polyglot-Ko).
    Returns:
      (cos, sin), each float32 [batch, seq, rotary_dim], laid out as HF's `concat(freqs, freqs)`.
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, base: float) -> jax.Array:
    """Rotates the first `rotary_dim` dims of every head; the rest pass through.

    Args:
      x: [batch, seq, heads, head_dim], any float dtype.
      positions: int [batch, seq].
    Returns:
      Same shape and dtype as x. The rotation itself is computed in float32.
    """
    if rotary_dim == 0:
        return x
    cos, sin = rope_cos_sin(positions, rotary_dim, base)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x_rot = x[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)
