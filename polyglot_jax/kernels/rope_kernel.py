"""Standalone NeoX partial RoPE as a Pallas kernel (forward and backward) for the non-fused paths.

``rope(x, positions, rotary_dim=...)`` equals the model's jnp RoPE (``polyglot_jax.rope``): the first
``rotary_dim`` dims of every head are rotated rotate-half style, the rest copied. A memory-bound kernel:
it reads x once and writes the output once (plus the small float32 cos/sin tables). The backward is the
same kernel with the angle negated (a rotation's transpose is its inverse).

Tiles: on Triton and in interpret mode one program handles ``block_t`` tokens of one head
(``[block_t, head_dim]`` tiles, many programs for bandwidth); Mosaic TPU cannot tile a squeezed head axis
in the second-minor position, so there one program handles ``block_t`` tokens of all heads as
``[block_t, heads * head_dim]`` rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.kernels import backend as backend_lib
from polyglot_jax.kernels import rope_tiles


@dataclasses.dataclass(frozen=True)
class _RopePlan:
    batch: int
    seq_len: int
    padded_len: int
    heads: int
    head_dim: int
    rotary_dim: int
    chunks: tuple[rope_tiles.Chunk, ...]
    block_t: int
    tables_batched: bool
    backend: str
    poison: bool
    num_warps: int
    heads_per_program: int  # 1 ([block_t, head_dim] tiles) or all heads ([block_t, heads*head_dim])


def _rope_kernel(plan: _RopePlan, inverse: bool, *, x, cos, sin, out):
    """x/out: [block_t, heads_per_program * head_dim]; cos/sin: float32 [block_t, rotary_dim / 2]."""
    c, s = cos[...], sin[...]
    if inverse:
        s = -s
    for h in range(plan.heads_per_program):
        offset = h * plan.head_dim
        tiles = rope_tiles.load_rotated(x, slice(None), plan.chunks, True, c, s, offset=offset)
        for (start, size), tile in zip(plan.chunks, tiles, strict=True):
            out[:, offset + start : offset + start + size] = tile.astype(out.dtype)


def _rope_call(plan: _RopePlan, x, cos, sin, inverse: bool):
    """x: [batch, padded_len, heads, head_dim] -> same, rotated (or un-rotated when ``inverse``)."""
    b, t, h, d, bt = plan.batch, plan.padded_len, plan.heads, plan.head_dim, plan.block_t
    half = plan.rotary_dim // 2
    table_batch = (lambda i: i) if plan.tables_batched else (lambda i: 0)
    if plan.heads_per_program == 1:
        grid = (t // bt, b, h)
        x_spec = pl.BlockSpec((None, bt, None, d), lambda i, j, k: (j, i, k, 0))
        table_spec = pl.BlockSpec((None, bt, half), lambda i, j, k: (table_batch(j), i, 0))
        operand = x
    else:
        grid = (t // bt, b)
        x_spec = pl.BlockSpec((None, bt, h * d), lambda i, j: (j, i, 0))
        table_spec = pl.BlockSpec((None, bt, half), lambda i, j: (table_batch(j), i, 0))
        operand = x.reshape(b, t, h * d)
    moved = 2 * x.size * x.dtype.itemsize + 2 * cos.size * 4
    (out,) = backend_lib.pallas_call_by_name(
        functools.partial(_rope_kernel, plan, inverse),
        backend=plan.backend,
        poison=plan.poison,
        name="rope_bwd" if inverse else "rope_fwd",
        grid=grid,
        inputs=[("x", operand, x_spec), ("cos", cos, table_spec), ("sin", sin, table_spec)],
        outputs=[("out", jax.ShapeDtypeStruct(operand.shape, x.dtype), x_spec)],
        num_warps=plan.num_warps,
        num_stages=1,
        cost=pl.CostEstimate(flops=3 * x.size, transcendentals=0, bytes_accessed=moved),
    )
    return out.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rope(plan: _RopePlan, x, cos, sin):
    return _rope_call(plan, x, cos, sin, inverse=False)


def _rope_fwd(plan: _RopePlan, x, cos, sin):
    return _rope_call(plan, x, cos, sin, inverse=False), (cos, sin)


def _rope_bwd(plan: _RopePlan, residuals, g):
    cos, sin = residuals
    return _rope_call(plan, g, cos, sin, inverse=True), None, None


_rope.defvjp(_rope_fwd, _rope_bwd)


def rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    rotary_dim: int,
    base: float = 10000.0,
    interpret: bool | None = None,
    block_t: int = 64,
    num_warps: int = 4,
    heads_per_program: int | None = None,
    backend: str | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
    """NeoX rotate-half RoPE on the first ``rotary_dim`` dims of each head; differentiable.

    x: [batch, seq, heads, head_dim] (any float dtype; rotated in float32, returned in x's dtype).
    positions: int [batch, seq] (or [1, seq], shared by the batch). block_t: tokens per program (a
    power of two). heads_per_program: 1 or all heads; None picks all heads on TPU, 1 elsewhere.
    num_warps: Triton's. interpret/backend/poison_outputs: as in ``flash_attention``.
    """
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(
            f"x must be a float [batch, seq, heads, head_dim] array, got {x.dtype}{list(x.shape)}"
        )
    b, t, h, d = x.shape
    if positions.shape not in ((b, t), (1, t)) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise InputError(
            f"positions must be integer [batch, seq] = {(b, t)}, got "
            f"{positions.dtype}{list(positions.shape)}"
        )
    if rotary_dim < 0 or rotary_dim > d or rotary_dim % 2:
        raise ConfigError(f"rotary_dim={rotary_dim} must be even and within head_dim={d}")
    if not backend_lib.is_power_of_two(block_t):
        raise ConfigError(f"block_t={block_t} must be a power of two")
    lowering = backend_lib.resolve_backend(interpret, backend)
    if lowering == "triton" and rotary_dim and not backend_lib.is_power_of_two(rotary_dim // 2):
        raise ConfigError(
            f"the Triton lowering needs rotary_dim/2 a power of two, got {rotary_dim}"
        )
    if heads_per_program is None:
        heads_per_program = h if lowering == "mosaic_tpu" else 1
    if heads_per_program not in (1, h):
        raise ConfigError(f"heads_per_program={heads_per_program} must be 1 or heads={h}")
    if rotary_dim == 0 or x.size == 0:
        return x
    block_t = min(block_t, max(8, 1 << max(t - 1, 0).bit_length()))
    padded = -(-t // block_t) * block_t
    cos, sin = rope_tiles.rope_tables(positions.astype(jnp.int32), rotary_dim, base)
    if padded != t:  # ragged lengths cost a padded copy; training lengths are block multiples
        x = jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
        cos, sin = (jnp.pad(a, ((0, 0), (0, padded - t), (0, 0))) for a in (cos, sin))
    plan = _RopePlan(
        batch=b,
        seq_len=t,
        padded_len=padded,
        heads=h,
        head_dim=d,
        rotary_dim=rotary_dim,
        chunks=rope_tiles.head_chunks(d, rotary_dim),
        block_t=block_t,
        tables_batched=cos.shape[0] > 1,
        backend=lowering,
        poison=poison_outputs,
        num_warps=num_warps,
        heads_per_program=heads_per_program,
    )
    return _rope(plan, x, cos, sin)[:, :t]
