"""Flash attention as Pallas kernels: causal, packed-segment masking, NeoX partial RoPE fused in.

Forward (FlashAttention-2): each program owns one tile of query rows and walks the key/value tiles with an
online softmax, so no ``T x T`` matrix ever reaches HBM; it writes the output and the row logsumexp.
Backward: two kernels that recompute the scores tile by tile, one owning a key tile (dK, dV) and one a
query tile (dQ); neither materialises the ``T x T`` matrix and neither needs atomics.

RoPE: q and k arrive un-rotated. Every kernel rotates the first ``rotary_dim`` dims of each q/k tile it
loads, from float32 cos/sin tables at the given positions (packed documents restart positions), and the
backward applies the transposed rotation to dQ/dK before writing them. Scores are a sum of per-chunk
dots (see ``rotary.head_chunks``), so no in-register array is ever sliced.

Masking: query i sees key j iff ``j <= i`` (causal) and ``segment_q[i] == segment_kv[j]`` (when segment
ids are given; any equal ids attend, 0 has no special meaning). Sequences are padded to a multiple of
the largest tile; padded keys are masked where a real query could see them and padded query rows are
computed finitely and dropped. A row that sees no key at all (possible with ``kv_segment_ids``) gets
output 0, logsumexp -inf and zero gradients, never NaN.

Hopper: ``backend="mosaic_gpu"`` swaps these kernels for warp-specialised Mosaic GPU ones (TMA, wgmma)
in ``flash_attention_hopper`` (forward) and ``flash_attention_hopper_backward`` (head_dim <= 128; at
256 the backward stays the Triton kernels here, which take the same residuals).

Layouts: arrays enter as ``[batch, seq, heads, head_dim]``. The Triton and interpret lowerings read that
layout in place (strided tiles); Mosaic TPU needs the sequence in the second-minor position, so on TPU
the arrays are transposed to ``[batch, heads, seq, head_dim]`` around the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.kernels import backend as backend_lib
from polyglot_jax.kernels import flash_attention_hopper as hopper_lib
from polyglot_jax.kernels import flash_attention_hopper_backward as hopper_backward
from polyglot_jax.kernels import rotary

# Finite, so exp2(s - m) stays NaN-free for a row that has seen no visible key yet; a real score
# can never be this small, which is how fully masked rows are recognised at the end.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes (rows per tile, powers of two) and Triton launch parameters of the three kernels.

    block_q/block_k: the forward's query tile and the key tiles it walks. block_q_dkv/block_k_dkv: the
    dK/dV kernel owns a key tile of block_k_dkv rows and walks query tiles of block_q_dkv rows;
    block_q_dq/block_k_dq likewise for dQ. num_warps_*/num_stages_*: Triton's launch parameters.
    layout: None picks by lowering ("bhtd" on TPU, else "bthd"); set it to test the other index maps.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_dkv: int = 8
    num_stages_dkv: int = 2
    block_q_dq: int = 128
    block_k_dq: int = 32
    num_warps_dq: int = 8
    num_stages_dq: int = 3
    layout: str | None = None

    @classmethod
    def default(cls, head_dim: int, backend: str, compute_capability: int = 90) -> Tiling:
        """Defaults per lowering, head dim and (Triton) GPU generation.

        The Triton choices were compiled offline (``bench/attention.py --triton-resources``: Triton
        3.7.1, sm_80 and sm_90, with and without RoPE and segment ids) and are the largest tried that
        spill no registers and fit shared memory (A100 163 KiB, H100 227 KiB); they are not yet timed
        on hardware.
        """
        if backend == "mosaic_tpu":  # MXU-sized tiles; VMEM, not registers, is the limit there
            return cls(block_k=128, block_q_dkv=128, block_k_dkv=128, block_k_dq=128)
        if head_dim <= 128:
            if compute_capability < 90:  # mma.sync keeps operands in registers: narrower tiles
                return cls(
                    block_k=32, block_q_dkv=32, block_k_dkv=32, num_warps_dkv=4, num_stages_dkv=3
                )
            return cls()
        return cls(  # head_dim 256 (5.8B): float32 accumulators twice as wide
            block_q=64,
            block_k=32,
            block_q_dkv=32,
            block_k_dkv=32,
            num_stages_dkv=3,
            block_q_dq=32,
            block_k_dq=32,
        )

    def blocks(self) -> tuple[int, ...]:
        return (
            self.block_q,
            self.block_k,
            self.block_q_dkv,
            self.block_k_dkv,
            self.block_q_dq,
            self.block_k_dq,
        )

    def fit(self, seq_len: int) -> Tiling:
        """Blocks no larger than the sequence needs (a 67-token sequence gets 128-row tiles at most)."""
        cap = max(16, 1 << max(seq_len - 1, 0).bit_length())
        names = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
        return dataclasses.replace(self, **{n: min(getattr(self, n), cap) for n in names})


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one attention call (hashable: the custom_vjp's non-differentiable arg)."""

    batch: int
    heads: int
    head_dim: int
    seq_len: int  # real length T
    padded_len: int  # T rounded up to a multiple of every block
    causal: bool
    sm_scale: float
    rotary_dim: int
    chunks: tuple[rotary.Chunk, ...]
    segmented: bool
    tables_batched: bool  # cos/sin are [batch, T, rot/2] (else [1, T, rot/2], shared)
    tiling: Tiling
    backend: str  # the portable kernels' lowering (with hopper: of any backward kernel not Hopper)
    layout: str  # "bthd" or "bhtd"
    poison: bool
    hopper: hopper_lib.HopperTiling | None = None  # run the Mosaic GPU kernels
    hopper_interpret: bool = False  # ...run in Pallas' GPU interpret mode

    @property
    def rotary(self) -> bool:
        return self.rotary_dim > 0

    def precision(self, dtype):
        # Triton's default for float32 dots is TF32; the float32 path should be float32.
        return lax.Precision.HIGHEST if dtype == jnp.float32 else None

    # BlockSpecs. Every grid here is (tile index i, batch b, head h); ``index`` maps i to a tile index.
    def seq_spec(self, block: int, index: Callable) -> pl.BlockSpec:
        d = self.head_dim
        if self.layout == "bthd":
            return pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, index(i), h, 0))
        return pl.BlockSpec((None, None, block, d), lambda i, b, h: (b, h, index(i), 0))

    def stat_column_spec(self, block: int, index: Callable) -> pl.BlockSpec:
        """Per-row float32 statistics (logsumexp, delta) as a column: [batch, heads, T, 1]."""
        return pl.BlockSpec((None, None, block, 1), lambda i, b, h: (b, h, index(i), 0))

    def stat_row_spec(self) -> pl.BlockSpec:
        """The same statistics as one whole row, [batch, heads, 1, T] (a free reshape)."""
        return pl.BlockSpec((None, None, 1, self.padded_len), lambda i, b, h: (b, h, 0, 0))

    def segment_column_spec(self, block: int, index: Callable) -> pl.BlockSpec:
        """Segment ids as a column, [batch, T, 1]."""
        return pl.BlockSpec((None, block, 1), lambda i, b, h: (b, index(i), 0))

    def segment_row_spec(self) -> pl.BlockSpec:
        """Segment ids as one whole row, [batch, 1, T] (a [1, block] tile is below TPU's 128 lanes)."""
        return pl.BlockSpec((None, 1, self.padded_len), lambda i, b, h: (b, 0, 0))

    def table_spec(self, block: int, index: Callable) -> pl.BlockSpec:
        half = self.rotary_dim // 2
        if self.tables_batched:
            return pl.BlockSpec((None, block, half), lambda i, b, h: (b, index(i), 0))
        return pl.BlockSpec((None, block, half), lambda i, b, h: (0, index(i), 0))


