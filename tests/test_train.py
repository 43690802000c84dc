"""The trainer on 8 fake CPU devices: layouts agree, accumulation equals the big batch, state survives.

References are independent runs of the same function: one mesh against another, one big batch
against microbatches, an uninterrupted run against a killed-and-resumed one.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import tiny_config, tiny_shards

from polyglot_jax.checkpoint import restore_params
from polyglot_jax.config import validate, validate_run
from polyglot_jax.errors import ConfigError
from polyglot_jax.hooks import LogMetrics, Profile, SaveCheckpoints, TrainState
from polyglot_jax.train import NonFiniteLoss, _pipelined_steps, build_step, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _mesh(**axes):
    mesh = {"mesh__data": 1, "mesh__fsdp": 1, "mesh__model": 1}
    mesh.update({f"mesh__{k}": v for k, v in axes.items()})
    return mesh


LAYOUTS = {
    "data8": _mesh(data=8),
    "fsdp8": _mesh(fsdp=8),
    "data2_model4": _mesh(data=2, model=4),
    "data2_fsdp2_model2": _mesh(data=2, fsdp=2, model=2),
}


def test_layouts_give_equal_losses(shards, tmp_path):
    losses = {}
    for name, mesh in LAYOUTS.items():
        train(tiny_config(shards, train__steps=4, **mesh), tmp_path / name)
        losses[name] = _losses(tmp_path / name)
    reference = losses["data8"]
    record = json.loads((tmp_path / "data8" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "epoch"} <= set(record)
    assert 0 < record["epoch"] < 1 and record["tokens_per_s"] > 0
    assert list((tmp_path / "data8" / "tb").iterdir())
    assert json.loads((tmp_path / "data8" / "config.json").read_text())["mesh"]["data"] == 8
    assert sorted(reference) == [1, 2, 3, 4]
    assert reference[4] < reference[1]  # it learns
    for name, got in losses.items():
        np.testing.assert_allclose(
            [got[s] for s in reference], list(reference.values()), rtol=2e-5, err_msg=name
        )


def test_pallas_attention_trains_like_xla(shards, tmp_path):
    """The fused kernel (interpret mode here) inside shard_map over data x model gives xla's losses."""
    xla = _losses_after(shards, tmp_path / "xla", train__steps=3)
    pallas = _losses_after(
        shards, tmp_path / "pallas", train__steps=3, model__attention_impl="pallas"
    )
    np.testing.assert_allclose(list(pallas.values()), list(xla.values()), rtol=1e-5)


def test_gradient_accumulation_equals_large_batch(shards, tmp_path):
    big = _losses_after(shards, tmp_path / "big", train__grad_accum=1)
    micro = _losses_after(shards, tmp_path / "micro", train__grad_accum=4)
    np.testing.assert_allclose(list(micro.values()), list(big.values()), rtol=2e-5)


def _losses_after(shards, workdir, **overrides):
    overrides = {"train__steps": 4, **_mesh(data=2, fsdp=2, model=2), **overrides}
    train(tiny_config(shards, **overrides), workdir)
    return _losses(workdir)


def test_restore_onto_another_mesh(shards, tmp_path):
    """Checkpoint on data:8, resume on data:2 x model:4: the run goes on as if uninterrupted."""
    straight = tmp_path / "straight"
    train(tiny_config(shards, **LAYOUTS["data8"]), straight)
    moved = tmp_path / "moved"
    train(tiny_config(shards, train__steps=3, **LAYOUTS["data8"]), moved)
    train(tiny_config(shards, **LAYOUTS["data2_model4"]), moved)
    a, b = _losses(straight), _losses(moved)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=2e-5)


