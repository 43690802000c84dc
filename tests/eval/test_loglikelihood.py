"""Continuation log-likelihoods against transformers on the same random weights: the summed
float64 log-softmax of the continuation's tokens after the harness's left truncation, and whether
each is the argmax; packed rows (many requests in one) and one request per row; one device
against a sharded mesh."""

import jax
import numpy as np
import pytest
from hf_reference import random_hf_model, require_torch

from polyglot_jax.errors import InputError
from polyglot_jax.eval.loglikelihood import Scorer, pack
from polyglot_jax.generate_weights import load_from_hf
from polyglot_jax.model import ModelConfig
from polyglot_jax.partitioning import make_mesh, resolve_mesh_shape, rules_from_config

torch = require_torch()

CFG = ModelConfig(
    vocab_size=128, num_layers=2, d_model=64, d_ff=128, num_heads=4, rotary_dim=8, max_len=48
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf = random_hf_model(CFG, seed=2, std=0.5)
    hf.save_pretrained(directory)
    return directory, hf


def _requests():
    rng = np.random.default_rng(0)
    out = []
    for ctx, cont in [(1, 1), (5, 3), (20, 7), (40, 12), (3, 48), (70, 5), (1, 30)]:
        out.append((rng.integers(0, 128, ctx).tolist(), rng.integers(0, 128, cont).tolist()))
    # A continuation the model is sure of: the greedy continuation itself.
    return out


def _reference(hf, context, continuation, window=CFG.max_len):
    whole = (context + continuation)[-(window + 1) :]
    inputs, targets = whole[:-1], whole[1:]
    with torch.no_grad():
        logits = hf(torch.tensor([inputs])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)[-len(continuation) :]
    picked = logprobs[torch.arange(len(continuation)), torch.tensor(targets[-len(continuation) :])]
    greedy = (
        logits[-len(continuation) :].argmax(-1) == torch.tensor(targets[-len(continuation) :])
    ).all()
    return picked.sum().item(), bool(greedy)


def test_loglikelihoods_match_transformers(model):
    directory, hf = model
    cfg, params, _ = load_from_hf(directory)
    requests = _requests()
    # One request made greedy: its continuation is transformers' own argmax continuation.
    context = requests[1][0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([context]), do_sample=False, max_new_tokens=4,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
    requests.append((context, out[0, len(context) :].tolist()))
    got = Scorer(params, cfg, batch_tokens=128).loglikelihood(requests)
    want = [_reference(hf, c, x) for c, x in requests]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-6)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert got[-1][1] is True  # the premise: greedy is tested on a True case too


def test_packed_rows_match_transformers(model):
    """Many short requests share rows (segments with their own positions): each result is still
    its request's alone, as transformers computes it on the request by itself."""
    directory, hf = model
    cfg, params, _ = load_from_hf(directory)
    rng = np.random.default_rng(1)
    requests = [
        (rng.integers(0, 128, rng.integers(1, 12)).tolist(),
         rng.integers(0, 128, rng.integers(1, 6)).tolist())
        for _ in range(30)
    ]  # fmt: skip
    scorer = Scorer(params, cfg, batch_tokens=96)
    rows = scorer.requests_to_rows(requests)
    calls = scorer.pack(rows, scorer.groups(rows))
    assert max(len(row) for _, rows in calls for row in rows) >= 3  # the premise: rows are shared
    got = scorer.loglikelihood(requests)
    want = [_reference(hf, c, x) for c, x in requests]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-6)
    assert [g[1] for g in got] == [w[1] for w in want]
    alone = Scorer(params, cfg, batch_tokens=96, pack_len=0)
    rows = alone.requests_to_rows(requests)
    assert all(len(row) == 1 for _, rows in alone.pack(rows, alone.groups(rows))
               for row in rows)  # fmt: skip
    np.testing.assert_allclose([a[0] for a in alone.loglikelihood(requests)],
                               [w[0] for w in want], atol=1e-4, rtol=1e-6)  # fmt: skip


def _multiple_choice(rng, contexts, choices, context_len, choice_len):
    """Requests as the harness sends a multiple-choice task: each context with each choice."""
    out = []
    for _ in range(contexts):
        context = rng.integers(0, 128, rng.integers(*context_len)).tolist()
        for _ in range(choices):
            out.append((context, rng.integers(0, 128, rng.integers(*choice_len)).tolist()))
    return out


