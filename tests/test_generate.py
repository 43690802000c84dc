"""KV-cache generation against independent references: transformers' `generate` on the same random
weights (ids and log-probabilities), a full re-computation of the model for every token (no cache),
HF's semantics for eos / min_new_tokens, one device against a sharded mesh, and sampled token
frequencies against softmax(logits / T). The logits processors themselves are checked against
transformers' classes and numpy in test_generate_processors.py."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import random_hf_model, require_torch

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.generate import Generator, Knobs, Sampling, decode_loop
from polyglot_jax.generate_weights import load_from_hf
from polyglot_jax.model import GPTNeoX, ModelConfig, init_params
from polyglot_jax.partitioning import make_mesh, resolve_mesh_shape, rules_from_config

CFG = ModelConfig(
    vocab_size=128, num_layers=2, d_model=64, d_ff=128, num_heads=4, rotary_dim=8, max_len=64
)
# Different lengths in one batch (left padding), one past the first prompt bucket (16).
PROMPTS = [[5, 17, 99, 3], [1, 2], list(range(30, 50))]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = random_hf_model(CFG, seed=3, std=0.5)
    model.save_pretrained(directory)
    return directory, model


def _hf_greedy(model, prompt, max_new, **kwargs):
    """transformers' greedy ids and the float64 log-softmax of its raw logits at each new token."""
    torch = require_torch()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, **{"eos_token_id": None, **kwargs},
        )  # fmt: skip
    ids = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.logits, ids, strict=True)
    ]
    return ids, logprobs


def test_greedy_batch_matches_transformers(hf_model):
    directory, model = hf_model
    cfg, params, tokenizer = load_from_hf(directory)
    assert tokenizer is None and cfg.dtype == "float32"  # the checkpoint's dtype
    results = Generator(params, cfg, batch_size=4).generate(
        PROMPTS, Sampling(max_new_tokens=12, greedy=True)
    )
    for prompt, (completion,) in zip(PROMPTS, results, strict=True):
        ids, logprobs = _hf_greedy(model, prompt, 12)
        assert completion.ids == ids and completion.finish == "length"
        np.testing.assert_allclose(completion.logprobs, logprobs, atol=1e-4)


def test_eos_and_min_new_tokens_as_transformers(hf_model):
    directory, model = hf_model
    cfg, params, _ = load_from_hf(directory)
    gen = Generator(params, cfg)
    free, _ = _hf_greedy(model, PROMPTS[0], 20)
    eos = free[4]
    for min_new in (0, 6):
        (c,) = gen.generate(
            [PROMPTS[0]],
            Sampling(max_new_tokens=20, greedy=True, eos_id=eos, min_new_tokens=min_new),
        )[0]
        ids, logprobs = _hf_greedy(model, PROMPTS[0], 20, eos_token_id=eos, min_new_tokens=min_new)
        # transformers pads finished rows with pad_token_id; the completion ends at the eos.
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert c.ids == ids and c.finish == ("eos" if ids[-1] == eos else "length")
        np.testing.assert_allclose(c.logprobs, logprobs[: len(ids)], atol=1e-4)
        assert eos not in c.ids[:min_new]


def test_stop_sequences_end_a_row_and_others_run_on(hf_model):
    cfg, params, _ = load_from_hf(hf_model[0])
    gen = Generator(params, cfg)
    free = [c.ids for (c,) in gen.generate(PROMPTS, Sampling(max_new_tokens=16, greedy=True))]
    stop = tuple(free[0][5:7])
    cut = gen.generate(PROMPTS, Sampling(max_new_tokens=16, greedy=True, stop=(stop,)))
    first = next(i for i in range(1, 16) if tuple(free[0][i - 1 : i + 1]) == stop)
    assert cut[0][0].ids == free[0][: first + 1] and cut[0][0].finish == "stop"
    for row, (c,) in zip(free[1:], cut[1:], strict=True):  # rows without the bigram run on
        if not any(tuple(row[i : i + 2]) == stop for i in range(15)):
            assert c.ids == row and c.finish == "length"


