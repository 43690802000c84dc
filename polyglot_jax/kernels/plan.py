"""What is static about one flash-attention call: tile sizes, the call plan, and shared constants.

Shared by the public API (``flash_attention``), the portable kernels (``portable``) and the Hopper
kernels (``hopper_forward``, ``hopper_backward``); it imports none of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from polyglot_jax.kernels import rope_tiles

# Finite, so exp2(s - m) stays NaN-free for a row that has seen no visible key yet; a real score
# can never be this small, which is how fully masked rows are recognised at the end.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)


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
class HopperTiling:
    """Tile sizes of the Hopper (Mosaic GPU) kernels.

    block_q: query rows per compute warp group (a wgmma is 64 rows); block_k: key rows per TMA
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one attention call (hashable: the custom_vjp's non-differentiable arg)."""

    batch: int
    heads: int
    head_dim: int
    seq_len: int  # real length T
    padded_len: int  # T rounded up to a multiple of every block
    causal: bool
    sm_scale: float
    rotary_dim: int
    chunks: tuple[rope_tiles.Chunk, ...]
    segmented: bool
    tables_batched: bool  # cos/sin are [batch, T, rot/2] (else [1, T, rot/2], shared)
    tiling: Tiling
    # The portable kernels' lowering; with hopper_tiling, that of any kernel the Hopper set lacks
    # (head_dim 256's backward): "triton", or "interpret" in GPU interpret mode.
    backend: str
    layout: str  # "bthd" or "bhtd"
    poison: bool
    hopper_tiling: HopperTiling | None = None  # set for backend="mosaic_gpu": the Hopper kernels
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