def test_shared_contexts_match_transformers(model):
    """The choices of one context laid as a prefix tree (the context once, each continuation a
    branch that sees it and itself only): each result is still transformers' on the request
    alone. Single-token continuations (only the context's last position scores them), contexts
    left-truncated at the window, and groups too long for one row (split) included."""
    directory, hf = model
    cfg, params, _ = load_from_hf(directory)
    rng = np.random.default_rng(3)
    requests = (
        _multiple_choice(rng, 6, 4, (2, 14), (1, 7))
        + _multiple_choice(rng, 4, 2, (1, 4), (1, 2))  # one-token answers (BoolQ's)
        + _multiple_choice(rng, 2, 5, (30, 60), (4, 14))  # truncated; 5 rests > the window
    )
    scorer = Scorer(params, cfg, batch_tokens=96)
    rows = scorer.requests_to_rows(requests)
    groups = scorer.groups(rows)
    assert sorted(i for g in groups for i in g) == list(range(len(requests)))
    assert max(map(len, groups)) == 4 and len(groups) < len(requests) / 2  # the premise: shared
    for g in groups:
        inputs, _, cont = rows[g[0]]
        trunk = inputs[: len(inputs) - cont + 1]
        assert all(rows[i][0][: len(trunk)] == trunk for i in g)
        assert len(trunk) + sum(rows[i][2] - 1 for i in g) <= cfg.max_len
    got = scorer.loglikelihood(requests)
    want = [_reference(hf, c, x) for c, x in requests]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=1e-6)
    assert [g[1] for g in got] == [w[1] for w in want]
    unshared = Scorer(params, cfg, batch_tokens=96, share_contexts=False)
    assert len(unshared.groups(rows)) == len(requests)
    alone = unshared.loglikelihood(requests)
    np.testing.assert_allclose([a[0] for a in alone], [g[0] for g in got], atol=1e-4)
    assert [a[1] for a in alone] == [g[1] for g in got]


@pytest.mark.parametrize("pack_len", [0, 16, 256])
def test_pack_places_every_request_once_within_its_row(pack_len):
    rng = np.random.default_rng(pack_len)
    lengths = [int(n) for n in rng.integers(1, 600, 300)] + [2048, 1, 1]
    calls = pack(lengths, window=2048, batch_tokens=4096, pack_len=pack_len, row_multiple=2)
    placed = sorted(i for _, rows in calls for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    for length, rows in calls:
        assert len(rows) <= max(2, 4096 // length // 2 * 2)
        assert length >= min(pack_len, 2048) and length % 16 == 0
        for row in rows:
            assert sum(lengths[i] for i in row) <= length
            assert pack_len or len(row) == 1


def test_sharded_equals_one_device(model):
    """Rows over 4 shards of the row axis (each block of rows projects its own positions), with
    shared contexts: = one device, = transformers."""
    directory, hf = model
    cfg, params, _ = load_from_hf(directory)
    requests = _requests() + _multiple_choice(np.random.default_rng(4), 5, 3, (2, 20), (1, 6))
    one = Scorer(params, cfg).loglikelihood(requests)
    want = [_reference(hf, c, x) for c, x in requests]
    np.testing.assert_allclose([o[0] for o in one], [w[0] for w in want], atol=1e-4, rtol=1e-6)
    from polyglot_jax.config import base_config

    mesh_cfg = base_config().mesh
    mesh_cfg.update(data=2, fsdp=2, model=2)
    mesh = make_mesh(resolve_mesh_shape(mesh_cfg, jax.device_count()))
    rules = rules_from_config(mesh_cfg.rules)
    cfg_s, params_s, _ = load_from_hf(model[0], mesh=mesh, rules=rules)
    scorer = Scorer(params_s, cfg_s, mesh=mesh, rules=rules, batch_tokens=64)
    assert scorer.row_multiple == 4 and scorer.shares_contexts  # the premise
    sharded = scorer.loglikelihood(requests)
    np.testing.assert_allclose([s[0] for s in sharded], [o[0] for o in one], atol=1e-4)
    assert [s[1] for s in sharded] == [o[1] for o in one]


def test_bad_requests(model):
    cfg, params, _ = load_from_hf(model[0])
    scorer = Scorer(params, cfg)
    with pytest.raises(InputError, match="request 1: the continuation is empty"):
        scorer.loglikelihood([([1], [2]), ([1], [])])
    with pytest.raises(InputError, match="request 0: the context is empty"):
        scorer.loglikelihood([([], [2])])
    with pytest.raises(InputError, match=r"id 128 is outside the vocabulary \[0, 128\)"):
        scorer.loglikelihood([([1], [128])])
    with pytest.raises(InputError, match="longer than the model's max_len 48"):
        scorer.loglikelihood([([1], [2] * 49)])
