"""The logits processors of `generate.process_logits` against two independent references, and the
sampled distribution of `Generator` against softmax of the reference-processed logits.

References: (a) transformers' own processor classes, chained as `GenerationMixin.generate` chains
them (repetition penalty, min_new_tokens, then with sampling temperature, top-k, top-p, each only
when not neutral) on torch float32 tensors, `input_ids` holding the `seen` tokens; (b) `reference`
below, numpy float64, written from HF's documented semantics (top-p: keep the smallest set of most
probable tokens whose probabilities add up to top_p or more, so a token is kept iff the mass of the
tokens strictly more probable than it is < top_p).
"""

import dataclasses
import itertools

import numpy as np
import pytest
from hf_reference import require_torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from polyglot_jax.generate import Generator, Knobs, Sampling, process_logits
from polyglot_jax.model import ModelConfig

torch = require_torch()

EOS = 7
TOP_KS = (0, 1, 5, "vocab+3")
TOP_PS = (1.0, 0.9, 0.5, 0.01)
PENALTIES = (1.0, 1.3, 0.7)
TEMPERATURES = (0.5, 1.0, 2.0)
# (generated so far, min_new_tokens): eos forbidden in the first (the last forbidden step), allowed
# in the next (the first allowed step) and in the last (off).
MIN_NEW = ((4, 5), (5, 5), (2, 0))
SHAPES = ((6, 257, 3), (4, 50, 6))  # (rows, vocab, seed): seeds with no top-p near-tie
MARGIN = 1e-5  # float64 top-p decisions this close to the cut are ambiguous in float32


# ------------------------------------------------------------------------------ the references


def reference(logits, seen, generated, s: Sampling):
    """HF's documented semantics in float64; rows are independent."""
    x = logits.astype(np.float64)
    p = s.repetition_penalty
    x = np.where(seen, np.where(x < 0, x * p, x / p), x)
    if s.eos_id is not None and generated < s.min_new_tokens:
        x[:, s.eos_id] = -np.inf
    if s.greedy:  # HF's greedy search ignores the warpers
        return x
    x = x / s.temperature
    vocab = x.shape[-1]
    if s.top_k > 0:  # keep the k largest values (and anything tied with the k-th)
        kth = -np.sort(-x, axis=-1)[:, min(s.top_k, vocab) - 1 : min(s.top_k, vocab)]
        x = np.where(x < kth, -np.inf, x)
    if s.top_p < 1.0:
        for row in x:
            prob = np.exp(row - row.max())
            prob /= prob.sum()
            order = np.argsort(-row, kind="stable")  # most probable first
            above = np.concatenate([[0.0], np.cumsum(prob[order])[:-1]])  # mass strictly above
            finite = np.isfinite(row[order])
            if np.any(finite & (np.abs(above - s.top_p) < MARGIN)):
                raise AssertionError(f"premise: a top-p decision within {MARGIN} of the cut")
            row[order[above >= s.top_p]] = -np.inf
    return x


def hf_processed(logits, input_ids, prompt_len, s: Sampling):
    """transformers' classes, chained as `generate` chains them."""
    chain = []
    if s.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(s.repetition_penalty)))
    if s.eos_id is not None and s.min_new_tokens > 0:
        chain.append(MinNewTokensLengthLogitsProcessor(prompt_len, s.min_new_tokens, s.eos_id))
    if not s.greedy:
        if s.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(s.temperature)))
        if s.top_k != 0:
            chain.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
        if s.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    scores = torch.from_numpy(logits.copy())
    ids = torch.from_numpy(input_ids)
    for processor in chain:
        scores = processor(ids, scores)
    return scores.numpy()


def assert_same(got, want, what):
    got = np.asarray(got)
    assert not np.any(np.isnan(got) | np.isposinf(got)), what
    dropped, want_dropped = np.isneginf(got), np.isneginf(want)
    assert np.array_equal(dropped, want_dropped), (
        f"{what}: -inf differs at {np.argwhere(dropped != want_dropped).tolist()[:8]}"
    )
    np.testing.assert_allclose(
        got[~dropped], np.asarray(want)[~want_dropped], rtol=2e-6, atol=1e-6, err_msg=what
    )


