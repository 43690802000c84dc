"""Builds small random HF `GPTNeoXForCausalLM` models: the independent reference for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from polyglot_jax.hf.mapping import to_hf_config
from polyglot_jax.model import ModelConfig


def random_hf_model(cfg: ModelConfig, seed: int = 0, std: float = 0.2) -> GPTNeoXForCausalLM:
    """A float32 HF model with the architecture of `cfg` and random weights (biases and LN too)."""
    fields = {
        k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")
    }
    fields["torch_dtype"] = "float32"
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def hf_state_dict(model: GPTNeoXForCausalLM) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model: GPTNeoXForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()