def test_corrupted_latest_checkpoint_falls_back(shards, tmp_path, caplog):
    workdir = tmp_path / "run"
    train(tiny_config(shards), workdir)  # checkpoints at 3 and 6
    before = _losses(workdir)
    for f in (workdir / "checkpoints" / "6" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    # Emptied, so the steps after the fallback must be logged anew.
    (workdir / "metrics.jsonl").write_text("")
    train(tiny_config(shards), workdir)
    assert "cannot be restored" in caplog.text and "falling back" in caplog.text
    kept = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == ["3", "6"]
    assert len(list((workdir / "corrupt_checkpoints").iterdir())) == 1
    after = _losses(workdir)
    assert sorted(after) == [4, 5, 6]  # resumed from step 3
    assert [after[s] for s in (4, 5, 6)] == [before[s] for s in (4, 5, 6)]  # bit for bit


@pytest.fixture
def nan_loss(monkeypatch):
    """Every loss becomes NaN (the config refuses a NaN z_loss, the old way to get one)."""
    import polyglot_jax.train as trainer

    real = trainer.chunked_cross_entropy

    def poisoned(*args, **kwargs):
        ce, zl, count = real(*args, **kwargs)
        return ce * jnp.nan, zl, count

    monkeypatch.setattr(trainer, "chunked_cross_entropy", poisoned)


def test_nan_halt_never_checkpoints(shards, tmp_path, nan_loss):
    with pytest.raises(NonFiniteLoss, match="at step 1"):
        train(tiny_config(shards), tmp_path)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_nan_skip_keeps_parameters(shards, tmp_path, nan_loss):
    config = tiny_config(shards, train__nan_policy="skip")
    train(config, tmp_path)
    model_cfg, mesh_shape = validate(config, jax.device_count())
    from polyglot_jax.partitioning import make_mesh, rules_from_config

    mesh, rules = make_mesh(mesh_shape), rules_from_config(config.mesh.rules)
    with jax.set_mesh(mesh):
        fns = build_step(config, model_cfg, mesh, rules)
        initial = fns.init_params(config.train.seed)
        saved, _ = restore_params(tmp_path, fns.abstract_params)
    jax.tree.map(np.testing.assert_array_equal, saved, initial)
    assert not (tmp_path / "metrics.jsonl").exists() or _losses(tmp_path) == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"train__batch_size": 12},
            r"12 sequences per microbatch is not divisible by the data x fsdp",
        ),
        ({"train__grad_accum": 3}, r"batch_size=16 is not divisible by grad_accum=3"),
        ({"train__seq_len": 4096}, r"seq_len=4096 exceeds config\.model\.max_len=128"),
        ({"train__nan_policy": "ignore"}, r"nan_policy='ignore'"),
        ({"train__steps": 0}, r"config\.train\.steps=0 must be a positive int"),
    ],
)
def test_bad_train_configs(shards, overrides, message):
    config = tiny_config(shards, **overrides)
    validate(config, 8)  # the model and mesh are fine: the train section is not
    with pytest.raises(ConfigError, match=message):
        validate_run(config, 8)


def test_model_vocab_must_hold_the_tokenizer(shards, tmp_path):
    with pytest.raises(
        ConfigError, match=r"config\.model\.vocab_size=1024 is smaller than the \d+ token ids"
    ):
        train(tiny_config(shards, model__vocab_size=1024), tmp_path)


# ---------------------------------------------------------------- hooks (no training needed)


def _finite(loss=2.0):
    return {"loss": loss, "grad_norm": 0.5, "finite": True, "tokens": 10.0, "epoch": 0.25}


def test_profile_hook_traces_count_steps_after_first(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))

    def run(first, count, start, steps):
        """[(step after which it happened, 0 at creation, 'end' at close), call]."""
        calls.clear()
        hook = Profile("p", first, count, start=start)
        at = [(0, c) for c in calls]
        for step in range(start + 1, steps + 1):
            before = len(calls)
            hook(step, None, _finite())
            at += [(step, c) for c in calls[before:]]
        before = len(calls)
        hook.close()
        return at + [("end", c) for c in calls[before:]]

    start, stop = ("start", "p"), ("stop",)
    assert run(first=2, count=3, start=0, steps=8) == [(2, start), (5, stop)]  # steps 3, 4, 5
    assert run(first=0, count=2, start=0, steps=4) == [(0, start), (2, stop)]
    assert run(first=4, count=2, start=4, steps=8) == [(0, start), (6, stop)]  # resumed at first
    assert run(first=2, count=3, start=3, steps=8) == []  # resumed inside the window: nothing
    assert run(first=2, count=0, start=0, steps=8) == []
    assert run(first=1, count=10, start=0, steps=4) == [(1, start), ("end", stop)]


def test_log_metrics_hook_writes_every_n_and_the_last_finite_step():
    class Writer:
        records: list = []

        def write(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    writer = Writer()
    hook = LogMetrics(writer, lambda step: step * 0.1, every=2, last_step=5, tokens_per_step=64,
                      flops_per_step=1e9, peak_flops=None)  # fmt: skip
    for step in range(1, 6):
        hook(step, None, {**_finite(loss=float(step)), "finite": step != 4})
    assert [r["step"] for r in writer.records] == [2, 5]  # 4 was not finite: no record
    last = writer.records[-1]
    assert last == hook.last and last["skipped_steps"] == 1 and last["loss"] == 5.0
    assert last["lr"] == pytest.approx(0.4) and last["mfu"] is None and last["epoch"] == 0.25
    assert set(last) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu",
                         "epoch", "skipped_steps"}  # fmt: skip
    assert last["tokens_per_s"] == pytest.approx(64 / last["step_time_s"])
    hook.close()
    assert writer.closed


