"""Text generation from a run's checkpoint or a Hugging Face directory (greedy or sampled).

Decoding recomputes the whole (fixed-size, padded) window for every new token: one compiled
function for all steps, exact, and fast enough for the small models and short samples it serves
(the demo, smoke checks of converted checkpoints). There is no KV cache yet.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polyglot_jax.errors import InputError
from polyglot_jax.model import GPTNeoX, ModelConfig


def generate(
    params: Any,
    cfg: ModelConfig,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> tuple[list[int], list[float]]:
    """Continues `prompt_ids`; stops at `eos_id` (included) or after `max_new_tokens`.

    Returns (new ids, their log-probabilities under the model's float32 softmax).
    """
    if not prompt_ids:
        raise InputError("the prompt is empty: give --prompt or --prompt_ids")
    bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise InputError(
            f"prompt id {bad[0]} is outside the model's vocabulary [0, {cfg.vocab_size})"
        )
    window = cfg.max_len
    if len(prompt_ids) + max_new_tokens > window:
        raise InputError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_len {window}"
        )
    model = GPTNeoX(dataclasses.replace(cfg, attention_impl="xla"))

    @jax.jit
    def next_token(params, tokens, length, key):
        logits = model.apply({"params": params}, tokens[None])[0, length - 1].astype(jnp.float32)
        logprobs = jax.nn.log_softmax(logits)
        if greedy:
            token = jnp.argmax(logits)
        else:
            token = jax.random.categorical(key, logits / temperature)
        return token, logprobs[token]

    tokens = np.zeros(window, np.int32)
    tokens[: len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)
    key = jax.random.key(seed)
    ids, logprobs = [], []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token, logprob = jax.device_get(next_token(params, jnp.asarray(tokens), length, sub))
        ids.append(int(token))
        logprobs.append(float(logprob))
        tokens[length] = token
        length += 1
        if eos_id is not None and int(token) == eos_id:
            break
    return ids, logprobs


def load_tokenizer_dir(path: pathlib.Path | None):
    """A `transformers` tokenizer from a directory, or None when no tokenizer is known."""
    if path is None:
        return None
    from polyglot_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def load_from_workdir(workdir: str | pathlib.Path, step: int | None = None):
    """(model config, params, tokenizer dir or None) of a run's checkpoint (latest by default)."""
    from polyglot_jax.checkpoint import load_params
    from polyglot_jax.workdir import load_run_config, run_tokenizer

    config = load_run_config(workdir)
    cfg = ModelConfig.from_config(config.model)
    return cfg, load_params(workdir, step, cfg), run_tokenizer(config, pathlib.Path(workdir))


def load_from_hf(hf_dir: str | pathlib.Path):
    """(model config, params, tokenizer dir or None) of a Hugging Face GPT-NeoX directory."""
    from polyglot_jax.hf import mapping
    from polyglot_jax.hf.files import HFWeights, read_hf_config

    hf_dir = pathlib.Path(hf_dir)
    cfg = ModelConfig(**mapping.from_hf_config(read_hf_config(hf_dir)), dtype="float32")
    weights = HFWeights(hf_dir)
    try:
        state = {key: weights.get(key).astype(np.float32) for key in weights.keys()}
    finally:
        weights.close()
    params = mapping.from_hf_state_dict(state, cfg)
    tokenizer = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return cfg, params, tokenizer
