"""Builds small random HF `GPTNeoXForCausalLM` models: the independent reference for parity tests.

Also the one place that says what happens without torch: ``require_torch()`` returns torch or
skips (the calling test, or the whole module when called at import time) with ``NO_TORCH``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from polyglot_jax.hf.mapping import to_hf_config
from polyglot_jax.model import ModelConfig

NO_TORCH = (
    "torch is not installed: the Python 3.12 line has no CPU torch wheel here (only multi-GB CUDA "
    "builds), so the transformers references run on the Python 3.11 line"
)


def require_torch():
    """torch, or a pytest skip saying why it is missing.

    Only where setup.cfg installs none (Python 3.12 on): on 3.11 the test extra pins torch, so a
    failing import there is a broken install and raises instead of skipping.
    """
    if sys.version_info < (3, 12):
        import torch

        return torch
    return pytest.importorskip("torch", reason=NO_TORCH)


def random_hf_model(cfg: ModelConfig, seed: int = 0, std: float = 0.2):
    """A float32 HF model with the architecture of `cfg` and random weights (biases and LN too)."""
    torch = require_torch()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

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


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    torch = require_torch()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()
