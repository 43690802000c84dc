"""The flash-attention forward for Hopper (sm_90) GPUs in Pallas Mosaic GPU: TMA, wgmma, warp groups.

Same contract as the portable forward in ``flash_attention`` (causal, packed segments, fused partial
RoPE, padded rows, empty rows give 0 and logsumexp -inf). Its backward is in
``flash_attention_hopper_backward``; this module also holds the pieces both share.

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

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax.errors import ConfigError

if TYPE_CHECKING:
    from polyglot_jax.kernels.flash_attention import _Plan

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)
# Per-thread registers after rebalancing (multiples of 8; 2 * 128 * 232 + 128 * 40 <= 65,536).
COMPUTE_REGISTERS, TMA_REGISTERS = 232, 40


@dataclasses.dataclass(frozen=True)
class HopperTiling:
    """block_q: query rows per compute warp group (a wgmma is 64 rows); block_k: key rows per TMA
    tile; stages: K/V tiles in flight; groups: compute warp groups per program (1 or 2; two take
    turns on the tensor cores)."""

    block_q: int = 64
    block_k: int = 64
    stages: int = 2
    groups: int = 2

    @classmethod
    def default(cls, head_dim: int) -> HopperTiling:
        """Buffers that fit the H100's 227 KiB of shared memory (checked when lowering): head_dim
        256 leaves room for one compute group only. Not yet timed on hardware."""
        return cls(groups=2 if head_dim <= 128 else 1)

    @property
    def rows_per_program(self) -> int:
        return self.groups * self.block_q

    def blocks(self) -> tuple[int, ...]:
        """Sizes the padded sequence length must be a multiple of (the K/V stream's first
        ``stages`` tiles are sliced statically, so they must lie inside the padded sequence)."""
        return (self.rows_per_program, self.block_k * self.stages)


# What the kernels take (lowering checks the rest): wgmma and TMA want 64-wide head-dim tiles, and the
# private rotated-k buffers of rotary_dim 128 overflow the 227 KiB of shared memory.
HEAD_DIMS = (64, 128, 256)
ROTARY_DIMS = (0, 32, 64)


def check(tiling: HopperTiling, dtype, head_dim: int, rotary_dim: int) -> None:
    """Refuse, with one line, what the Hopper kernel cannot do (wgmma, TMA, shared-memory limits)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"backend='mosaic_gpu' takes bfloat16 or float16 q/k/v, got {dtype}")
    if head_dim not in HEAD_DIMS or rotary_dim not in ROTARY_DIMS:
        raise ConfigError(
            f"backend='mosaic_gpu' takes head_dim in {HEAD_DIMS} and rotary_dim in {ROTARY_DIMS}, "
            f"got head_dim={head_dim}, rotary_dim={rotary_dim}"
        )
    if (
        tiling.block_q != 64
        or tiling.block_k % 64
        or tiling.stages < 2
        or tiling.groups not in (1, 2)
    ):
        raise ConfigError(
            f"HopperTiling needs block_q 64, block_k a multiple of 64, stages >= 2 and groups 1 or 2, "
            f"got {tiling}"
        )


def _plgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def _smem(plgpu, shape: tuple[int, ...], dtype, swizzled: bool):
    """A shared buffer; wgmma operands get the (8, swizzle) tiling and the widest swizzle that fits."""
    if not swizzled:
        return plgpu.SMEM(shape, dtype)
    row_bytes = shape[-1] * jnp.dtype(dtype).itemsize
    swizzle = max(s for s in (32, 64, 128) if row_bytes % s == 0)
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


@dataclasses.dataclass(frozen=True)
class Head:
    """What a program works on: the kernel's GMEM refs by name, and its batch row and head."""

    refs: dict
    plan: _Plan
    b: jax.Array
    h: jax.Array

    def copy_tile(self, name, seg_name, rows, chunk_bufs, table_bufs, seg_buf, index, barrier):
        """TMA the ``rows`` of q or k (head-dim chunks, cos/sin rows, segment ids ``seg_name``) into
        ``buffers[index]``. One barrier counts every copy (its num_arrivals = n_tile_copies)."""
        refs, b, h = self.refs, self.b, self.h
        copies = [
            (refs[name].at[b, rows, h, pl.ds(start, size)], chunk_bufs[c].at[index])
            for c, (start, size) in enumerate(self.plan.chunks)
        ]
        if self.plan.rotary:
            table_b = b if self.plan.tables_batched else 0
            copies += [
                (refs["cos"].at[table_b, rows], table_bufs[0].at[index]),
                (refs["sin"].at[table_b, rows], table_bufs[1].at[index]),
            ]
        if self.plan.segmented:
            copies.append((refs[seg_name].at[b, rows], seg_buf.at[index]))
        for src, dst in copies:
            _plgpu().copy_gmem_to_smem(src, dst, barrier)


def n_tile_copies(plan: _Plan) -> int:
    """TMA copies ``Head.copy_tile`` makes for one tile."""
    return len(plan.chunks) + 2 * plan.rotary + plan.segmented


