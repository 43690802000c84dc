"""Pallas kernels: fused causal flash attention with partial NeoX RoPE, and a standalone RoPE kernel.

Imports only jax, numpy and the standard library (the GPU benchmark machine has nothing else).
"""

from polyglot_jax.kernels.flash_attention import flash_attention, flash_attention_with_lse
from polyglot_jax.kernels.plan import Tiling
from polyglot_jax.kernels.rope_kernel import rope

__all__ = ["Tiling", "flash_attention", "flash_attention_with_lse", "rope"]
