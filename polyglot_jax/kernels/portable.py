"""The portable flash-attention kernels: Pallas Triton (GPU), Mosaic TPU and interpret mode (CPU).

Forward (FlashAttention-2): each program owns one tile of query rows and walks the key/value tiles with an
online softmax, so no ``T x T`` matrix ever reaches HBM; it writes the output and the row logsumexp.
Backward: two kernels that recompute the scores tile by tile, one owning a key tile (dK, dV) and one a
query tile (dQ); neither materialises the ``T x T`` matrix and neither needs atomics.

RoPE: q and k arrive un-rotated. Every kernel rotates the first ``rotary_dim`` dims of each q/k tile it
loads, from float32 cos/sin tables at the given positions (packed documents restart positions), and the
backward applies the transposed rotation to dQ/dK before writing them. Scores are a sum of per-chunk
dots (see ``rope_tiles.head_chunks``), so no in-register array is ever sliced.

Layouts: the Triton and interpret lowerings read ``[batch, seq, heads, head_dim]`` in place (strided
tiles); Mosaic TPU needs the sequence in the second-minor position, so there ``flash_attention`` hands
these kernels ``[batch, heads, seq, head_dim]`` arrays (``Plan.layout``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax.kernels import backend as backend_lib
from polyglot_jax.kernels import rope_tiles
from polyglot_jax.kernels.plan import LOG2_E, MASK_VALUE, Plan


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


def _rotated_tiles(plan: Plan, ref, rows, cos, sin) -> list[jax.Array]:
    """Head-dim chunks of ``ref[rows]`` (q or k), RoPE applied in-kernel when the plan has it."""
    if not plan.rotary:
        return rope_tiles.load_rotated(ref, rows, plan.chunks, False, None, None)
    return rope_tiles.load_rotated(ref, rows, plan.chunks, True, cos[rows, :], sin[rows, :])


def _scores(plan: Plan, q_tiles, k_tiles, precision):
    """Base-2 scaled scores ``(q . k) * sm_scale * log2(e)`` as a sum of per-chunk dots, f32."""
    s = _dot_nt(q_tiles[0], k_tiles[0], precision)
    for qc, kc in zip(q_tiles[1:], k_tiles[1:], strict=True):
        s = s + _dot_nt(qc, kc, precision)
    return s * (plan.sm_scale * LOG2_E)


def _visible(plan: Plan, q_pos, k_pos, seg_q, seg_k, kv_limit: bool):
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


def _key_loop_bounds(plan: Plan, q_start, bq: int, bk: int):
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
    plan: Plan,
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
    plan: Plan,
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
        grads[0], grads[1] = rope_tiles.unrotate(grads[0], grads[1], cos_k[...], sin_k[...])
    for (start, size), g in zip(plan.chunks, grads, strict=True):
        dk[:, start : start + size] = g.astype(dk.dtype)
    dv[...] = dv_acc.astype(dv.dtype)


def _dq_kernel(
    plan: Plan,
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
        grads[0], grads[1] = rope_tiles.unrotate(grads[0], grads[1], cos_q[...], sin_q[...])
    for (start, size), g in zip(plan.chunks, grads, strict=True):
        dq[:, start : start + size] = g.astype(dq.dtype)


# ------------------------------------------------------------------------------------ pallas_calls


def _pallas(plan: Plan, kernel: Callable, **kwargs) -> list[jax.Array]:
    return backend_lib.pallas_call_by_name(
        functools.partial(kernel, plan), backend=plan.backend, poison=plan.poison, **kwargs
    )


def _seq_shape(plan: Plan) -> tuple[int, ...]:
    b, h, t, d = plan.batch, plan.heads, plan.padded_len, plan.head_dim
    return (b, t, h, d) if plan.layout == "bthd" else (b, h, t, d)


def _stat_shape(plan: Plan) -> tuple[int, ...]:
    return (plan.batch, plan.heads, plan.padded_len, 1)


def _cost(plan: Plan, matmuls: int, itemsize: int, tensors: int) -> pl.CostEstimate:
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


def forward(plan: Plan, q, k, v, seg_q, seg_k, cos, sin):
    """(o in q's dtype, base-2 logsumexp float32 [B, H, T, 1]) on padded arrays in the plan's layout."""
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


def backward(plan: Plan, q, k, v, seg_q, seg_k, cos, sin, do, lse, delta):
    """dq, dk, dv; lse/delta: float32 [batch, heads, T, 1] (lse +inf on rows that see no key)."""
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
