"""The loss watch flags spikes and sudden drops against its running average, and nothing else;
the metrics writer's TensorBoard scalars, read back from the event files' bytes, are its records."""

import json
import struct

import numpy as np
import pytest

from polyglot_jax.metrics import LossWatch, MetricsWriter


def _event_scalars(tb_dir):
    """{tag: {step: value}} from TFRecord framing (u64 length, u32 crc, event, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(tb_dir.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_writer_tensorboard_scalars_equal_its_jsonl_records(tmp_path):
    writer = MetricsWriter(tmp_path)
    records = [
        {"step": s, "loss": 8.0 / s, "lr": 1e-3 * s, "mfu": None, "epoch": s / 10}
        for s in (1, 2, 5)
    ]
    for record in records:
        writer.write(record)
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    scalars = _event_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/lr", "train/epoch"}  # None is not a scalar
    for key in ("loss", "lr", "epoch"):
        want = {r["step"]: float(np.float32(r[key])) for r in records}
        assert scalars[f"train/{key}"] == want, key


def _feed(watch, losses, start=1):
    return [watch.update(step, loss, epoch=step / 100) for step, loss in enumerate(losses, start)]


def test_steady_noisy_loss_raises_nothing():
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    assert not any(_feed(watch, [5.0 + 0.1 * ((-1) ** i) for i in range(200)]))


def test_spike_and_drop_are_reported_with_step_and_epoch():
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    assert not any(_feed(watch, [4.0] * 30))
    spike = watch.update(31, 7.0, epoch=0.31)
    assert spike.startswith("loss spike at step 31, epoch 0.310")
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    _feed(watch, [4.0] * 30)
    assert "sudden loss drop at step 31" in watch.update(31, 2.5, epoch=1.0)


def test_no_warning_before_the_average_settles():
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    assert not any(_feed(watch, [10.0, 6.0, 4.0, 3.0]))  # the normal early fall


@pytest.mark.parametrize("loss", [4.0 * 1.49, 4.0 * 0.81])
def test_within_thresholds_is_quiet(loss):
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    _feed(watch, [4.0] * 30)
    assert watch.update(31, loss, epoch=None) is None


def _first_back_within(losses, start, drop, halflife):
    """Step (1-based) at which losses[start:] first lies within `drop` of a float64 EMA of
    everything before it (the average a drop is measured against)."""
    decay = 0.5 ** (1.0 / halflife)
    average = np.float64(losses[0])
    for index, loss in enumerate(losses[1:], 1):
        if index >= start and loss >= average * (1 - drop):
            return index + 1
        average = decay * average + (1 - decay) * loss
    raise AssertionError("never back within the band")


def test_a_lasting_drop_warns_once_and_a_new_one_warns_again(caplog):
    """A loss that falls to a new level stays below the lagging average for many steps: one
    warning at its first step, one info line once it stayed within the band for `halflife`
    steps, then a second drop is a new episode with its own warning."""
    losses = [4.0] * 30 + [2.5] * 40 + [1.5] * 10
    back = _first_back_within(losses, 30, drop=0.2, halflife=10)
    assert 32 < back <= 70 - 10  # the first drop lasts several steps, ends before the second
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    with caplog.at_level("INFO", logger="absl"):
        messages = _feed(watch, losses)
    warned = [step for step, m in enumerate(messages, 1) if m]
    assert warned == [31, 71]
    assert messages[30].startswith("sudden loss drop at step 31")
    assert f"loss drop of step 31 over: within the thresholds since step {back}" in caplog.text


def test_a_noisy_drop_in_and_out_of_the_band_is_one_episode():
    """A falling, noisy loss dips below the band every few steps: no new warning until it stayed
    within the band for `halflife` steps."""
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    dips = [4.0] * 30 + [2.9, 3.9, 3.9, 3.9, 3.9, 3.9] * 4 + [4.0] * 40
    messages = _feed(watch, dips + [2.0])
    assert [step for step, m in enumerate(messages, 1) if m] == [31, len(dips) + 1]


def test_a_spike_of_several_steps_is_one_warning():
    watch = LossWatch(spike=0.5, drop=0.2, halflife=10)
    messages = _feed(watch, [4.0] * 30 + [9.0] * 3 + [4.0] * 20 + [9.0])
    assert [step for step, m in enumerate(messages, 1) if m] == [31, 54]
    assert all(messages[s - 1].startswith("loss spike") for s in (31, 54))


def test_warnings_start_at_the_step_after_halflife_steps():
    """`halflife` losses make the average: the next one may warn, not an earlier one."""
    assert not any(_feed(LossWatch(spike=0.5, drop=0.2, halflife=3), [4.0, 4.0, 9.0]))
    messages = _feed(LossWatch(spike=0.5, drop=0.2, halflife=3), [4.0, 4.0, 4.0, 9.0])
    assert [step for step, m in enumerate(messages, 1) if m] == [4]


def test_an_episode_ends_at_its_halflifeth_calm_step(caplog):
    """halflife=3: a spike at step 11, calm steps 12-14 end it at step 14 (one info line then),
    so the spike at step 15 is a new episode. The averages, by hand (decay 2^(-1/3)): 4.52 after
    the spike, 4.26 before step 15, whose 6.5 is above 1.5 x 4.26 = 6.39."""
    watch = LossWatch(spike=0.5, drop=0.2, halflife=3)
    with caplog.at_level("INFO", logger="absl"):
        first = _feed(watch, [4.0] * 10 + [6.5] + [4.0] * 3)
        assert "loss spike of step 11 over: within the thresholds since step 12" in caplog.text
        assert watch.update(15, 6.5, epoch=None) is not None
    assert [step for step, m in enumerate(first, 1) if m] == [11]