def _whole(i):
    return 0


def _in_order(i):
    return i


def _reversed(n: int) -> Callable:
    # Causal query tiles near the end of the sequence do the most work: launch them first.
    return lambda i: n - 1 - i


# ----------------------------------------------------------------------------------------- tile math


def _dot_nt(a, b, precision):
    """a [m, k] @ b[n, k]^T -> float32 [m, n]."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _dot_nn(a, b, precision):
    """a [m, k] @ b [k, n] -> float32 [m, n]."""
    return lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _rotated_tiles(plan: _Plan, ref, rows, cos, sin) -> list[jax.Array]:
    """Head-dim chunks of ``ref[rows]`` (q or k), RoPE applied in-kernel when the plan has it."""
    if not plan.rotary:
        return rotary.load_rotated(ref, rows, plan.chunks, False, None, None)
    return rotary.load_rotated(ref, rows, plan.chunks, True, cos[rows, :], sin[rows, :])


def _scores(plan: _Plan, q_tiles, k_tiles, precision):
    """Base-2 scaled scores ``(q . k) * sm_scale * log2(e)`` as a sum of per-chunk dots, f32."""
    s = _dot_nt(q_tiles[0], k_tiles[0], precision)
    for qc, kc in zip(q_tiles[1:], k_tiles[1:], strict=True):
        s = s + _dot_nt(qc, kc, precision)
    return s * (plan.sm_scale * LOG2_E)


def _visible(plan: _Plan, q_pos, k_pos, seg_q, seg_k, kv_limit: bool):
    """Mask of the (query, key) pairs that may attend, in either orientation.

    q_pos/k_pos: int32 query and key indices shaped to broadcast ([bq, 1] and [1, bk], or [1, bq] and
    [bk, 1] for transposed tiles); seg_q/seg_k: segment ids shaped alike, or None.
    """
    mask = None
    if plan.causal:
        mask = q_pos >= k_pos
    if seg_q is not None:
        same = seg_q == seg_k
        mask = same if mask is None else jnp.logical_and(mask, same)
    if kv_limit:
        real = k_pos < plan.seq_len
        mask = real if mask is None else jnp.logical_and(mask, real)
    return mask


def _column(start, n: int):
    return start + lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def _row(start, n: int):
    return start + lax.broadcasted_iota(jnp.int32, (1, n), 1)


def _key_loop_bounds(plan: _Plan, q_start, bq: int, bk: int):
    """(first masked key tile, end) for a query tile: tiles before the first need no mask at all."""
    n_real = pl.cdiv(plan.seq_len, bk)
    if plan.causal:
        end = jnp.minimum(lax.div(q_start + bq + bk - 1, bk), n_real)
        split = 0 if plan.segmented else lax.div(q_start, bk)
    else:
        end = n_real
        split = 0 if plan.segmented else plan.seq_len // bk
    return split, end


# ------------------------------------------------------------------------------------------- kernels


def _forward_kernel(
    plan: _Plan,
    *,
    q,
    k,
    v,
    o,
    lse,
    seg_q=None,
    seg_k=None,
    cos_q=None,
    sin_q=None,
    cos_k=None,
    sin_k=None,
):
    """One query tile: q/o [bq, D], k/v [T, D], seg_q [bq, 1], seg_k [1, T], tables [., rot/2]."""
    bq, bk = plan.tiling.block_q, plan.tiling.block_k
    dtype = q.dtype
    precision = plan.precision(dtype)
    q_start = (plan.padded_len // bq - 1 - pl.program_id(0)) * bq
    q_tiles = _rotated_tiles(plan, q, slice(None), cos_q, sin_q)
    seg_rows = seg_q[...] if plan.segmented else None
    kv_limit = not plan.causal and plan.seq_len % bk != 0

    def step(j, carry, masked: bool):
        acc, m, denom = carry
        k_start = pl.multiple_of(j * bk, bk)
        rows = pl.ds(k_start, bk)
        k_tiles = _rotated_tiles(plan, k, rows, cos_k, sin_k)
        s = _scores(plan, q_tiles, k_tiles, precision)
        if masked:
            seg_cols = seg_k[:, rows] if plan.segmented else None
            q_pos, k_pos = _column(q_start, bq), _row(k_start, bk)
            mask = _visible(plan, q_pos, k_pos, seg_rows, seg_cols, kv_limit)
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new)
        denom = denom * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * alpha + _dot_nn(p.astype(dtype), v[rows, :], precision)
        return acc, m_new, denom

    carry = (
        jnp.zeros((bq, plan.head_dim), jnp.float32),
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
    )
    split, end = _key_loop_bounds(plan, q_start, bq, bk)
    carry = lax.fori_loop(0, split, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(split, end, functools.partial(step, masked=True), carry)
    acc, m, denom = carry
    empty = m == MASK_VALUE  # the row saw no visible key
    inv_denom = 1.0 / jnp.where(empty, 1.0, denom)
    o[...] = jnp.where(empty, 0.0, acc * inv_denom).astype(o.dtype)
    lse[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(denom))


def _dkdv_kernel(
    plan: _Plan,
    *,
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    seg_q=None,
    seg_k=None,
    cos_q=None,
    sin_q=None,
    cos_k=None,
    sin_k=None,
):
    """One key tile, transposed scores ``S^T = K Q^T`` so no computed tile needs a transpose.

    k/v/dk/dv [bk, D], q/do [T, D], lse/delta [1, T] rows (lse +inf on empty rows), seg_q [1, T],
    seg_k [bk, 1], tables [., rot/2].
    """
    bq, bk = plan.tiling.block_q_dkv, plan.tiling.block_k_dkv
    dtype = q.dtype
    precision = plan.precision(dtype)
    k_start = pl.program_id(0) * bk
    k_tiles = _rotated_tiles(plan, k, slice(None), cos_k, sin_k)
    v_tile = v[...]
    seg_keys = seg_k[...] if plan.segmented else None

    def step(i, carry, masked: bool):
        dv_acc, dk_accs = carry
        q_start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(q_start, bq)
        q_tiles = _rotated_tiles(plan, q, rows, cos_q, sin_q)
        s_t = _scores(plan, k_tiles, q_tiles, precision)  # [bk, bq]
        if masked:
            seg_queries = seg_q[:, rows] if plan.segmented else None
            q_pos, k_pos = _row(q_start, bq), _column(k_start, bk)
            # Padded keys need no mask here: each key's dK/dV depends on its own column alone.
            mask = _visible(plan, q_pos, k_pos, seg_queries, seg_keys, False)
            s_t = jnp.where(mask, s_t, MASK_VALUE)
        p_t = jnp.exp2(s_t - lse[:, rows])
        do_tile = do[rows, :]
        dv_acc = dv_acc + _dot_nn(p_t.astype(dtype), do_tile, precision)
        dp_t = _dot_nt(v_tile, do_tile, precision)
        ds_t = (p_t * (dp_t - delta[:, rows])).astype(dtype)
        dk_accs = tuple(
            g + _dot_nn(ds_t, qc, precision) for g, qc in zip(dk_accs, q_tiles, strict=True)
        )
        return dv_acc, dk_accs

    carry = (
        jnp.zeros((bk, plan.head_dim), jnp.float32),
        tuple(jnp.zeros((bk, size), jnp.float32) for _, size in plan.chunks),
    )
    n_real = pl.cdiv(plan.seq_len, bq)
    first = lax.div(k_start, bq) if plan.causal else 0
    if plan.segmented or not plan.causal:
        carry = lax.fori_loop(first, n_real, functools.partial(step, masked=plan.segmented), carry)
    else:  # query tiles starting at or past the key tile's last row see all of it
        split = jnp.minimum(lax.div(k_start + bk + bq - 1, bq), n_real)
        carry = lax.fori_loop(first, split, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(split, n_real, functools.partial(step, masked=False), carry)
    dv_acc, dk_accs = carry
    grads = [g * plan.sm_scale for g in dk_accs]
    if plan.rotary:
        grads[0], grads[1] = rotary.unrotate(grads[0], grads[1], cos_k[...], sin_k[...])
    for (start, size), g in zip(plan.chunks, grads, strict=True):
        dk[:, start : start + size] = g.astype(dk.dtype)
    dv[...] = dv_acc.astype(dv.dtype)


def _dq_kernel(
    plan: _Plan,
    *,
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    seg_q=None,
    seg_k=None,
    cos_q=None,
    sin_q=None,
    cos_k=None,
    sin_k=None,
):
    """One query tile: q/do/dq [bq, D], k/v [T, D], lse/delta [bq, 1] (lse +inf on empty rows)."""
    bq, bk = plan.tiling.block_q_dq, plan.tiling.block_k_dq
    dtype = q.dtype
    precision = plan.precision(dtype)
    q_start = (plan.padded_len // bq - 1 - pl.program_id(0)) * bq
    q_tiles = _rotated_tiles(plan, q, slice(None), cos_q, sin_q)
    do_tile, lse_tile, delta_tile = do[...], lse[...], delta[...]
    seg_rows = seg_q[...] if plan.segmented else None
    kv_limit = not plan.causal and plan.seq_len % bk != 0

    def step(j, dq_accs, masked: bool):
        k_start = pl.multiple_of(j * bk, bk)
        rows = pl.ds(k_start, bk)
        k_tiles = _rotated_tiles(plan, k, rows, cos_k, sin_k)
        s = _scores(plan, q_tiles, k_tiles, precision)
        if masked:
            seg_cols = seg_k[:, rows] if plan.segmented else None
            q_pos, k_pos = _column(q_start, bq), _row(k_start, bk)
            mask = _visible(plan, q_pos, k_pos, seg_rows, seg_cols, kv_limit)
            s = jnp.where(mask, s, MASK_VALUE)
        p = jnp.exp2(s - lse_tile)
        dp = _dot_nt(do_tile, v[rows, :], precision)
        ds = (p * (dp - delta_tile)).astype(dtype)
        return tuple(g + _dot_nn(ds, kc, precision) for g, kc in zip(dq_accs, k_tiles, strict=True))

    carry = tuple(jnp.zeros((bq, size), jnp.float32) for _, size in plan.chunks)
    split, end = _key_loop_bounds(plan, q_start, bq, bk)
    carry = lax.fori_loop(0, split, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(split, end, functools.partial(step, masked=True), carry)
    grads = [g * plan.sm_scale for g in carry]
    if plan.rotary:
        grads[0], grads[1] = rotary.unrotate(grads[0], grads[1], cos_q[...], sin_q[...])
    for (start, size), g in zip(plan.chunks, grads, strict=True):
        dq[:, start : start + size] = g.astype(dq.dtype)


# ------------------------------------------------------------------------------------ pallas_calls


def _pallas(plan: _Plan, kernel: Callable, **kwargs) -> list[jax.Array]:
    return backend_lib.pallas_call_by_name(
        functools.partial(kernel, plan), backend=plan.backend, poison=plan.poison, **kwargs
    )


def _seq_shape(plan: _Plan) -> tuple[int, ...]:
    b, h, t, d = plan.batch, plan.heads, plan.padded_len, plan.head_dim
    return (b, t, h, d) if plan.layout == "bthd" else (b, h, t, d)


def _stat_shape(plan: _Plan) -> tuple[int, ...]:
    return (plan.batch, plan.heads, plan.padded_len, 1)


def _cost(plan: _Plan, matmuls: int, itemsize: int, tensors: int) -> pl.CostEstimate:
    pairs = plan.batch * plan.heads * plan.padded_len**2 * (0.5 if plan.causal else 1.0)
    return pl.CostEstimate(
        flops=int(2 * matmuls * pairs * plan.head_dim),
        transcendentals=int(pairs),
        bytes_accessed=int(tensors * math.prod(_seq_shape(plan)) * itemsize),
    )


def _column_ids(ids):
    return None if ids is None else ids[:, :, None]


def _row_ids(ids):
    return None if ids is None else ids[:, None, :]


def _forward_call(plan: _Plan, q, k, v, seg_q, seg_k, cos, sin):
    t, bq = plan.padded_len, plan.tiling.block_q
    nq = t // bq
    blk = _reversed(nq)
    inputs = [
        ("q", q, plan.seq_spec(bq, blk)),
        ("k", k, plan.seq_spec(t, _whole)),
        ("v", v, plan.seq_spec(t, _whole)),
        ("seg_q", _column_ids(seg_q), plan.segment_column_spec(bq, blk)),
        ("seg_k", _row_ids(seg_k), plan.segment_row_spec()),
        ("cos_q", cos, plan.table_spec(bq, blk)),
        ("sin_q", sin, plan.table_spec(bq, blk)),
        ("cos_k", cos, plan.table_spec(t, _whole)),
        ("sin_k", sin, plan.table_spec(t, _whole)),
    ]
    outputs = [
        ("o", jax.ShapeDtypeStruct(_seq_shape(plan), q.dtype), plan.seq_spec(bq, blk)),
        (
            "lse",
            jax.ShapeDtypeStruct(_stat_shape(plan), jnp.float32),
            plan.stat_column_spec(bq, blk),
        ),
    ]
    o, lse = _pallas(
        plan,
        _forward_kernel,
        name="flash_attention_fwd",
        grid=(nq, plan.batch, plan.heads),
        inputs=inputs,
        outputs=outputs,
        num_warps=plan.tiling.num_warps,
        num_stages=plan.tiling.num_stages,
        cost=_cost(plan, 2, q.dtype.itemsize, 4),
    )
    return o, lse


def _backward_call(plan: _Plan, q, k, v, seg_q, seg_k, cos, sin, do, lse, delta):
    """dq, dk, dv; lse/delta: float32 [batch, heads, T, 1]."""
    t, tiling = plan.padded_len, plan.tiling
    cost = _cost(plan, 5, q.dtype.itemsize, 6)
    as_row = (plan.batch, plan.heads, 1, t)

    bk = tiling.block_k_dkv
    dk, dv = _pallas(
        plan,
        _dkdv_kernel,
        name="flash_attention_dkdv",
        grid=(t // bk, plan.batch, plan.heads),
        inputs=[
            ("q", q, plan.seq_spec(t, _whole)),
            ("k", k, plan.seq_spec(bk, _in_order)),
            ("v", v, plan.seq_spec(bk, _in_order)),
            ("do", do, plan.seq_spec(t, _whole)),
            ("lse", lse.reshape(as_row), plan.stat_row_spec()),
            ("delta", delta.reshape(as_row), plan.stat_row_spec()),
            ("seg_q", _row_ids(seg_q), plan.segment_row_spec()),
            ("seg_k", _column_ids(seg_k), plan.segment_column_spec(bk, _in_order)),
            ("cos_q", cos, plan.table_spec(t, _whole)),
            ("sin_q", sin, plan.table_spec(t, _whole)),
            ("cos_k", cos, plan.table_spec(bk, _in_order)),
            ("sin_k", sin, plan.table_spec(bk, _in_order)),
        ],
        outputs=[
            ("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), plan.seq_spec(bk, _in_order)),
            ("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), plan.seq_spec(bk, _in_order)),
        ],
        num_warps=tiling.num_warps_dkv,
        num_stages=tiling.num_stages_dkv,
        cost=cost,
    )

    bq = tiling.block_q_dq
    nq = t // bq
    blk = _reversed(nq)
    (dq,) = _pallas(
        plan,
        _dq_kernel,
        name="flash_attention_dq",
        grid=(nq, plan.batch, plan.heads),
        inputs=[
            ("q", q, plan.seq_spec(bq, blk)),
            ("k", k, plan.seq_spec(t, _whole)),
            ("v", v, plan.seq_spec(t, _whole)),
            ("do", do, plan.seq_spec(bq, blk)),
            ("lse", lse, plan.stat_column_spec(bq, blk)),
            ("delta", delta, plan.stat_column_spec(bq, blk)),
            ("seg_q", _column_ids(seg_q), plan.segment_column_spec(bq, blk)),
            ("seg_k", _row_ids(seg_k), plan.segment_row_spec()),
            ("cos_q", cos, plan.table_spec(bq, blk)),
            ("sin_q", sin, plan.table_spec(bq, blk)),
            ("cos_k", cos, plan.table_spec(t, _whole)),
            ("sin_k", sin, plan.table_spec(t, _whole)),
        ],
        outputs=[("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), plan.seq_spec(bq, blk))],
        num_warps=tiling.num_warps_dq,
        num_stages=tiling.num_stages_dq,
        cost=cost,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, seg_q, seg_k, cos, sin):
    """(output, base-2 logsumexp [B, H, T, 1]) on padded arrays in the plan's layout."""
    return _forward(plan, q, k, v, seg_q, seg_k, cos, sin)


