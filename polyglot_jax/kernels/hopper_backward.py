"""The flash-attention backward for Hopper (sm_90) in Pallas Mosaic GPU: a dQ and a dK/dV kernel.

The math of the portable backward kernels in ``portable`` (scores recomputed tile by tile from the
forward's base-2 logsumexp, ``dS = P * (dP - delta)``, RoPE applied to q/k tiles in-kernel and its
transpose to dQ/dK at the end), laid out like the Hopper forward in ``hopper_forward``:
per program, each compute warp group owns one tile (64 query rows for dQ, 64 key rows for dK/dV)
and a TMA warp group streams the other side's tiles through a ring of shared-memory slots.

Shared memory holds both sides' tiles plus float32 cos/sin tiles, which fits the H100's 227 KiB
for head_dim up to 128 only; head_dim 256 keeps the Triton backward (``supported``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax.kernels import rope_tiles
from polyglot_jax.kernels.hopper_common import (
    COMPUTE_REGISTERS,
    TMA_REGISTERS,
    Head,
    Registers,
    chunk_smem,
    launch,
    mosaic_gpu,
    n_tile_copies,
    pass_over,
    release,
    rotated_chunks,
    smem,
    stream,
    visible,
)
from polyglot_jax.kernels.plan import LOG2_E, MASK_VALUE, HopperTiling, Plan


def supported(plan: Plan) -> bool:
    """Whether the Hopper backward's buffers fit shared memory for this plan."""
    return plan.head_dim <= 128


def _unrotated(regs: Registers, plan: Plan, grads: list, table_bufs, index) -> list:
    """Per-chunk float32 gradients of a rotated tile, scaled by sm_scale and rotated back."""
    grads = [g * plan.sm_scale for g in grads]
    if plan.rotary:
        cos, sin = regs.load(table_bufs[0].at[index]), regs.load(table_bufs[1].at[index])
        grads[0], grads[1] = rope_tiles.unrotate(grads[0], grads[1], cos, sin)
    return grads


def _store(plgpu, head: Head, name: str, rows, grads: list, chunk_bufs, index) -> None:
    """Write per-chunk gradients through the owned tile's (now free) chunk buffers to ``name``."""
    for c, g in enumerate(grads):
        chunk_bufs[c].at[index][...] = g.astype(chunk_bufs[c].dtype)
    plgpu.commit_smem()
    for c, (start, size) in enumerate(head.plan.chunks):
        plgpu.copy_smem_to_gmem(
            chunk_bufs[c].at[index], head.refs[name].at[head.b, rows, head.h, pl.ds(start, size)]
        )


