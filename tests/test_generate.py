"""Greedy generation and its log-probabilities equal transformers' on the same random model."""

import numpy as np
import pytest
import torch
from hf_reference import random_hf_model

from polyglot_jax.errors import InputError
from polyglot_jax.generate import generate, load_from_hf
from polyglot_jax.model import ModelConfig

CFG = ModelConfig(
    vocab_size=128, num_layers=2, d_model=64, d_ff=128, num_heads=4, rotary_dim=8, max_len=64
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = random_hf_model(CFG, seed=3, std=0.5)
    model.save_pretrained(directory)
    return directory, model


def test_greedy_ids_and_logprobs_match_transformers(hf_dir):
    directory, model = hf_dir
    cfg, params, tokenizer = load_from_hf(directory)
    assert tokenizer is None and cfg.vocab_size == 128
    prompt = [5, 17, 99, 3]
    ids, logprobs = generate(params, cfg, prompt, max_new_tokens=12, greedy=True)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, output_scores=True,
            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert ids == out.sequences[0, len(prompt) :].tolist()
    want = [
        torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, ids, strict=True)
    ]
    np.testing.assert_allclose(logprobs, want, atol=1e-4)


def test_stops_at_eos_and_sampling_is_seeded(hf_dir):
    cfg, params, _ = load_from_hf(hf_dir[0])
    ids, _ = generate(params, cfg, [1, 2, 3], max_new_tokens=20, greedy=True)
    stop = ids[4]
    cut, _ = generate(params, cfg, [1, 2, 3], max_new_tokens=20, greedy=True, eos_id=stop)
    assert cut == ids[: ids.index(stop) + 1]
    a = generate(params, cfg, [1, 2, 3], max_new_tokens=10, greedy=False, seed=7)
    b = generate(params, cfg, [1, 2, 3], max_new_tokens=10, greedy=False, seed=7)
    assert a == b


def test_too_long_or_bad_prompts(hf_dir):
    cfg, params, _ = load_from_hf(hf_dir[0])
    with pytest.raises(InputError, match="exceeds the model's max_len 64"):
        generate(params, cfg, [1] * 60, max_new_tokens=10)
    with pytest.raises(
        InputError, match=r"prompt id 128 is outside the model's vocabulary \[0, 128\)"
    ):
        generate(params, cfg, [1, 128], max_new_tokens=1)