# ------------------------------------------------------------------------------ the inputs


def make_inputs(rows, vocab, seed):
    """Logits with a wide spread (row scales 1-6), `seen` sets of assorted sizes (row 0 holds
    eos, row 1 does not; one seen logit is exactly 0), and each row's seen tokens as ids."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * rng.uniform(1.0, 6.0, (rows, 1))
    seen_ids = []
    for r in range(rows):
        chosen = rng.choice(vocab, size=int(rng.integers(1, vocab // 3)), replace=False)
        chosen = [int(t) for t in chosen if t != EOS]
        if r == 0:
            chosen.append(EOS)
        seen_ids.append(chosen or [EOS + 1])
    logits[2, seen_ids[2][0]] = 0.0
    seen = np.zeros((rows, vocab), bool)
    for r, ids in enumerate(seen_ids):
        seen[r, ids] = True
    return logits.astype(np.float32), seen, seen_ids


def input_ids_for(seen_ids, generated):
    """[rows, prompt + generated] ids whose set per row is that row's seen tokens (the row's
    first id repeated to fill); the first `prompt` columns count as the prompt."""
    length = max(len(ids) for ids in seen_ids) + generated
    rows = [ids + [ids[0]] * (length - len(ids)) for ids in seen_ids]
    return np.asarray(rows, np.int64), length - generated


@pytest.fixture(scope="module")
def processed():
    import jax

    return jax.jit(process_logits)


@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("top_p", TOP_PS)
def test_processors_match_transformers_and_float64_reference(processed, top_k, top_p):
    import jax.numpy as jnp

    cuts = 0  # rows where top-p drops some but not all of top-k's survivors
    for rows, vocab, seed in SHAPES:
        logits, seen, seen_ids = make_inputs(rows, vocab, seed)
        k = vocab + 3 if top_k == "vocab+3" else top_k
        for penalty, temperature, greedy, (generated, min_new) in itertools.product(
            PENALTIES, TEMPERATURES, (False, True), MIN_NEW
        ):
            s = Sampling(
                max_new_tokens=8, min_new_tokens=min_new, greedy=greedy, temperature=temperature,
                top_k=k, top_p=top_p, repetition_penalty=penalty, eos_id=EOS,
            )  # fmt: skip
            what = f"vocab={vocab} {s}, generated={generated}"
            got = np.asarray(processed(logits, seen, jnp.int32(generated), Knobs.of(s)))
            want = reference(logits, seen, generated, s)
            input_ids, prompt_len = input_ids_for(seen_ids, generated)
            hf = hf_processed(logits, input_ids, prompt_len, s)
            assert_same(got, hf, "vs transformers: " + what)
            assert_same(got, want, "vs float64 reference: " + what)
            assert_same(hf, want, "transformers vs float64 reference: " + what)
            if not greedy:
                kept = np.isfinite(want).sum(-1)
                untopped = dataclasses.replace(s, top_p=1.0)
                before = np.isfinite(reference(logits, seen, generated, untopped)).sum(-1)
                cuts += int(np.sum((kept > 1) & (kept < before)))
            if min_new > generated:
                assert np.all(np.isneginf(got[:, EOS])), what
    # The premise: top-p < 1 cuts in the middle of the distribution in many rows, not only at 1.
    if top_p in (0.9, 0.5) and top_k != 1:
        assert cuts > 20, cuts


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.75, 2), (0.875, 4)])
def test_top_p_where_the_mass_reaches_it_exactly(processed, top_p, kept):
    """Probabilities 1/2, 1/4, 1/8, 1/8 (and a token far below): the mass of the most probable
    tokens reaches top_p exactly, which the random rows of the test above never do. HF keeps
    the smallest set whose mass is >= top_p: 1 and 2 tokens. At 7/8 the cut falls between two
    tokens of equal probability: both are kept (`_truncated` keeps ties at a threshold, as
    top-k does), where HF keeps one of them, which one depending on its sort."""
    import jax.numpy as jnp

    logits = np.log(np.array([[1, 1, 2, 4, 1], [4, 2, 1, 1, 1]], np.float32))
    logits[:, 4] = [-30.0, -np.inf]  # far below everything, and masked: never kept
    seen = np.zeros_like(logits, bool)
    s = Sampling(max_new_tokens=8, top_p=top_p)
    got = np.asarray(processed(logits, seen, jnp.int32(0), Knobs.of(s)))
    if kept < 4:
        hf = hf_processed(logits, np.zeros((2, 1), np.int64), 1, s)
        assert_same(got, hf, f"top_p={top_p} vs transformers")
    assert np.isfinite(got).sum(-1).tolist() == [kept, kept]
    assert np.all(np.isneginf(got[:, 4]))


def test_greedy_ignores_the_warpers(processed):
    """Greedy: temperature, top-k and top-p change nothing (HF's greedy search skips them)."""
    import jax.numpy as jnp

    logits, seen, _ = make_inputs(4, 50, 2)
    plain = Sampling(greedy=True, repetition_penalty=1.3)
    warped = Sampling(greedy=True, repetition_penalty=1.3, temperature=0.3, top_k=2, top_p=0.1)
    a = np.asarray(processed(logits, seen, jnp.int32(0), Knobs.of(plain)))
    b = np.asarray(processed(logits, seen, jnp.int32(0), Knobs.of(warped)))
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()


# ------------------------------------------------------------------------------ sampling


# A model whose next-token logits do not depend on the prefix: with `embed_in` zero every position
# enters the blocks with the same (zero) vector, attention averages position-independent values,
# so every position (prompt or continuation, any padding) has the same final hidden vector h.
# `embed_out` is then shifted (rank one, along h) so that the logits are TARGET exactly. One
# `generate` call with 16 samples x 253 new tokens gives 4048 independent draws.
SAMPLE_CFG = ModelConfig(
    vocab_size=64, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=256,
    dtype="float32", scan_layers=False,
)  # fmt: skip
SAMPLE_PROMPT = [5, 17, 3]
SAMPLING = Sampling(
    max_new_tokens=SAMPLE_CFG.max_len - len(SAMPLE_PROMPT), num_samples=16, temperature=1.5,
    top_k=5, top_p=0.8, repetition_penalty=1.0, seed=11,
)  # fmt: skip
# After temperature and top-k the five survivors have probabilities .35 .25 .18 .12 .10 (mass
# above them 0 .35 .60 .78 .90), so top-p 0.8 keeps four; untempered (sharper: .43 .26 .16 .09
# .07, mass above the fourth .85) it would keep three.
# The other 59 tokens sit well below the fifth. Token ids are shuffled.
_TOP = np.log([0.35, 0.25, 0.18, 0.12, 0.10])
_RNG = np.random.default_rng(5)
TARGET = SAMPLING.temperature * _RNG.permutation(
    np.concatenate([_TOP, _TOP[-1] - 1.5 - _RNG.uniform(0.0, 3.0, SAMPLE_CFG.vocab_size - 5)])
)


def _softmax(z):
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


@pytest.fixture(scope="module")
def constant_logit_model():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from polyglot_jax.model import GPTNeoX

    model = GPTNeoX(SAMPLE_CFG)
    apply = jax.jit(model.apply, static_argnames="return_hidden")  # eager flax is slow on CPU
    init = lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, tree = jax.tree.flatten(jax.eval_shape(init, jax.random.key(0)))
    rng = np.random.default_rng(1)  # numpy: no compile per parameter shape
    leaves = [jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    params = dict(jax.tree.unflatten(tree, leaves))
    params["embed_in"] = jnp.zeros_like(params["embed_in"])
    tokens = np.asarray([SAMPLE_PROMPT + list(range(40))], np.int32)
    h = np.asarray(apply({"params": params}, tokens, return_hidden=True), np.float64)[0, 0]
    kernel = np.asarray(params["embed_out"], np.float64)
    kernel += np.outer(h, TARGET - h @ kernel) / (h @ h)
    params["embed_out"] = jnp.asarray(kernel, jnp.float32)
    logits = np.asarray(apply({"params": params}, tokens), np.float64)[0]
    # The premise: every position has the same logits, TARGET.
    np.testing.assert_allclose(logits, np.broadcast_to(TARGET, logits.shape), atol=1e-4)
    return params, logits[0]


def test_sampled_frequencies_match_processed_softmax(constant_logit_model):
    params, logits = constant_logit_model
    s = SAMPLING
    seen = np.zeros((1, SAMPLE_CFG.vocab_size), bool)
    processed = reference(logits[None], seen, 0, s)[0]
    kept = np.flatnonzero(np.isfinite(processed))
    assert len(kept) == 4, kept  # the premise: top-k and then top-p both cut
    want = _softmax(processed)

    completions = Generator(params, SAMPLE_CFG).generate([SAMPLE_PROMPT], s)[0]
    assert len(completions) == s.num_samples
    ids = np.concatenate([c.ids for c in completions])
    assert all(len(c.ids) == s.max_new_tokens and c.finish == "length" for c in completions)
    assert set(ids.tolist()) <= set(kept.tolist()), sorted(set(ids.tolist()) - set(kept.tolist()))
    # The log-probabilities are the model's own (raw logits), not the processed ones.
    log_p = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    logprobs = np.concatenate([c.logprobs for c in completions])
    np.testing.assert_allclose(logprobs, log_p[ids], atol=1e-4)
    # Samples differ from one another (each row has its own key).
    assert len({tuple(c.ids) for c in completions}) == s.num_samples

    n = len(ids)
    freq = np.bincount(ids, minlength=SAMPLE_CFG.vocab_size) / n
    tv = 0.5 * np.abs(freq - want).sum()
    # The bound: 1.25x the 99.9% quantile of the TV of n exact multinomial draws from `want`
    # (simulated with a fixed numpy seed). The generate seed is fixed too: deterministic.
    sim = np.random.default_rng(0).multinomial(n, want, size=20000) / n
    sim_tv = 0.5 * np.abs(sim - want).sum(axis=1)
    bound = 1.25 * np.quantile(sim_tv, 0.999)
    print(f"kept {kept.tolist()}, TV {tv:.4f}, bound {bound:.4f}, noise {sim_tv.mean():.4f}")
    assert tv < bound, (tv, bound)

    # ... and the bound separates the likely bugs from `want` by more than the sampling noise.
    order = np.argsort(-logits)
    tempered = logits / s.temperature

    def keep_only(z, tokens):
        return _softmax(np.where(np.isin(np.arange(len(z)), tokens), z, -np.inf))

    untempered = dataclasses.replace(s, temperature=1.0)
    wrong = {
        "top-p keeps one fewer": keep_only(tempered, order[:3]),
        "top-p keeps one more": keep_only(tempered, order[:5]),
        "no temperature": _softmax(reference(logits[None], seen, 0, untempered)[0]),
        "temperature after top-p": keep_only(tempered, np.isfinite(
            reference(logits[None], seen, 0, untempered)[0]).nonzero()[0]),
        "logits * T": keep_only(logits * s.temperature, kept),
    }  # fmt: skip
    for name, dist in wrong.items():
        assert 0.5 * np.abs(dist - want).sum() > bound + sim_tv.mean(), name


def test_greedy_loop_applies_penalty_and_min_new_tokens_per_step(constant_logit_model):
    """Generator's loop feeds the processors the right `seen` (prompt + continuation) and step
    count: greedy ids equal a step-by-step argmax of the float64 reference."""
    params, logits = constant_logit_model
    order = np.argsort(-logits)
    eos = int(order[0])  # the raw argmax: forbidden for 3 steps, then chosen (it is never seen)
    prompt = [int(order[1]), 5]  # the runner-up is penalised from the first step
    s = Sampling(
        max_new_tokens=8, min_new_tokens=3, greedy=True, repetition_penalty=1.3, eos_id=eos
    )
    seen = np.zeros((1, SAMPLE_CFG.vocab_size), bool)
    seen[0, prompt] = True
    want = []
    for step in range(s.max_new_tokens):
        token = int(np.argmax(reference(logits[None], seen, step, s)[0]))
        want.append(token)
        seen[0, token] = True
        if token == eos:
            break
    assert len(want) == 4 and want[0] != order[1], want  # the premise: both knobs matter
    (got,) = Generator(params, SAMPLE_CFG).generate([prompt], s)[0]
    assert got.ids == want and got.finish == "eos", (got, want)
