"""What the Hopper (sm_90, Pallas Mosaic GPU) kernels share: their contract, buffers, registers, loops.

``hopper_forward`` and ``hopper_backward`` are both built from these pieces: ``check`` (what they
accept), ``Head.copy_tile`` (TMA of one q or k tile with its cos/sin rows and segment ids),
``Registers`` (register arrays in wgmma layouts, or plain arrays in GPU interpret mode),
``stream``/``pass_over`` (the TMA warp group's ring and a compute group's skipped tiles), ``visible``
(the tile mask), ``rotated_chunks`` (fused RoPE in shared memory) and ``launch`` (``plgpu.kernel``
with warp specialisation).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax import jax_compat
from polyglot_jax.errors import ConfigError
from polyglot_jax.kernels.plan import HopperTiling, Plan

# Per-thread registers after rebalancing (multiples of 8; 2 * 128 * 232 + 128 * 40 <= 65,536).
COMPUTE_REGISTERS, TMA_REGISTERS = 232, 40

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


def mosaic_gpu():
    """``jax.experimental.pallas.mosaic_gpu``, imported on first use (only the Hopper path needs it)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def smem(plgpu, shape: tuple[int, ...], dtype, swizzled: bool, column: int = 0):
    """A shared buffer; wgmma operands get the (8, swizzle) tiling and the widest swizzle that fits.

    ``column``: where the buffer's columns start in the GMEM row it is copied from or to by TMA. A
    tile must not straddle that start (Mosaic GPU checks this from jax 0.11 on: a 64-wide chunk at
    column 32 takes the 64-byte swizzle, whose tiles are 32 bf16 wide, not the 128-byte one).
    """
    if not swizzled:
        return plgpu.SMEM(shape, dtype)
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes, start_bytes = shape[-1] * itemsize, column * itemsize
    swizzle = max(s for s in (32, 64, 128) if row_bytes % s == 0 and start_bytes % s == 0)
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def chunk_smem(plgpu, plan: Plan, lead: int, rows: int, dtype) -> list:
    """One swizzled buffer ``[lead, rows, size]`` per head-dim chunk of ``plan`` (``Head.copy_tile``
    fills them from, and the kernels write results through them to, columns ``start:start+size``)."""
    return [smem(plgpu, (lead, rows, size), dtype, True, start) for start, size in plan.chunks]


@dataclasses.dataclass(frozen=True)
class Head:
    """What a program works on: the kernel's GMEM refs by name, and its batch row and head."""

    refs: dict
    plan: Plan
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
            mosaic_gpu().copy_gmem_to_smem(src, dst, barrier)


def n_tile_copies(plan: Plan) -> int:
    """TMA copies ``Head.copy_tile`` makes for one tile."""
    return len(plan.chunks) + 2 * plan.rotary + plan.segmented


@dataclasses.dataclass(frozen=True)
class Registers:
    """Register arrays in wgmma layouts: "tile" ([rows, cols] as a wgmma accumulator), "rows" (one
    value per tile row) and "columns" (one per tile column). Tiles loaded in the same layout combine
    elementwise whatever their dtype. GPU interpret mode knows no layouts: plain arrays there."""

    interpret: bool

    def _layout(self, kind: str):
        wgmma = mosaic_gpu().Layout.WGMMA
        return {"tile": wgmma, "rows": wgmma.reduce(1), "columns": wgmma.reduce(0)}[kind]

    def cast(self, x: jax.Array, kind: str) -> jax.Array:
        return x if self.interpret else mosaic_gpu().layout_cast(x, self._layout(kind))

    def load(self, ref, kind: str = "tile") -> jax.Array:
        return ref[...] if self.interpret else jax_compat.mosaic_gpu_load(ref, self._layout(kind))

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
        plgpu = mosaic_gpu()

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
        return mosaic_gpu().broadcasted_iota(jnp.int32, shape, dimension, layout=layout)


def stream(begin, end, stages: int, issue: Callable, free: Sequence) -> None:
    """The TMA warp group's loop: ``issue(j, slot)`` for tiles ``begin <= j < end`` into ring slot
    ``(j - begin) % stages``, reusing a slot only once every compute group has freed it (``free``:
    one barrier array per buffer kind); finally observe the last frees, so that every phase of every
    barrier is waited on (Pallas' GPU interpreter checks that)."""
    plgpu = mosaic_gpu()
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


def release(barrier) -> None:
    """Hand a ring slot back to the TMA warp group once this compute group is done reading it.

    ``commit_smem`` first: the group read the slot through the generic proxy (RoPE, segment ids,
    and every read in GPU interpret mode), and the TMA copy that refills it writes through the
    async proxy, so the reads must be fenced before the "free" barrier lets that copy start.
    Pallas' GPU interpreter checks this from jax 0.11 on (a data race otherwise).
    """
    plgpu = mosaic_gpu()
    plgpu.commit_smem()
    plgpu.barrier_arrive(barrier)


def pass_over(lo, hi, begin, stages: int, loaded: Sequence, free: Sequence,
              turns: Callable[[], object] | None = None) -> None:  # fmt: skip
    """A compute group's turn on tiles ``lo <= j < hi`` that it has no use for: wait for each (every
    waiter must observe each phase) and hand its slot back at once; ``turns()``, if given, takes
    the schedule-barrier turns a real tile would have taken."""
    plgpu = mosaic_gpu()

    def body(j, _):
        slot = lax.rem(j - begin, stages)
        for barrier in loaded:
            plgpu.barrier_wait(barrier.at[slot])
        for barrier in free:
            plgpu.barrier_arrive(barrier.at[slot])
        if turns is not None:
            turns()

    lax.fori_loop(lo, hi, body, None)


def visible(regs: Registers, plan: Plan, shape, row_start, col_start, seg_rows, seg_cols, *,
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


def rotated_chunks(regs: Registers, plan: Plan, chunk_bufs, table_bufs, index, dst_bufs, dst_index,
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
    mosaic_gpu().commit_smem()
    return dst + refs[2:]


def _rotate_into(regs: Registers, src1, src2, cos_ref, sin_ref, dst1, dst2) -> None:
    """NeoX rotate-half of one tile's two halves, in float32; may write over its sources."""
    x1, x2 = regs.load(src1).astype(jnp.float32), regs.load(src2).astype(jnp.float32)
    cos, sin = regs.load(cos_ref), regs.load(sin_ref)
    dst1[...] = (x1 * cos - x2 * sin).astype(dst1.dtype)
    dst2[...] = (x2 * cos + x1 * sin).astype(dst2.dtype)


def launch(
    kernel: Callable, plan: Plan, tiling: HopperTiling, inputs: dict, out_type, grid_name: str
):
    """``plgpu.kernel`` over (heads, tiles, batch) with ``tiling.groups`` compute warp groups and a TMA
    one. kernel(plan, tiling, names, *refs) gets the non-None inputs, then the outputs, by name."""
    plgpu = mosaic_gpu()
    names = [n for n, x in inputs.items() if x is not None]
    out_names = list(out_type)
    b, t, h, _ = inputs["q"].shape
    params = {}
    if plan.hopper_interpret:
        params["interpret"] = jax_compat.interpret_gpu_params(
            detect_races=True, uninitialized_memory="nan"
        )
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
    return {n: jax_compat.vary_like(inputs["q"], x) for n, x in zip(out_names, outs, strict=True)}
