"""The broken-generation monitor hook: its metrics equal the repetition metrics of greedy
continuations decoded independently (the whole model re-run per token), and a model that can only
repeat one token is flagged with a warning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.eval import repetition
from polyglot_jax.eval.monitor import GenerationMonitor
from polyglot_jax.hooks import TrainState
from polyglot_jax.model import GPTNeoX, ModelConfig, init_params

CFG = ModelConfig(
    vocab_size=64, num_layers=2, d_model=32, d_ff=64, num_heads=4, rotary_dim=4, max_len=64,
    dtype="float32", scan_layers=True,
)  # fmt: skip
PROMPTS = [[1, 2, 3], [9, 8, 7, 6, 5]]


def _greedy(params, prompt, n, cfg=CFG):
    model = GPTNeoX(cfg)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t[None])[0])
    seq = list(prompt)
    for _ in range(n):
        window = np.zeros(cfg.max_len, np.int32)
        window[: len(seq)] = seq
        seq.append(int(jnp.argmax(forward(params, window)[len(seq) - 1])))
    return seq[len(prompt) :]


def _monitor(**kw):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    return GenerationMonitor(CFG, PROMPTS, every=5, last_step=12, max_new_tokens=16, mesh=mesh,
                             rules=(), **kw)  # fmt: skip


def test_metrics_equal_those_of_an_independent_greedy_decode():
    params = nn.meta.unbox(init_params(CFG, jax.random.key(0)))
    params = jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, params)
    monitor = _monitor()
    metrics = {"epoch": 0.5}
    monitor(4, TrainState(params, None), metrics)
    assert "gen_seq_rep_4" not in metrics  # not a multiple of `every`
    monitor(5, TrainState(params, None), metrics)
    seqs = [_greedy(params, p, 16) for p in PROMPTS]
    want = repetition.summary(seqs)
    assert metrics["gen_samples"] == seqs
    assert metrics["gen_seq_rep_4"] == pytest.approx(want["seq_rep_4"])
    assert metrics["gen_rep_w_16"] == pytest.approx(want["rep_w_16"])
    assert metrics["gen_distinct_2"] == pytest.approx(want["distinct_2"])
    assert metrics["gen_broken_share"] == pytest.approx(want["broken_share"])
    # The training params are left as they were (the monitor works on a copy).
    assert all(x.shape[0] == CFG.num_layers for x in jax.tree.leaves(params["layers"]))


def test_a_looping_model_is_flagged(caplog):
    params = nn.meta.unbox(init_params(CFG, jax.random.key(1)))
    # Final LayerNorm scale 0 and bias e0: every position's hidden state is e0, so the logits are
    # row 0 of embed_out whatever the input, and token 7 wins every step.
    params = dict(params)
    params["final_layer_norm"] = {
        "scale": jnp.zeros(CFG.d_model),
        "bias": jnp.zeros(CFG.d_model).at[0].set(1.0),
    }
    params["embed_out"] = jnp.zeros((CFG.d_model, CFG.vocab_size)).at[0, 7].set(10.0)
    metrics = {"epoch": 0.99}
    with caplog.at_level("WARNING"):
        _monitor(decode=lambda ids: " ".join(map(str, ids)))(12, TrainState(params, None), metrics)
    assert metrics["gen_samples"] == [" ".join(["7"] * 16)] * 2
    assert metrics["gen_broken_share"] == 1.0 and metrics["gen_seq_rep_4"] == pytest.approx(
        1 - 1 / 13
    )
    assert "repeat themselves" in caplog.text and "epoch 0.990" in caplog.text


def test_train_logs_the_monitor_at_its_steps(tmp_path):
    """Through `train`: records at steps 2 and 4 carry gen_* and the texts, and the texts are the
    decoding of a greedy continuation re-computed from that step's checkpoint."""
    import json

    import orbax.checkpoint as ocp
    from train_fixtures import tiny_config, tiny_shards

    from polyglot_jax.data.tokenizer import load_tokenizer
    from polyglot_jax.train import train
    from polyglot_jax.workdir import run_tokenizer

    config = tiny_config(
        tiny_shards(tmp_path / "cache"), train__steps=4, train__checkpoint_every=2,
        train__log_every=3, model__dtype="float32",
    )  # fmt: skip
    config.eval.generation_every = 2
    config.eval.generation_prompts = ("대한민국의 수도는", "옛날 옛적에")
    config.eval.generation_max_new_tokens = 6
    train(config, tmp_path / "run")
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").open())}
    assert {s for s, r in records.items() if "gen_samples" in r} == {2, 4}
    assert "gen_samples" not in records[3] and records[3]["loss"] > 0  # the log_every record
    tokenizer = load_tokenizer(run_tokenizer(config, tmp_path / "run"))
    cfg = ModelConfig.from_config(config.model)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(tmp_path / "run/checkpoints/2/params")
    seqs = [_greedy(params, tokenizer.encode(p), 6, cfg) for p in config.eval.generation_prompts]
    assert records[2]["gen_samples"] == [tokenizer.decode(s) for s in seqs]
    assert records[2]["gen_seq_rep_4"] == pytest.approx(repetition.summary(seqs)["seq_rep_4"])