def _forward(plan: _Plan, q, k, v, seg_q, seg_k, cos, sin):
    if plan.hopper is not None:
        return hopper_lib.forward(plan, plan.hopper, q, k, v, seg_q, seg_k, cos, sin)
    return tuple(_forward_call(plan, q, k, v, seg_q, seg_k, cos, sin))


def _attention_fwd(plan: _Plan, q, k, v, seg_q, seg_k, cos, sin):
    o, lse = _forward(plan, q, k, v, seg_q, seg_k, cos, sin)
    return (o, lse), (q, k, v, seg_q, seg_k, cos, sin, o, lse)


def _attention_bwd(plan: _Plan, residuals, cotangents):
    q, k, v, seg_q, seg_k, cos, sin, o, lse = residuals
    do, dlse = cotangents
    # dS = P * (dP - delta); the logsumexp output adds P * dlse (in natural-log units).
    rowdot = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if plan.layout == "bthd":
        rowdot = jnp.swapaxes(rowdot, 1, 2)
    delta = rowdot[..., None] - dlse * LOG2_E
    # Empty rows (lse -inf) get +inf so that exp2(s - lse) is 0 there instead of inf.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    args = (q, k, v, seg_q, seg_k, cos, sin, do.astype(q.dtype), lse, delta)
    if plan.hopper is not None and hopper_backward.supported(plan):
        dq, dk, dv = hopper_backward.backward(plan, plan.hopper, *args)
    else:
        dq, dk, dv = _backward_call(plan, *args)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------------ public


