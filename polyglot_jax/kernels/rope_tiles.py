"""NeoX rotate-half RoPE pieces shared by the Pallas kernels: cos/sin tables, head-dim chunks, tile ops.

Semantics (= HF GPTNeoX and the model's jnp RoPE): ``inv_freq = 1 / base**(arange(0, rot, 2) / rot)``
in float32, angles ``positions * inv_freq``; with ``x1, x2`` the two halves of the first ``rot`` dims,
``out1 = x1*cos - x2*sin``, ``out2 = x2*cos + x1*sin``, dims ``rot:`` pass through. Both halves use the
same angles, so the tables are half width: ``[batch, seq, rot // 2]``.

Kernels never slice an in-register array (the Triton lowering cannot); they read each chunk of the head
dim straight from the ref: ``[0, rot/2)``, ``[rot/2, rot)``, then the pass-through dims in power-of-two
pieces (Triton tensors must have power-of-two shapes), and build scores as a sum of per-chunk dots.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Chunk = tuple[int, int]  # (start, size) along the head dim


def rope_tables(positions: jax.Array, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, each float32 ``positions.shape + (rotary_dim // 2,)``.

    positions: integer array (any shape, usually ``[batch, seq]``).
    """
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def head_chunks(head_dim: int, rotary_dim: int) -> tuple[Chunk, ...]:
    """The head dim cut into the pieces that kernels load separately.

    With ``rotary_dim > 0`` the first two chunks are the rotated halves; the remaining dims follow in
    power-of-two pieces, largest first (e.g. head 256, rotary 64: (0,32) (32,32) (64,128) (192,64)).
    """
    chunks: list[Chunk] = []
    if rotary_dim:
        half = rotary_dim // 2
        chunks += [(0, half), (half, half)]
    start, rest = rotary_dim, head_dim - rotary_dim
    while rest:
        size = 1 << (rest.bit_length() - 1)
        chunks.append((start, size))
        start, rest = start + size, rest - size
    return tuple(chunks)


def load_rotated(
    ref,
    rows,
    chunks: Sequence[Chunk],
    rotary: bool,
    cos: jax.Array | None,
    sin: jax.Array | None,
    offset: int = 0,
) -> list[jax.Array]:
    """Chunks of one head ``ref[rows, offset:offset + head_dim]`` in ref's dtype, the first two rotated.

    ref: a ``[n, width]`` tile ref holding the head at column ``offset``; rows: ``slice(None)`` or
    ``pl.ds(start, m)``; cos/sin: float32 ``[m, rotary_dim // 2]`` (used when ``rotary``). The rotation
    runs in float32 and is rounded back to the ref's dtype before it meets the MXU/tensor cores, as the
    model's jnp path does.
    """
    tiles = [ref[rows, offset + start : offset + start + size] for start, size in chunks]
    if rotary:
        x1, x2 = tiles[0].astype(jnp.float32), tiles[1].astype(jnp.float32)
        tiles[0] = (x1 * cos - x2 * sin).astype(ref.dtype)
        tiles[1] = (x2 * cos + x1 * sin).astype(ref.dtype)
    return tiles


def unrotate(
    g1: jax.Array, g2: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Gradient through the rotation: the transpose (inverse) rotation of the two halves' gradients."""
    return g1 * cos + g2 * sin, g2 * cos - g1 * sin