def _kernel(plan: _Plan, tiling: HopperTiling, names: list[str], *refs):
    plgpu = _plgpu()
    regs = _Registers(plan.hopper_interpret)
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
                plgpu.barrier_arrive(k_free.at[slot])

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
                plgpu.barrier_arrive(v_free.at[slot])
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
        [_smem(plgpu, (g, bq, n), dtype, True) for _, n in chunks],
        [_smem(plgpu, (g, bk, half), dtype, True) for _ in range(2)] if rotary else None,
        plgpu.SMEM((g, bq), jnp.float32),
        [_smem(plgpu, (g, bq, half), jnp.float32, True) for _ in range(2)] if rotary else None,
        plgpu.SMEM((g, bq), jnp.int32) if segmented else None,
    )
    ring = (
        [_smem(plgpu, (stages, bk, n), dtype, True) for _, n in chunks],
        _smem(plgpu, (stages, bk, d), dtype, True),
        [_smem(plgpu, (stages, bk, half), jnp.float32, True) for _ in range(2)] if rotary else None,
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


@dataclasses.dataclass(frozen=True)
class _Registers:
    """Register arrays in wgmma layouts: "tile" ([rows, cols] as a wgmma accumulator), "rows" (one
    value per tile row) and "columns" (one per tile column). Tiles loaded in the same layout combine
    elementwise whatever their dtype. GPU interpret mode knows no layouts: plain arrays there."""

    interpret: bool

    def _layout(self, kind: str):
        wgmma = _plgpu().Layout.WGMMA
        return {"tile": wgmma, "rows": wgmma.reduce(1), "columns": wgmma.reduce(0)}[kind]

    def cast(self, x: jax.Array, kind: str) -> jax.Array:
        return x if self.interpret else _plgpu().layout_cast(x, self._layout(kind))

    def load(self, ref, kind: str = "tile") -> jax.Array:
        return ref[...] if self.interpret else _plgpu().load(ref, (), layout=self._layout(kind))

    def matmul(self, shape: tuple[int, int], terms: list[tuple], *, into: jax.Array | None = None,
               while_running: Callable[[], None] | None = None) -> jax.Array:  # fmt: skip
        """float32 ``into + sum(a @ (b.T if transposed else b))`` over terms (a: ref or array, b:
        ref; ``into`` defaults to zeros). ``while_running()`` runs after the wgmmas are issued and
        before their result is awaited.

        On the GPU: wgmmas into one accumulator (``into`` itself, no second register tile). The
        interpreter's wgmma takes neither register operands nor transposed refs, so there it is a
        plain dot of the same shared-memory contents: only the tensor-core instruction itself goes
        unsimulated.
        """
        if self.interpret:
            total = jnp.zeros(shape, jnp.float32) if into is None else into
            for a, b, transposed in terms:
                a = a if isinstance(a, jax.Array) else a[...]
                dims = (((1,), (1 if transposed else 0,)), ((), ()))
                total += lax.dot_general(a, b[...], dims, preferred_element_type=jnp.float32)
            if while_running is not None:
                while_running()
            return total
        plgpu = _plgpu()

        def issue(acc_ref):
            for a, b, transposed in terms:
                plgpu.wgmma(acc_ref, a, b.transpose((1, 0)) if transposed else b)
            if while_running is not None:
                while_running()

        if into is not None:
            return pl.run_state(issue)(plgpu.ACC.init(into))

        def issue_and_read(acc_ref):
            issue(acc_ref)
            return acc_ref[...]

        return pl.run_scoped(issue_and_read, plgpu.ACC(shape, jnp.float32))

    def iota(self, shape: tuple[int, int], dimension: int) -> jax.Array:
        layout = None if self.interpret else self._layout("tile")
        return _plgpu().broadcasted_iota(jnp.int32, shape, dimension, layout=layout)


def stream(begin, end, stages: int, issue: Callable, free: Sequence) -> None:
    """The TMA warp group's loop: ``issue(j, slot)`` for tiles ``begin <= j < end`` into ring slot
    ``(j - begin) % stages``, reusing a slot only once every compute group has freed it (``free``:
    one barrier array per buffer kind); finally observe the last frees, so that every phase of every
    barrier is waited on (Pallas' GPU interpreter checks that)."""
    plgpu = _plgpu()
    for i in range(stages):
        pl.when(begin + i < end)(functools.partial(issue, begin + i, jnp.int32(i)))

    def wait_free(j):
        slot = lax.rem(j - begin, stages)
        for barrier in free:
            plgpu.barrier_wait(barrier.at[slot])
        return slot

    @pl.loop(begin + stages, end)
    def _(j):
        issue(j, wait_free(j))

    @pl.loop(jnp.maximum(end - stages, begin), end)
    def _(j):
        wait_free(j)


def pass_over(lo, hi, begin, stages: int, loaded: Sequence, free: Sequence,
              turns: Callable[[], object] | None = None) -> None:  # fmt: skip
    """A compute group's turn on tiles ``lo <= j < hi`` that it has no use for: wait for each (every
    waiter must observe each phase) and hand its slot back at once; ``turns()``, if given, takes
    the schedule-barrier turns a real tile would have taken."""
    plgpu = _plgpu()

    def body(j, _):
        slot = lax.rem(j - begin, stages)
        for barrier in loaded:
            plgpu.barrier_wait(barrier.at[slot])
        for barrier in free:
            plgpu.barrier_arrive(barrier.at[slot])
        if turns is not None:
            turns()

    lax.fori_loop(lo, hi, body, None)


def visible(regs: _Registers, plan: _Plan, shape, row_start, col_start, seg_rows, seg_cols, *,
            transposed: bool = False):  # fmt: skip
    """bool [rows, cols]: which (query, key) pairs of a tile may attend. Rows are queries and
    columns keys, or the reverse when ``transposed``; seg_rows/seg_cols: ids in "rows"/"columns"
    layout, or None. Keys past the sequence are masked when not causal (causal masks them anyway)."""
    rows = row_start + regs.iota(shape, 0)
    cols = col_start + regs.iota(shape, 1)
    q_pos, k_pos = (cols, rows) if transposed else (rows, cols)
    mask = None
    if plan.causal:
        mask = q_pos >= k_pos
    elif plan.seq_len < plan.padded_len:
        mask = k_pos < plan.seq_len
    if seg_rows is not None:
        same = lax.broadcast_in_dim(seg_rows, shape, [0]) == lax.broadcast_in_dim(
            seg_cols, shape, [1]
        )
        mask = same if mask is None else jnp.logical_and(mask, same)
    return jnp.ones(shape, jnp.bool_) if mask is None else mask


def rotated_chunks(regs: _Registers, plan: _Plan, chunk_bufs, table_bufs, index, dst_bufs, dst_index,
                   *, in_place: bool) -> list:  # fmt: skip
    """Refs of one q/k tile's head-dim chunks (``chunk_bufs[c].at[index]``) with RoPE applied to the
    first two: rotated in place, or into ``dst_bufs[0/1].at[dst_index]`` (a compute group's private
    buffers, when the tile is shared). Fenced for wgmma, which reads through the async proxy."""
    refs = [buf.at[index] for buf in chunk_bufs]
    if not plan.rotary:
        return refs
    cos, sin = table_bufs[0].at[index], table_bufs[1].at[index]
    dst = refs[:2] if in_place else [dst_bufs[0].at[dst_index], dst_bufs[1].at[dst_index]]
    _rotate_into(regs, refs[0], refs[1], cos, sin, dst[0], dst[1])
    _plgpu().commit_smem()
    return dst + refs[2:]


def _rotate_into(regs: _Registers, src1, src2, cos_ref, sin_ref, dst1, dst2) -> None:
    """NeoX rotate-half of one tile's two halves, in float32; may write over its sources."""
    x1, x2 = regs.load(src1).astype(jnp.float32), regs.load(src2).astype(jnp.float32)
    cos, sin = regs.load(cos_ref), regs.load(sin_ref)
    dst1[...] = (x1 * cos - x2 * sin).astype(dst1.dtype)
    dst2[...] = (x2 * cos + x1 * sin).astype(dst2.dtype)


def launch(
    kernel: Callable, plan: _Plan, tiling: HopperTiling, inputs: dict, out_type, grid_name: str
):
    """``plgpu.kernel`` over (heads, tiles, batch) with ``tiling.groups`` compute warp groups and a TMA
    one. kernel(plan, tiling, names, *refs) gets the non-None inputs, then the outputs, by name."""
    plgpu = _plgpu()
    names = [n for n, x in inputs.items() if x is not None]
    out_names = list(out_type)
    b, t, h, _ = inputs["q"].shape
    params = {}
    if plan.hopper_interpret:  # public from jax 0.11 on
        params_cls = getattr(plgpu, "InterpretGPUParams", None)
        if params_cls is None:
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params_cls

        params["interpret"] = params_cls(detect_races=True, uninitialized_memory="nan")
    outs = plgpu.kernel(
        functools.partial(kernel, plan, tiling, names + out_names),
        out_type=tuple(out_type.values()),
        grid=(h, t // tiling.rows_per_program, b),
        grid_names=("heads", grid_name, "batch"),
        num_threads=tiling.groups + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **params,
    )(*(inputs[n] for n in names))
    return {n: _vary_like(inputs["q"], x) for n, x in zip(out_names, outs, strict=True)}


def _vary_like(like: jax.Array, x: jax.Array) -> jax.Array:
    """x marked as varying over every manual mesh axis ``like`` varies over (inside shard_map with
    check_vma, plgpu.kernel's outputs carry no such type; custom_vjp insists on matching types)."""
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x: jax.Array) -> set[str]:
    aval = jax.typeof(x)
    if hasattr(aval, "mat"):  # jax 0.10
        return set(aval.mat.varying)
    return set(getattr(aval, "vma", ()))


def forward(plan: _Plan, tiling: HopperTiling, q, k, v, seg_q, seg_k, cos, sin):
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