def _check_inputs(q, k, v, segment_ids, kv_segment_ids, positions, rotary_dim: int) -> None:
    if q.ndim != 4:
        raise InputError(f"q must be [batch, seq, heads, head_dim], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise InputError(f"q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[3] == 0:
        raise InputError(f"head_dim must be positive, got q shape {q.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"q, k, v need one dtype of bfloat16/float16/float32, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    b, t, _, d = q.shape
    for name, ids in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if ids is not None and (ids.shape != (b, t) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise InputError(
                f"{name} must be integer [batch, seq] = {(b, t)}, got {ids.dtype}{list(ids.shape)}"
            )
    if kv_segment_ids is not None and segment_ids is None:
        raise InputError("kv_segment_ids given without segment_ids")
    if rotary_dim < 0 or rotary_dim > d or rotary_dim % 2:
        raise ConfigError(f"rotary_dim={rotary_dim} must be even and within head_dim={d}")
    if (
        positions is not None
        and rotary_dim
        and (
            positions.shape not in ((b, t), (1, t))
            or not jnp.issubdtype(positions.dtype, jnp.integer)
        )
    ):
        raise InputError(
            f"positions must be integer [batch, seq] = {(b, t)}, got "
            f"{positions.dtype}{list(positions.shape)}"
        )


def _check_tiling(tiling: Tiling, backend: str, head_dim: int, rotary_dim: int) -> None:
    for size in tiling.blocks():
        if not backend_lib.is_power_of_two(size):
            raise ConfigError(f"block sizes must be powers of two, got {tiling}")
    if tiling.layout not in (None, "bthd", "bhtd"):
        raise ConfigError(f"Tiling.layout={tiling.layout!r} is not 'bthd' or 'bhtd'")
    if backend == "triton":
        # Triton dots need every operand dim a power of two and at least 16.
        small = [s for s in tiling.blocks() if s < 16]
        chunks = rotary.head_chunks(head_dim, rotary_dim)
        if (
            small
            or not backend_lib.is_power_of_two(head_dim)
            or any(size < 16 for _, size in chunks)
            or (rotary_dim and not backend_lib.is_power_of_two(rotary_dim // 2))
        ):
            raise ConfigError(
                f"the Triton lowering needs blocks >= 16 and head-dim chunks that are powers of two "
                f">= 16; got head_dim={head_dim}, rotary_dim={rotary_dim}, chunks={chunks}, {tiling}"
            )


def flash_attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    kv_segment_ids: jax.Array | None = None,
    tiling: Tiling | None = None,
    backend: str | None = None,
    poison_outputs: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention output and its row logsumexp; both differentiable. See ``flash_attention``.

    Returns (out [batch, seq, heads, head_dim] in q's dtype, lse float32 [batch, heads, seq], natural
    log of the softmax denominator of the scaled scores; -inf for a row that sees no key).
    """
    _check_inputs(q, k, v, segment_ids, kv_segment_ids, positions, rotary_dim)
    b, t, h, d = q.shape
    if q.size == 0:  # no batch row, token or head: nothing to launch (a zero-size grid fails)
        return jnp.zeros_like(q), jnp.zeros((b, h, t), jnp.float32)
    lowering = backend_lib.resolve_backend(interpret, backend)
    hopper = hopper_interpret = None
    if lowering == "mosaic_gpu":
        # Any portable kernel left (head_dim 256's backward) runs on Triton, or interpret on CPU.
        hopper_interpret = bool(interpret)  # like backend="triton": native unless asked
        lowering = "interpret" if hopper_interpret else "triton"
        hopper = hopper_lib.HopperTiling.default(d)
        hopper_lib.check(hopper, q.dtype, d, rotary_dim)
    tiling = tiling or Tiling.default(d, lowering, backend_lib.compute_capability(lowering))
    _check_tiling(tiling, lowering, d, rotary_dim)
    tiling = tiling.fit(t)
    layout = tiling.layout or ("bhtd" if lowering == "mosaic_tpu" else "bthd")
    if hopper is not None:
        layout = "bthd"
    multiple = max(tiling.blocks() + (hopper.blocks() if hopper else ()))
    padded = -(-t // multiple) * multiple
    pad = padded - t

    def pad_seq(x, mode="constant"):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, mode=mode) if pad else x

    seg_q = seg_k = cos = sin = None
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        # Padding repeats the last id: padded rows stay finite; padded keys are masked separately.
        seg_q = pad_seq(segment_ids.astype(jnp.int32), "edge")
        seg_k = pad_seq(kv_ids.astype(jnp.int32), "edge")
    if rotary_dim:
        pos = jnp.arange(t, dtype=jnp.int32)[None] if positions is None else positions
        cos, sin = rotary.rope_tables(pad_seq(pos.astype(jnp.int32), "edge"), rotary_dim, rope_base)
    q, k, v = (pad_seq(x) for x in (q, k, v))
    if layout == "bhtd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    plan = _Plan(
        batch=b,
        heads=h,
        head_dim=d,
        seq_len=t,
        padded_len=padded,
        causal=bool(causal),
        sm_scale=float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale),
        rotary_dim=rotary_dim,
        chunks=rotary.head_chunks(d, rotary_dim),
        segmented=segment_ids is not None,
        tables_batched=cos is not None and cos.shape[0] > 1,
        tiling=tiling,
        backend=lowering,
        layout=layout,
        poison=poison_outputs,
        hopper=hopper,
        hopper_interpret=bool(hopper_interpret),
    )
    out, lse2 = _attention(plan, q, k, v, seg_q, seg_k, cos, sin)
    if layout == "bhtd":
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :t], lse2[:, :, :t, 0] / LOG2_E


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    kv_segment_ids: jax.Array | None = None,
    tiling: Tiling | None = None,
    backend: str | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
    """Fused attention with optional RoPE, as Pallas kernels; differentiable (custom VJP).

    q, k, v: [batch, seq, heads, head_dim], one of bfloat16/float16/float32, any seq length; q and k
    un-rotated. segment_ids: int [batch, seq]; query i sees key j only if the ids are equal (and j <= i
    when causal). kv_segment_ids: the keys' ids if they differ from the queries' (rows that match no key
    give 0). positions: int [batch, seq] (default 0..seq-1), used only when rotary_dim > 0: the first
    rotary_dim dims of q and k are rotated NeoX-style (rotate-half) at these positions with ``rope_base``.
    sm_scale: default 1/sqrt(head_dim). interpret: None = interpret mode on CPU only. tiling: block sizes
    and Triton launch parameters (default ``Tiling.default``). backend: force a lowering
    ("triton", "mosaic_tpu", "interpret"), e.g. to lower for GPU from a CPU host; "mosaic_gpu" runs the
    Hopper kernels of ``flash_attention_hopper`` (bfloat16/float16, head_dim 64/128/256, rotary_dim
    0/32/64; with interpret=True in Pallas' GPU interpret mode).
    poison_outputs: start every kernel output as NaN (a debugging aid that makes unwritten tiles
    visible).

    Returns [batch, seq, heads, head_dim] in q's dtype (float32 accumulation inside).
    """
    out, _ = flash_attention_with_lse(
        q,
        k,
        v,
        segment_ids=segment_ids,
        positions=positions,
        rotary_dim=rotary_dim,
        rope_base=rope_base,
        causal=causal,
        sm_scale=sm_scale,
        interpret=interpret,
        kv_segment_ids=kv_segment_ids,
        tiling=tiling,
        backend=backend,
        poison_outputs=poison_outputs,
    )
    return out