def _side_buffers(plgpu, plan: Plan, dtype, count: int, rows: int, queries: bool) -> tuple:
    """Shared buffers for ``count`` tiles of ``rows`` rows of one side of attention: (head-dim
    chunks, a full [rows, D] tile, lse, delta, cos/sin, segment ids). The full tile is dO on the
    query side and V on the key side; lse/delta exist on the query side only."""
    stat = lambda: plgpu.SMEM((count, rows), jnp.float32) if queries else None  # noqa: E731
    return (
        chunk_smem(plgpu, plan, count, rows, dtype),
        smem(plgpu, (count, rows, plan.head_dim), dtype, True),
        stat(),
        stat(),
        [smem(plgpu, (count, rows, plan.rotary_dim // 2), jnp.float32, True) for _ in range(2)]
        if plan.rotary
        else None,
        plgpu.SMEM((count, rows), jnp.int32) if plan.segmented else None,
    )


def _side_copies(plan: Plan, queries: bool) -> int:
    """TMA copies ``_load_side`` makes for one tile: the tile, then dO, lse, delta or V."""
    return n_tile_copies(plan) + (3 if queries else 1)


def _load_side(plgpu, head: Head, bufs: tuple, rows, index, barrier, queries: bool) -> None:
    """TMA one tile of a side (see ``_side_buffers``) into ``bufs[...].at[index]``."""
    chunks, full, lse, delta, tables, seg = bufs
    refs, b, h = head.refs, head.b, head.h
    if queries:
        head.copy_tile("q", "seg_q", rows, chunks, tables, seg, index, barrier)
        plgpu.copy_gmem_to_smem(refs["do"].at[b, rows, h], full.at[index], barrier)
        plgpu.copy_gmem_to_smem(refs["lse"].at[b, h, rows], lse.at[index], barrier)
        plgpu.copy_gmem_to_smem(refs["delta"].at[b, h, rows], delta.at[index], barrier)
    else:
        head.copy_tile("k", "seg_k", rows, chunks, tables, seg, index, barrier)
        plgpu.copy_gmem_to_smem(refs["v"].at[b, rows, h], full.at[index], barrier)


def _private_halves(plgpu, plan: Plan, dtype, groups: int, rows: int):
    """Each compute group's buffers for the rotated halves of a streamed (shared) tile."""
    if not plan.rotary:
        return None
    return [smem(plgpu, (groups, rows, plan.rotary_dim // 2), dtype, True) for _ in range(2)]


def _dq_kernel(plan: Plan, tiling: HopperTiling, names: list[str], *refs):
    """Program: ``groups`` query tiles of block_q rows; streams key tiles of block_k rows."""
    plgpu = mosaic_gpu()
    regs = Registers(plan.hopper_interpret)
    refs = dict(zip(names, refs, strict=True))
    chunks, dtype = plan.chunks, refs["q"].dtype
    bq, bk, stages, groups = tiling.block_q, tiling.block_k, tiling.stages, tiling.groups
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    head = Head(refs, plan, b, h)
    tile = plan.padded_len // tiling.rows_per_program - 1 - lax.axis_index("q_seq")
    n_real = pl.cdiv(plan.seq_len, bk)
    if plan.causal:
        program_end = (tile + 1) * tiling.rows_per_program
        program_steps = jnp.minimum(pl.cdiv(program_end, bk), n_real)
    else:
        program_steps = n_real

    def body(own, ring, kr, q_bar, loaded, free):
        q_smem, do_smem, lse_smem, delta_smem, qtab, segq = own
        k_smem, v_smem, _, _, ktab, segk = ring

        @pl.when(wg < groups)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            q_start = tile * tiling.rows_per_program + wg * bq
            rows = pl.ds(q_start, bq)
            _load_side(plgpu, head, own, rows, wg, q_bar.at[wg], queries=True)
            plgpu.barrier_wait(q_bar.at[wg])
            q_chunks = rotated_chunks(regs, plan, q_smem, qtab, wg, None, None, in_place=True)
            lse_rows = regs.load(lse_smem.at[wg], "rows")
            delta_rows = regs.load(delta_smem.at[wg], "rows")
            seg_rows = regs.load(segq.at[wg], "rows") if plan.segmented else None

            def step(j, grads, masked: bool):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(loaded.at[slot])
                k_chunks = rotated_chunks(regs, plan, k_smem, ktab, slot, kr, wg, in_place=False)
                terms = [(q_chunks[c], k_chunks[c], True) for c in range(len(chunks))]
                s = regs.matmul((bq, bk), terms) * (plan.sm_scale * LOG2_E)
                if masked:
                    seg_cols = regs.load(segk.at[slot], "columns") if plan.segmented else None
                    mask = visible(regs, plan, (bq, bk), q_start, j * bk, seg_rows, seg_cols)
                    s = jnp.where(mask, s, MASK_VALUE)
                p = jnp.exp2(s - lax.broadcast_in_dim(lse_rows, s.shape, [0]))
                dp = regs.matmul((bq, bk), [(do_smem.at[wg], v_smem.at[slot], True)])
                ds = (p * (dp - lax.broadcast_in_dim(delta_rows, s.shape, [0]))).astype(dtype)
                grads = tuple(
                    regs.matmul(g.shape, [(ds, k_chunks[c], False)], into=g)
                    for c, g in enumerate(grads)
                )
                release(free.at[slot])
                return grads

            if plan.causal:
                steps = jnp.minimum(pl.cdiv(q_start + bq, bk), n_real)
                split = 0 if plan.segmented else jnp.minimum(lax.div(q_start, bk), steps)
            else:
                steps = n_real
                split = 0 if plan.segmented or plan.seq_len % bk else n_real
            grads = tuple(regs.cast(jnp.zeros((bq, n), jnp.float32), "tile") for _, n in chunks)
            grads = lax.fori_loop(0, split, functools.partial(step, masked=False), grads)
            grads = lax.fori_loop(split, steps, functools.partial(step, masked=True), grads)
            pass_over(steps, program_steps, 0, stages, (loaded,), (free,))
            grads = _unrotated(regs, plan, list(grads), qtab, wg)
            _store(plgpu, head, "dq", rows, grads, q_smem, wg)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == groups)
        def _stream():
            plgpu.set_max_registers(TMA_REGISTERS, action="decrease")

            def issue(j, slot):
                keys = pl.ds(j * bk, bk)
                _load_side(plgpu, head, ring, keys, slot, loaded.at[slot], queries=False)

            stream(0, program_steps, stages, issue, (free,))

    pl.run_scoped(
        body,
        _side_buffers(plgpu, plan, dtype, groups, bq, queries=True),
        _side_buffers(plgpu, plan, dtype, stages, bk, queries=False),
        _private_halves(plgpu, plan, dtype, groups, bk),
        plgpu.Barrier(num_arrivals=_side_copies(plan, True), num_barriers=groups),
        plgpu.Barrier(num_arrivals=_side_copies(plan, False), num_barriers=stages),
        plgpu.Barrier(num_arrivals=groups, num_barriers=stages),
        collective_axes="wg",
    )


def _dkdv_kernel(plan: Plan, tiling: HopperTiling, names: list[str], *refs):
    """Program: ``groups`` key tiles of block_q rows (the wgmma M side); streams query tiles of
    block_k rows. Scores are computed transposed, ``S^T = K Q^T``, so nothing needs a transpose."""
    plgpu = mosaic_gpu()
    regs = Registers(plan.hopper_interpret)
    refs = dict(zip(names, refs, strict=True))
    chunks, dtype, d = plan.chunks, refs["q"].dtype, plan.head_dim
    bk, bq, stages, groups = tiling.block_q, tiling.block_k, tiling.stages, tiling.groups
    b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    head = Head(refs, plan, b, h)
    program_start = lax.axis_index("k_seq") * tiling.rows_per_program
    n_real = pl.cdiv(plan.seq_len, bq)
    # The first query tile any group needs (none, for key tiles past the last real query).
    begin = jnp.minimum(lax.div(program_start, bq), n_real) if plan.causal else 0

    def body(own, ring, qr, k_bar, loaded, free):
        k_smem, v_own, _, _, ktab, segk = own
        q_smem, do_smem, lse_smem, delta_smem, qtab, segq = ring

        @pl.when(wg < groups)
        def _compute():
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            k_start = program_start + wg * bk
            rows = pl.ds(k_start, bk)
            _load_side(plgpu, head, own, rows, wg, k_bar.at[wg], queries=False)
            plgpu.barrier_wait(k_bar.at[wg])
            k_chunks = rotated_chunks(regs, plan, k_smem, ktab, wg, None, None, in_place=True)
            seg_keys = regs.load(segk.at[wg], "rows") if plan.segmented else None

            def step(i, carry, masked: bool):
                dv, dks = carry
                slot = lax.rem(i - begin, stages)
                plgpu.barrier_wait(loaded.at[slot])
                q_chunks = rotated_chunks(regs, plan, q_smem, qtab, slot, qr, wg, in_place=False)
                terms = [(k_chunks[c], q_chunks[c], True) for c in range(len(chunks))]
                s_t = regs.matmul((bk, bq), terms) * (plan.sm_scale * LOG2_E)
                if masked:
                    seg_q = regs.load(segq.at[slot], "columns") if plan.segmented else None
                    mask = visible(
                        regs, plan, (bk, bq), k_start, i * bq, seg_keys, seg_q, transposed=True
                    )
                    s_t = jnp.where(mask, s_t, MASK_VALUE)
                lse_cols = regs.load(lse_smem.at[slot], "columns")
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse_cols, s_t.shape, [1]))
                dv = regs.matmul((bk, d), [(p_t.astype(dtype), do_smem.at[slot], False)], into=dv)
                dp_t = regs.matmul((bk, bq), [(v_own.at[wg], do_smem.at[slot], True)])
                delta_cols = regs.load(delta_smem.at[slot], "columns")
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_cols, s_t.shape, [1]))
                ds_t = ds_t.astype(dtype)
                dks = tuple(
                    regs.matmul(g.shape, [(ds_t, q_chunks[c], False)], into=g)
                    for c, g in enumerate(dks)
                )
                release(free.at[slot])
                return dv, dks

            first = jnp.minimum(lax.div(k_start, bq), n_real) if plan.causal else 0
            # Padded keys need no mask: each key's dK/dV depends on its own row alone.
            if plan.segmented:
                split = end = n_real
            elif plan.causal:  # query tiles from `split` on see every key of this tile
                split, end = jnp.minimum(pl.cdiv(k_start + bk, bq), n_real), n_real
            else:
                split, end = first, n_real
            carry = (
                regs.cast(jnp.zeros((bk, d), jnp.float32), "tile"),
                tuple(regs.cast(jnp.zeros((bk, n), jnp.float32), "tile") for _, n in chunks),
            )
            pass_over(begin, first, begin, stages, (loaded,), (free,))
            carry = lax.fori_loop(first, split, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(split, end, functools.partial(step, masked=False), carry)
            dv, dks = carry
            _store(plgpu, head, "dk", rows, _unrotated(regs, plan, list(dks), ktab, wg), k_smem, wg)
            v_own.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(v_own.at[wg], refs["dv"].at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == groups)
        def _stream():
            plgpu.set_max_registers(TMA_REGISTERS, action="decrease")

            def issue(i, slot):
                queries = pl.ds(i * bq, bq)
                _load_side(plgpu, head, ring, queries, slot, loaded.at[slot], queries=True)

            stream(begin, n_real, stages, issue, (free,))

    pl.run_scoped(
        body,
        _side_buffers(plgpu, plan, dtype, groups, bk, queries=False),
        _side_buffers(plgpu, plan, dtype, stages, bq, queries=True),
        _private_halves(plgpu, plan, dtype, groups, bq),
        plgpu.Barrier(num_arrivals=_side_copies(plan, False), num_barriers=groups),
        plgpu.Barrier(num_arrivals=_side_copies(plan, True), num_barriers=stages),
        plgpu.Barrier(num_arrivals=groups, num_barriers=stages),
        collective_axes="wg",
    )


def backward(plan: Plan, tiling: HopperTiling, q, k, v, seg_q, seg_k, cos, sin, do, lse, delta):
    """(dq, dk, dv) [B, T, H, D] in q's dtype on padded bthd arrays.

    lse/delta: float32 [B, H, T, 1], base 2, lse +inf on rows that see no key (as the portable
    backward takes them); the rest as in ``hopper_forward.forward``.
    """
    inputs = {
        "q": q,
        "k": k,
        "v": v,
        "do": do,
        "lse": lse[..., 0],
        "delta": delta[..., 0],
        "seg_q": seg_q,
        "seg_k": seg_k,
        "cos": cos,
        "sin": sin,
    }
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    dq = launch(_dq_kernel, plan, tiling, inputs, {"dq": like(q)}, "q_seq")["dq"]
    dkdv = launch(_dkdv_kernel, plan, tiling, inputs, {"dk": like(k), "dv": like(v)}, "k_seq")
    return dq, dkdv["dk"], dkdv["dv"]
