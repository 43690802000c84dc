"""The flash-attention forward for Hopper (sm_90) GPUs in Pallas Mosaic GPU: TMA, wgmma, warp groups.

Same contract as the portable forward in ``portable`` (causal, packed segments, fused partial RoPE,
padded rows, empty rows give 0 and logsumexp -inf). Its backward is in ``hopper_backward``; the
pieces both share are in ``hopper_common``.

Structure (after FlashAttention-3 and jax's ``attention_mgpu`` example): a program owns
``groups * block_q`` query rows of one (batch, head). Each of its ``groups`` compute warp groups (two;
one for head_dim 256, whose buffers leave no room for a second) owns ``block_q`` rows; one more warp
group streams K/V tiles with TMA into a ring of ``stages`` shared-memory slots, each slot guarded by
a "loaded" barrier (TMA → compute) and a "consumed" barrier (compute → TMA). Two compute groups
take turns on the tensor cores (FlashAttention-3's ping-pong): a shared "schedule" barrier lets one
group's wgmmas run while the other does its softmax. The PV product accumulates straight into the
output accumulator. Not yet timed on hardware.

Fused RoPE without lane shuffles: TMA fetches q and k as head-dim chunks ``[0, r/2)``, ``[r/2, r)``,
``[r, D)`` into separate shared buffers, so each rotate-half pair sits at the same place of two
register tiles and the rotation is elementwise (float32, from float32 cos/sin tiles of the given
positions). Each compute group writes its rotated k halves to a private buffer; the scores are a sum
of one wgmma per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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


def _kernel(plan: Plan, tiling: HopperTiling, names: list[str], *refs):
    plgpu = mosaic_gpu()
    regs = Registers(plan.hopper_interpret)
    refs = dict(zip(names, refs, strict=True))
    v_ref, o_ref, lse_ref = refs["v"], refs["o"], refs["lse"]
    chunks = plan.chunks
    dtype = refs["q"].dtype
    bq, bk, stages = tiling.block_q, tiling.block_k, tiling.stages
    rotary, segmented = plan.rotary, plan.segmented
    d = plan.head_dim
    n_programs = plan.padded_len // tiling.rows_per_program
    n_real = pl.cdiv(plan.seq_len, bk)
    kv_limit = not plan.causal and plan.seq_len % bk != 0

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    # Causal programs near the end do the most work: launch them first.
    tile = n_programs - 1 - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    if plan.causal:
        program_end = tile * tiling.rows_per_program + tiling.rows_per_program
        program_steps = jnp.minimum(pl.cdiv(program_end, bk), n_real)
    else:
        program_steps = n_real

    copy_tile = Head(refs, plan, b, h).copy_tile

    def body(scoped):
        q_smem, kr_smem, lse_smem, qtab_smem, segq_smem = scoped["compute"]
        k_smem, v_smem, ktab_smem, segk_smem = scoped["ring"]
        q_bar, k_bar, v_bar = scoped["loaded"]
        k_free, v_free = scoped["consumed"]
        turn = scoped["schedule"]

        def take_turn():
            """Ping-pong: both groups meet here, so each waits while the other's wgmmas run."""
            if turn is not None:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        @pl.when(wg < tiling.groups)
        def _compute():
            # Registers move to the compute groups (accumulators); the TMA group needs few.
            plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
            q_start = tile * tiling.rows_per_program + wg * bq
            rows = pl.ds(q_start, bq)
            copy_tile("q", "seg_q", rows, q_smem, qtab_smem, segq_smem, wg, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            rotated_chunks(regs, plan, q_smem, qtab_smem, wg, None, None, in_place=True)
            seg_rows = None
            if segmented:
                seg_rows = regs.load(segq_smem.at[wg], "rows")

            if plan.causal:
                steps = jnp.minimum(pl.cdiv(q_start + bq, bk), n_real)
                # Tiles before `split` need no mask (none, for rows past the last real key).
                split = 0 if segmented else jnp.minimum(lax.div(q_start, bk), steps)
            else:
                steps = n_real
                split = 0 if (segmented or kv_limit) else n_real

            def step(j, carry, masked: bool):
                acc, m, denom = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                k_chunks = rotated_chunks(
                    regs, plan, k_smem, ktab_smem, slot, kr_smem, wg, in_place=False
                )
                s = regs.matmul(
                    (bq, bk),
                    [(q_smem[c].at[wg], k_chunks[c], True) for c in range(len(chunks))],
                    while_running=take_turn,
                )
                s = s * (plan.sm_scale * LOG2_E)
                if masked:
                    seg_cols = regs.load(segk_smem.at[slot], "columns") if segmented else None
                    mask = visible(regs, plan, (bq, bk), q_start, j * bk, seg_rows, seg_cols)
                    s = jnp.where(mask, s, MASK_VALUE)
                release(k_free.at[slot])

                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                denom = denom * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p = p.astype(dtype)
                if turn is not None:  # the softmax is done: hand the tensor cores over
                    acc, m_new, denom, p = lax.optimization_barrier((acc, m_new, denom, p))
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                if turn is not None:
                    plgpu.barrier_wait(turn)

                acc = regs.matmul((bq, d), [(p, v_smem.at[slot], False)], into=acc)
                release(v_free.at[slot])
                return acc, m_new, denom

            carry = (
                regs.cast(jnp.zeros((bq, d), jnp.float32), "tile"),
                regs.cast(jnp.full((bq,), MASK_VALUE, jnp.float32), "rows"),
                regs.cast(jnp.zeros((bq,), jnp.float32), "rows"),
            )
            # Group 1 starts half a step behind group 0; each takes two turns per tile, the tiles
            # it passes over included, and group 0 one more at the end, so the counts match.
            pl.when(wg == 1)(take_turn)
            carry = lax.fori_loop(0, split, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(split, steps, functools.partial(step, masked=True), carry)
            pass_over(
                steps, program_steps, 0, stages, (k_bar, v_bar), (k_free, v_free),
                turns=lambda: (take_turn(), take_turn()),
            )  # fmt: skip
            pl.when(wg == 0)(take_turn)
            acc, m, denom = carry

            empty = m == MASK_VALUE  # the row saw no visible key
            inv = 1.0 / jnp.where(empty, 1.0, denom)
            out = acc * lax.broadcast_in_dim(jnp.where(empty, 0.0, inv), acc.shape, [0])
            # q's buffers are free now: the output leaves through them, chunk by chunk.
            out = out.astype(dtype)
            for c, (start, size) in enumerate(chunks):
                q_smem[c].at[wg][...] = out[:, start : start + size]
            lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, m + jnp.log2(denom))
            plgpu.commit_smem()
            for c, (start, size) in enumerate(chunks):
                plgpu.copy_smem_to_gmem(q_smem[c].at[wg], o_ref.at[b, rows, h, pl.ds(start, size)])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == tiling.groups)
        def _stream():
            plgpu.set_max_registers(TMA_REGISTERS, action="decrease")

            def issue(j, slot):
                keys = pl.ds(j * bk, bk)
                copy_tile("k", "seg_k", keys, k_smem, ktab_smem, segk_smem, slot, k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])

            stream(0, program_steps, stages, issue, (k_free, v_free))

    n_copies = n_tile_copies(plan)
    half = plan.rotary_dim // 2
    g = tiling.groups
    compute = (
        chunk_smem(plgpu, plan, g, bq, dtype),
        [smem(plgpu, (g, bk, half), dtype, True) for _ in range(2)] if rotary else None,
        plgpu.SMEM((g, bq), jnp.float32),
        [smem(plgpu, (g, bq, half), jnp.float32, True) for _ in range(2)] if rotary else None,
        plgpu.SMEM((g, bq), jnp.int32) if segmented else None,
    )
    ring = (
        chunk_smem(plgpu, plan, stages, bk, dtype),
        smem(plgpu, (stages, bk, d), dtype, True),
        [smem(plgpu, (stages, bk, half), jnp.float32, True) for _ in range(2)] if rotary else None,
        plgpu.SMEM((stages, bk), jnp.int32) if segmented else None,
    )
    pl.run_scoped(
        lambda *scoped: body(
            dict(zip(("compute", "ring", "loaded", "consumed", "schedule"), scoped, strict=True))
        ),
        compute,
        ring,
        (
            plgpu.Barrier(num_arrivals=n_copies, num_barriers=g),
            plgpu.Barrier(num_arrivals=n_copies, num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        ),
        (plgpu.Barrier(num_arrivals=g, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=g) if g == 2 else None,  # ping-pong turns
        collective_axes="wg",
    )


def forward(plan: Plan, tiling: HopperTiling, q, k, v, seg_q, seg_k, cos, sin):
    """(o [B, T, H, D] in q's dtype, base-2 logsumexp float32 [B, H, T, 1]) on padded bthd arrays.

    seg_q/seg_k: int32 [B, T] or None; cos/sin: float32 [B or 1, T, rotary_dim // 2] or None.
    """
    b, t, h, d = q.shape
    inputs = {"q": q, "k": k, "v": v, "seg_q": seg_q, "seg_k": seg_k, "cos": cos, "sin": sin}
    out_type = {
        "o": jax.ShapeDtypeStruct((b, t, h, d), q.dtype),
        "lse": jax.ShapeDtypeStruct((b, h, t), jnp.float32),
    }
    outs = launch(_kernel, plan, tiling, inputs, out_type, "q_seq")
    return outs["o"], outs["lse"][..., None]
