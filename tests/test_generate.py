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


# Sampling: a model whose next-token distribution is the same at every position, so that one
# `generate` call (one compile) yields max_len - len(prompt) independent draws from it. With
# `embed_in` zero every position enters the blocks with the same (zero) vector, attention averages
# position-independent values, and so the logits cannot depend on the prefix; every other weight is
# random. The reference is softmax(logits / T) in float64 from GPTNeoX.apply, not from `generate`.
SAMPLE_CFG = ModelConfig(
    vocab_size=32, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=256,
    dtype="float32",
)  # fmt: skip
SAMPLE_PROMPT = [5, 17, 3]
SAMPLE_SEEDS = (0, 1, 2)  # 3 calls (3 compiles) x 253 draws = 759 draws per temperature


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def constant_logit_model():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from polyglot_jax.model import GPTNeoX

    model = GPTNeoX(SAMPLE_CFG)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    params = dict(jax.tree.unflatten(tree, leaves))
    params["embed_in"] = jnp.zeros_like(params["embed_in"])
    tokens = np.asarray([SAMPLE_PROMPT + list(range(32))], np.int32)
    logits = np.asarray(model.apply({"params": params}, tokens), np.float64)[0]
    params["embed_out"] = params["embed_out"] * (3.0 / logits[0].std())  # logit spread ~3
    logits = np.asarray(model.apply({"params": params}, tokens), np.float64)[0]
    # The premise: every position (prompt or continuation) has the same logits.
    np.testing.assert_allclose(logits, np.broadcast_to(logits[0], logits.shape), atol=1e-4)
    return params, logits[len(SAMPLE_PROMPT) - 1]


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampled_token_frequencies_match_tempered_softmax(constant_logit_model, temperature):
    params, logits = constant_logit_model
    ids, logprobs = [], []
    for seed in SAMPLE_SEEDS:
        i, lp = generate(
            params, SAMPLE_CFG, SAMPLE_PROMPT, greedy=False, temperature=temperature, seed=seed,
            max_new_tokens=SAMPLE_CFG.max_len - len(SAMPLE_PROMPT),
        )  # fmt: skip
        ids += i
        logprobs += lp
    n = len(ids)
    # The returned log-probabilities are of the untempered float32 softmax.
    log_p = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(logprobs, log_p[ids], atol=1e-4)

    want = _softmax(logits / temperature)
    freq = np.bincount(ids, minlength=SAMPLE_CFG.vocab_size) / n
    tv = 0.5 * np.abs(freq - want).sum()
    # The bound: 1.25x the 99.9% quantile of the TV of n exact multinomial draws from `want`
    # (simulated with a fixed numpy seed). The generate seeds are fixed too: deterministic.
    sim = np.random.default_rng(0).multinomial(n, want, size=20000) / n
    sim_tv = 0.5 * np.abs(sim - want).sum(axis=1)
    bound = 1.25 * np.quantile(sim_tv, 0.999)
    print(f"T={temperature}: TV {tv:.3f}, bound {bound:.3f}, mean noise {sim_tv.mean():.3f}")
    assert tv < bound, (tv, bound)
    # ... and the bound separates the likely bugs (argmax; logits * T instead of / T): their
    # distance from `want` exceeds the bound by more than the typical sampling noise.
    argmax = np.eye(SAMPLE_CFG.vocab_size)[np.argmax(logits)]
    for wrong in (argmax, _softmax(logits * temperature)):
        assert 0.5 * np.abs(wrong - want).sum() > bound + sim_tv.mean()
