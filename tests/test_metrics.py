"""The loss watch flags spikes and sudden drops against its running average, and nothing else."""

import pytest

from polyglot_jax.metrics import LossWatch


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