def _full_recomputation(params, cfg, prompt, max_new):
    """Greedy by running the whole (scanned, uncached) model over the growing sequence."""
    model = GPTNeoX(dataclasses.replace(cfg, attention_impl="xla"))
    # One fixed window, padded on the right: causal attention keeps the padding out of position
    # len(seq) - 1, so one compile serves every length.
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t[None])[0])
    seq = list(prompt)
    for _ in range(max_new):
        window = np.zeros(cfg.max_len, np.int32)
        window[: len(seq)] = seq
        seq.append(int(jnp.argmax(forward(params, window)[len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_greedy_equals_full_recomputation(impl):
    """Prefill runs the configured attention (the Pallas kernel, interpreted, with left padding
    as segments); the cached steps must then agree token for token with no cache at all."""
    cfg = dataclasses.replace(CFG, dtype="float32", attention_impl=impl)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)  # decisive logits
    results = Generator(params, cfg).generate(PROMPTS, Sampling(max_new_tokens=8, greedy=True))
    for prompt, (c,) in zip(PROMPTS, results, strict=True):
        assert c.ids == _full_recomputation(params, cfg, prompt, 8)


def _loop_body(hlo: str, shape: str) -> str:
    """The text of the while loop body of an optimised HLO module that carries `shape` most."""

    def body(name: str) -> str:
        start = hlo.index(f"\n{name} (")
        return hlo[start : hlo.index("\n}", start)]

    bodies = [body(n) for n in set(re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo))]
    return max(bodies, key=lambda b: b.count(shape))


@pytest.mark.parametrize("rows", [1, 4])
def test_decode_step_updates_the_cache_in_place(rows):
    """No decode step copies a layer's cache: the compiled loop body holds no copy of a [rows,
    heads, columns, head_dim] buffer. (A copy per layer per step cost a quarter of the step at
    batch 16 on CPU: a lax.cond around the forward pass, or XLA:CPU's default copy insertion.)"""
    cfg = dataclasses.replace(CFG, dtype="float32", scan_layers=False)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    gen = Generator(params, cfg, batch_size=rows)
    prompt_len, max_new = 16, 8
    fn = decode_loop(gen.cfg, gen.row_sharding, rows, prompt_len, max_new, ())
    args = (
        np.zeros((rows, prompt_len), np.int32), np.zeros(rows, np.int32), np.ones(rows, bool),
        np.zeros((rows, 2), np.uint32), Knobs.of(Sampling(greedy=True)),
    )  # fmt: skip
    with jax.set_mesh(gen.mesh), nn.logical_axis_rules(gen.rules):
        hlo = fn.lower(params, *args).compile().as_text()
    cache = f"f32[{rows},{cfg.num_heads},{prompt_len + max_new},{cfg.head_dim}]"
    body = _loop_body(hlo, cache)
    assert body.count(f"{cache}{{") >= 2 * cfg.num_layers  # the buffers are in the loop
    # copy instructions and copy fusions (XLA names both %copy...) of a whole cache buffer
    copy = re.compile(rf"%copy[\w.\-]* = {re.escape(cache)}\{{")
    copies = [line.strip() for line in body.splitlines() if copy.search(line)]
    assert not copies, copies[:3]


def test_mixed_prompt_lengths_compile_per_bucket_only(hf_model):
    cfg, params, _ = load_from_hf(hf_model[0])
    gen = Generator(params, cfg, batch_size=2)
    before = decode_loop.cache_info().misses
    prompts = [[3] * n for n in (1, 2, 5, 9, 15, 16, 17, 20, 31)]  # buckets 16 and 32
    results = gen.generate(prompts, Sampling(max_new_tokens=2, greedy=True))
    assert [len(r[0].ids) for r in results] == [2] * len(prompts)
    # rows: 2 per batch except a last batch of 1 -> (rows 2, 1) x (buckets 16, 32) at most
    assert decode_loop.cache_info().misses - before <= 4


def test_sharded_mesh_equals_one_device(hf_model):
    """model:2 (heads and the cache's heads split) x data:2 x fsdp:2 over the 8 fake devices."""
    cfg, params, _ = load_from_hf(hf_model[0])
    sampling = Sampling(max_new_tokens=10, temperature=0.8, top_k=20, num_samples=2, seed=5)
    one = Generator(params, cfg).generate(PROMPTS, sampling)
    greedy_one = Generator(params, cfg).generate(PROMPTS, Sampling(max_new_tokens=10, greedy=True))

    from polyglot_jax.config import base_config

    mesh_cfg = base_config().mesh
    mesh_cfg.update(data=2, fsdp=2, model=2)
    mesh = make_mesh(resolve_mesh_shape(mesh_cfg, jax.device_count()))
    rules = rules_from_config(mesh_cfg.rules)
    cfg_s, params_s, _ = load_from_hf(hf_model[0], mesh=mesh, rules=rules)
    qkv = params_s["layers_0"]["attention"]["qkv_kernel"]
    assert qkv.sharding.spec[1] == "model"  # really split over heads
    gen = Generator(params_s, cfg_s, mesh=mesh, rules=rules)
    assert gen.row_multiple == 4
    for a, b in zip(gen.generate(PROMPTS, sampling), one, strict=True):
        assert [c.ids for c in a] == [c.ids for c in b]
    greedy = gen.generate(PROMPTS, Sampling(max_new_tokens=10, greedy=True))
    for (a,), (b,) in zip(greedy, greedy_one, strict=True):
        assert a.ids == b.ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_samples_are_seeded_per_row(hf_model):
    """Same seed, same samples, whatever the batch size; another seed, other samples; the samples
    of one prompt differ from each other."""
    cfg, params, _ = load_from_hf(hf_model[0])
    sampling = Sampling(max_new_tokens=12, num_samples=3, seed=11)
    a = Generator(params, cfg, batch_size=16).generate(PROMPTS, sampling)
    b = Generator(params, cfg, batch_size=1).generate(PROMPTS, sampling)
    c = Generator(params, cfg).generate(PROMPTS, dataclasses.replace(sampling, seed=12))
    ids = lambda r: [[x.ids for x in samples] for samples in r]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)[0]}) == 3


