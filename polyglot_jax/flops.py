"""Training FLOPs per token and peak bf16 FLOP/s per device kind: the two halves of MFU."""

from __future__ import annotations

import jax

from polyglot_jax.model import ModelConfig, count_params

# Dense bf16 peak per device (datasheets), matched by substring of `device.device_kind`, lower case.
# More specific names first.
PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("a10", 125e12),
    ("v100", 125e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x (parameters in matmuls) + attention scores and values (PaLM's appendix B accounting).

    The input embedding is a lookup, not a matmul, so it is left out; attention counts
    12 x layers x d_model x seq_len (forward 2 matmuls x 2 FLOPs, backward twice that), without
    halving for the causal mask, as PaLM and MaxText report it.
    """
    matmul_params = count_params(cfg) - cfg.vocab_size * cfg.d_model
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.d_model * seq_len


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device from the table, or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name in kind:
            return flops
    return None


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The matmul FLOPs per token that `cfg.remat_policy` promises to recompute in the backward,
    beyond `training_flops_per_token` (which the step runs once without remat).

    - none, dots: nothing (dots keeps every matmul output);
    - dots_no_batch: the attention matmuls (scores and values: dots with batch dimensions), 4 x
      d_model x seq_len per layer (with a fused attention kernel the core is no dot at all);
    - full: the forward of every matmul whose output the backward reads: the fused QKV
      (2 x d_model x 3 d_model), the attention and the MLP's up projection (2 x d_model x d_ff);
      the two projections into the residual stream (attention dense, MLP down) only feed the
      residual sum, whose gradient needs their inputs, not their outputs.
    """
    d, layers = cfg.d_model, cfg.num_layers
    attention = 4.0 * layers * d * seq_len if cfg.attention_impl == "xla" else 0.0
    if cfg.remat_policy == "dots_no_batch":
        return attention
    if cfg.remat_policy == "full":
        return attention + 2.0 * layers * (3 * d * d + d * cfg.d_ff)
    return 0.0
