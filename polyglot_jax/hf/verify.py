"""Checks an exported HF directory against the workdir it came from: transformers' logits on the
export vs our model's on the checkpoint, both in float32 (`convert to-hf --verify`)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from polyglot_jax.checkpoint import load_params
from polyglot_jax.errors import InputError
from polyglot_jax.hf.convert import OUTPUT_DTYPES
from polyglot_jax.model import ModelConfig
from polyglot_jax.workdir import load_run_config


def _our_logits(params: Any, cfg: ModelConfig, batches: list[np.ndarray]) -> list[np.ndarray]:
    import jax

    from polyglot_jax.model import GPTNeoX

    model = GPTNeoX(dataclasses.replace(cfg, dtype="float32", attention_impl="xla"))
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return [np.asarray(apply(params, t), np.float64) for t in batches]


def _hf_logits(hf_dir: pathlib.Path, batches: list[np.ndarray]) -> list[np.ndarray]:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise InputError(f"verification needs transformers and torch ({e})") from None
    model, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if type(model).__name__ != "GPTNeoXForCausalLM" or bad:
        raise InputError(f"transformers loads {hf_dir} as {type(model).__name__} with {bad}")
    model.eval()
    with torch.no_grad():
        return [model(torch.as_tensor(t)).logits.double().numpy() for t in batches]


def _random_batches(cfg: ModelConfig, batches: int, seq_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    seq_len = min(seq_len, cfg.max_len)
    return [rng.integers(0, cfg.vocab_size, (2, seq_len), dtype=np.int32) for _ in range(batches)]


def verify_hf_against_workdir(
    hf_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    hf_weights_dtype: str | None = None,
    batches: int = 3,
    seq_len: int = 32,
) -> float:
    """Max |logits difference| between transformers on `hf_dir` and our model on `workdir`'s
    checkpoint, on random token batches [2, seq_len], both computing in float32. With
    `hf_weights_dtype` (the dtype `to_hf` wrote), our weights are first rounded to it, so that
    both sides hold the same numbers and the difference measures the conversion, not rounding.
    Loads both models whole."""
    import jax

    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
    cfg = ModelConfig.from_config(load_run_config(workdir).model)
    cast = OUTPUT_DTYPES[hf_weights_dtype] if hf_weights_dtype else None
    tokens = _random_batches(cfg, batches, seq_len)
    theirs = _hf_logits(hf_dir, tokens)
    params = load_params(workdir, step, cfg)
    if cast is not None:  # the weights the HF side holds: compare computation, not rounding
        params = jax.tree.map(lambda p: np.asarray(p).astype(cast).astype(np.float32), params)
    ours = _our_logits(params, cfg, tokens)
    return max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs, strict=True))