def test_bad_prompts_and_settings(hf_model):
    cfg, params, _ = load_from_hf(hf_model[0])
    gen = Generator(params, cfg)
    with pytest.raises(InputError, match=r"prompt 1 \(60 tokens\).*exceeds the model's max_len 64"):
        gen.generate([[1], [1] * 60], Sampling(max_new_tokens=10))
    with pytest.raises(InputError, match=r"id 128 is outside the model's vocabulary \[0, 128\)"):
        gen.generate([[1, 128]], Sampling(max_new_tokens=1))
    with pytest.raises(InputError, match="prompt 0 is empty"):
        gen.generate([[]], Sampling())
    for field, value, message in [
        ("temperature", float("nan"), "temperature=nan must be a positive finite number"),
        ("temperature", 0.0, "temperature=0.0 must be a positive finite number"),
        ("top_p", 0.0, r"top_p=0.0 must be within \(0, 1\]"),
        ("top_p", 1.5, r"top_p=1.5 must be within \(0, 1\]"),
        ("top_k", -1, "top_k=-1 must be an int >= 0"),
        ("repetition_penalty", 0.0, "repetition_penalty=0.0 must be a positive finite number"),
        ("min_new_tokens", 40, "min_new_tokens=40 exceeds max_new_tokens=32"),
        ("eos_id", 128, r"eos_id=128 is outside the vocabulary \[0, 128\)"),
        ("stop", ((),), "stop sequence"),
    ]:
        with pytest.raises(ConfigError, match=message):
            gen.generate([[1]], Sampling(**{field: value}))
    gen.generate([[1]], Sampling(greedy=True, temperature=0.0, max_new_tokens=1))  # ignored


# Sampling: a model whose next-token distribution is the same at every position, so that one
# `generate` call yields max_len - len(prompt) independent draws from it. With `embed_in` zero
# every position enters the blocks with the same (zero) vector, attention averages
# position-independent values, and so the logits cannot depend on the prefix; every other weight
# is random. The reference is softmax(logits / T) in float64 from GPTNeoX.apply, not `generate`.
SAMPLE_CFG = ModelConfig(
    vocab_size=32, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=256,
    dtype="float32",
)  # fmt: skip
SAMPLE_PROMPT = [5, 17, 3]
SAMPLE_DRAWS = 3  # samples per call: 3 x 253 = 759 draws per temperature


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def constant_logit_model():
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
    sampling = Sampling(
        max_new_tokens=SAMPLE_CFG.max_len - len(SAMPLE_PROMPT), temperature=temperature,
        num_samples=SAMPLE_DRAWS, seed=0,
    )  # fmt: skip
    (samples,) = Generator(params, SAMPLE_CFG).generate([SAMPLE_PROMPT], sampling)
    ids = [t for c in samples for t in c.ids]
    logprobs = [x for c in samples for x in c.logprobs]
    n = len(ids)
    # The returned log-probabilities are of the untempered float32 softmax.
    log_p = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(logprobs, log_p[ids], atol=1e-4)

    want = _softmax(logits / temperature)
    freq = np.bincount(ids, minlength=SAMPLE_CFG.vocab_size) / n
    tv = 0.5 * np.abs(freq - want).sum()
    # The bound: 1.25x the 99.9% quantile of the TV of n exact multinomial draws from `want`
    # (simulated with a fixed numpy seed). The generate seed is fixed too: deterministic.
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