def test_save_checkpoints_hook_saves_periodically_and_once_on_a_stop():
    class Ckpt:
        def __init__(self):
            self.saved, self.waited = [], 0

        def save(self, step, params, opt_state, data_iter, force):
            self.saved.append((step, params, opt_state, data_iter, force))

        def wait(self):
            self.waited += 1

    now = [0]
    for stop_at, saved in ((None, [2, 4, 5]), (3, [2, 3]), (4, [2, 4])):
        ckpt = Ckpt()
        stop_requested = lambda at=stop_at: now[0] == at  # noqa: E731
        hook = SaveCheckpoints(ckpt, "it", stop_requested, every=2, last_step=5)
        for step in range(1, 6):
            now[0] = step
            # as the loop calls it: asked once per step, then called (with the state if it asked)
            state = TrainState("p", "o") if hook.wants_state(step) else None
            hook(step, state, _finite())
            if hook.preempted:
                break
        assert [s[0] for s in ckpt.saved] == saved
        assert all(s[1:] == ("p", "o", "it", True) for s in ckpt.saved)
        assert hook.preempted == (stop_at is not None) and ckpt.waited == int(hook.preempted)


class _Wants:
    """A hook that wants the state at `steps`; records every question in `asked`."""

    def __init__(self, name, steps, asked):
        self.name, self.steps, self.asked = name, steps, asked

    def wants_state(self, step):
        self.asked.append((self.name, step))
        return step in self.steps


def _pipeline(steps, wanted, events, asked, stop_at=None, fail_at=None):
    """`_pipelined_steps` over `steps` with a hook wanting the state at `wanted` (after one that
    never does): what happened goes to `events`, the hooks' questions to `asked`."""

    def step_fn(step, state):
        if step == fail_at:
            raise OSError("a shard went missing")
        events.append(("dispatch", step, state))
        return f"state{step}", {"step": step}

    def finish(step, metrics, state):
        assert metrics == {"step": step}
        events.append(("finish", step, state))
        return step == stop_at

    hooks = [_Wants("a", set(), asked), _Wants("b", set(wanted), asked)]
    return _pipelined_steps("state0", steps, step_fn, finish, hooks)


def test_the_loop_dispatches_the_next_step_before_it_reads_this_one():
    events, asked = [], []
    assert not _pipeline(range(1, 6), {3, 5}, events, asked)
    assert events == [
        ("dispatch", 1, "state0"),
        ("dispatch", 2, "state1"),  # before step 1's metrics are read
        ("finish", 1, None),  # its state was donated to step 2: no hook may have it
        ("dispatch", 3, "state2"),
        ("finish", 2, None),
        ("finish", 3, "state3"),  # a hook wants it: read, with the state, before step 4 starts
        ("dispatch", 4, "state3"),
        ("dispatch", 5, "state4"),
        ("finish", 4, None),
        ("finish", 5, "state5"),
    ]
    # Every hook is asked once per step, in order, also after one said yes (the stop question
    # is a collective: every process must ask it at every step).
    assert asked == [(name, step) for step in range(1, 6) for name in "ab"]
    # No hook wants the last state: the last step is still finished, after the loop.
    events = []
    assert not _pipeline(range(3, 5), set(), events, [])
    assert events[-2:] == [("finish", 3, None), ("finish", 4, None)]


def test_the_loop_stops_where_finish_says_and_loses_no_finished_step():
    events = []
    assert _pipeline(range(1, 9), {4}, events, [], stop_at=4)
    assert events[-1] == ("finish", 4, "state4") and len(events) == 8  # steps 1-4, no dispatch 5
    # A step that fails to start (a shard is missing): the step before it, dispatched and not
    # read yet, is finished before the error goes up.
    events = []
    with pytest.raises(OSError, match="shard"):
        _pipeline(range(1, 9), set(), events, [], fail_at=3)
    assert events == [
        ("dispatch", 1, "state0"),
        ("dispatch", 2, "state1"),
        ("finish", 1, None),
        ("finish", 2, None),
    ]
