"""The trainer's logged numbers against references that do not run the trainer.

Every expectation here is computed independently of the code under test: the loss from the model's
full logits with a float64 numpy cross-entropy (targets and mask worked out from the raw rows), the
MFU from a hand count of the model's parameters, the learning rate from the warmup + cosine formula,
and the TensorBoard scalars from the event files' bytes.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import tiny_config, tiny_shards

from polyglot_jax.config import validate_run
from polyglot_jax.data.pipeline import make_pipeline
from polyglot_jax.model import GPTNeoX, init_params
from polyglot_jax.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _first_rows(config) -> dict[str, np.ndarray]:
    """The first global batch, from a pipeline of our own (not the trainer's)."""
    it = make_pipeline(
        config.data,
        seq_len=config.train.seq_len,
        global_batch_size=config.train.batch_size,
        process_index=0,
        process_count=1,
    )
    batch = next(it).batch
    rows = {"tokens": np.asarray(batch.tokens)}
    if batch.segment_ids is not None:
        rows["segment_ids"] = np.asarray(batch.segment_ids)
        rows["positions"] = np.asarray(batch.positions)
    return rows


def _expected_mask(rows: dict[str, np.ndarray]) -> np.ndarray:
    """Which predictions count, position by position, written out with loops: input t predicts
    token t + 1; in packed rows it counts only inside one document piece and never on padding."""
    tokens = rows["tokens"]
    n, length = tokens.shape[0], tokens.shape[1] - 1
    mask = np.ones((n, length), bool)
    if "segment_ids" in rows:
        seg = rows["segment_ids"]
        for r in range(n):
            for t in range(length):
                mask[r, t] = seg[r, t + 1] != 0 and seg[r, t + 1] == seg[r, t]
    return mask


def _reference(config, rows):
    """(float64 mean NLL, float32 gradient norm) of the initial parameters on `rows`."""
    model_cfg = validate_run(config, jax.device_count()).model
    params = nn.meta.unbox(init_params(model_cfg, jax.random.key(config.train.seed)))
    tokens = rows["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = rows["positions"][:, :-1] if "positions" in rows else None
    segments = rows["segment_ids"][:, :-1] if "segment_ids" in rows else None
    mask = _expected_mask(rows)
    model = GPTNeoX(model_cfg)

    logits = model.apply({"params": params}, inputs, positions, segments)
    assert logits.dtype == jnp.float32
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]
    loss = float((nll * mask).sum() / mask.sum())

    def loss_fn(p):
        lg = model.apply({"params": p}, inputs, positions, segments).astype(jnp.float32)
        lp = jax.nn.log_softmax(lg, -1)
        picked = jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return -(picked * mask).sum() / mask.sum()

    grads = jax.grad(loss_fn)(params)
    grad_norm = float(
        np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    )
    return loss, grad_norm, mask


def _needs_short_documents() -> None:
    """Packed rows only hold boundaries and padding with short documents: the built-in sample has
    them (NSMC reviews) only when ../shared/data is present; konlpy's corpora alone fill every
    row of a 33-token window with one long document."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "nsmc").is_dir():
        pytest.skip(f"packed-mode boundary checks need the NSMC reviews under {SHARED_DATA}")


@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_step_one_loss_and_grad_norm_match_a_numpy_reference(shards, tmp_path, mode):
    if mode == "packed":
        _needs_short_documents()
    # data seed 1: the first packed batch holds document boundaries and padding
    config = tiny_config(
        shards, train__steps=1, train__warmup_steps=0, data__mode=mode, data__seed=1
    )
    train(config, tmp_path)
    (logged,) = _records(tmp_path)
    assert logged["step"] == 1

    rows = _first_rows(config)
    loss, grad_norm, mask = _reference(config, rows)
    if mode == "packed":
        # The batch has something to leave out: boundaries and padding, so the test can fail.
        assert (~mask).sum() >= 5
        seg = rows["segment_ids"]
        counted_targets = seg[:, 1:][mask]
        assert (counted_targets != 0).all()
        assert (seg[:, 1:][mask] == seg[:, :-1][mask]).all()
    assert logged["loss"] == pytest.approx(loss, rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_packed_batch_loss_mask_is_the_segment_rule(shards):
    """The batch's own mask equals the hand-written rule, position by position."""
    _needs_short_documents()
    config = tiny_config(shards, data__mode="packed", data__seed=1)
    it = make_pipeline(
        config.data,
        seq_len=config.train.seq_len,
        global_batch_size=config.train.batch_size,
        process_index=0,
        process_count=1,
    )
    for _ in range(3):
        batch = next(it).batch
        rows = {
            "tokens": np.asarray(batch.tokens),
            "segment_ids": np.asarray(batch.segment_ids),
            "positions": np.asarray(batch.positions),
        }
        want = _expected_mask(rows)
        assert not want.all()
        np.testing.assert_array_equal(np.asarray(batch.loss_mask), want)
        np.testing.assert_array_equal(np.asarray(batch.targets), rows["tokens"][:, 1:])


def test_packed_training_run_loss_is_finite_and_falls(shards, tmp_path):
    train(tiny_config(shards, train__steps=8, data__mode="packed"), tmp_path)
    losses = [r["loss"] for r in _records(tmp_path)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1


# --- values, not keys: MFU, learning rate, TensorBoard ----------------------------------------


def _hand_flops_per_token(m, seq_len: int) -> float:
    """PaLM appendix B accounting, counted by hand from the shapes: 6 x every parameter that is
    not the input-embedding lookup (the vocab projection included) + 12 x layers x d x seq_len."""
    d, f, v, layers = m.d_model, m.d_ff, m.vocab_size, m.num_layers
    per_layer = (
        2 * (2 * d)  # two LayerNorms, scale + bias
        + d * 3 * d  # qkv kernel
        + 3 * d  # qkv bias
        + d * d  # attention output kernel
        + d  # its bias
        + d * f  # MLP up kernel
        + f  # up bias
        + f * d  # MLP down kernel
        + d  # down bias
    )
    non_embedding = layers * per_layer + 2 * d + d * v  # final LayerNorm, vocab projection
    return 6.0 * non_embedding + 12.0 * layers * d * seq_len


def _hand_lr(t, step: int) -> float:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * min_lr_ratio`."""
    peak, warmup = t.lr, min(t.warmup_steps, t.steps)
    floor = peak * t.min_lr_ratio
    if step < warmup:
        return peak * step / warmup
    horizon = max(t.steps - warmup, 1)
    progress = min(step - warmup, horizon) / horizon
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _tb_scalars(tb_dir: pathlib.Path) -> dict[str, dict[int, float]]:
    """Scalars from the event files, read from their TFRecord framing (length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tb_dir}"
    for path in files:
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    scalars.setdefault(value.tag, {})[event.step] = value.tensor.float_val[0]
    return scalars


@pytest.fixture(scope="module")
def logged_run(shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("values")
    config = tiny_config(
        shards, train__steps=7, train__warmup_steps=3, train__peak_flops_per_device=1e12
    )
    train(config, workdir)
    return config, workdir, _records(workdir)


def test_mfu_equals_a_hand_count(logged_run):
    config, _, records = logged_run
    t = config.train
    model_cfg = validate_run(config, jax.device_count()).model
    flops_per_step = _hand_flops_per_token(model_cfg, t.seq_len) * t.batch_size * t.seq_len
    assert len(records) == t.steps
    for r in records:
        want = flops_per_step / r["step_time_s"] / (1e12 * jax.device_count())
        assert r["mfu"] == pytest.approx(want, rel=1e-9), r["step"]
        assert r["tokens_per_s"] == pytest.approx(t.batch_size * t.seq_len / r["step_time_s"])


def test_logged_lr_is_the_schedule_at_the_applied_step(logged_run):
    config, _, records = logged_run
    # Step s (1-based) applies the update whose optimizer count is s - 1.
    got = [r["lr"] for r in records]
    want = [_hand_lr(config.train, r["step"] - 1) for r in records]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[0] == 0.0 and max(got) == pytest.approx(config.train.lr)


def test_tensorboard_scalars_equal_metrics_jsonl(logged_run):
    _, workdir, records = logged_run
    scalars = _tb_scalars(workdir / "tb")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "epoch"):
        tag = f"train/{key}"
        assert tag in scalars, sorted(scalars)
        want = {r["step"]: float(np.float32(r[key])) for r in records}
        assert scalars[tag] == pytest.approx(want, rel=1e-6), tag
