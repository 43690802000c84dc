"""The training loop's periodic work, as hooks: `hook(step, state, metrics)` after every step.

`step` is the number of steps done (1 after the first), `state` the `TrainState` after it and
`metrics` the step's host values: `loss`, `grad_norm`, `finite` (whether the update was applied),
`tokens` (targets that counted) and `epoch`. A hook decides itself when to act; `close()` runs once
when the loop ends, however it ends. The loop (train.py) applies the NaN policy before the hooks.
Hooks run in order and may add to `metrics` for the ones after them (`Evaluate` adds the `eval_*`
values that `LogMetrics` writes).

The loop does not wait for a step before it starts the next: it dispatches step n + 1 and only then
reads step n's metrics, so the device never idles while the host reads metrics, logs and builds the
next batch. The next step's input donates the state, so `state` exists only at the steps where a
hook asked for it: `wants_state(step)`, called once per step on every process (in the same order,
before the next step is dispatched), says so; at the other steps `state` is None.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
from absl import logging

from polyglot_jax.eval.monitor import GENERATION_KEYS
from polyglot_jax.metrics import LossWatch, MetricsWriter


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


class Hook(Protocol):
    def wants_state(self, step: int) -> bool: ...

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ProgressBar:
    """A tqdm bar over the run's steps (process 0), with the last finite loss."""

    def __init__(self, start: int, steps: int, *, enabled: bool):
        import sys

        from tqdm import tqdm

        interactive = sys.stderr.isatty()

        self.bar = tqdm(
            total=steps,
            initial=start,
            disable=not enabled,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30,  # a log file: a line every 30 s, not every step
        )

    def wants_state(self, step: int) -> bool:
        return False

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        if metrics["finite"]:
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class WatchLoss:
    """Feeds every finite loss to a `LossWatch` (warnings for spikes and sudden drops)."""

    def __init__(self, watch: LossWatch):
        self.watch = watch

    def wants_state(self, step: int) -> bool:
        return False

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        if metrics["finite"]:
            self.watch.update(step, float(metrics["loss"]), metrics["epoch"])

    def close(self) -> None:
        pass


EVAL_KEYS = ("eval_loss", "eval_perplexity", "eval_tokens", "eval_time_s")


class Evaluate:
    """After every `every`-th step and the last one (finite steps only; never at step 0):
    `evaluate(params) -> (mean loss, tokens)` on the held-out rows, added to the step's metrics as
    `eval_loss`, `eval_perplexity` (exp of it), `eval_tokens` (targets that counted) and
    `eval_time_s` (wall time, the first time with reading the rows and compiling)."""

    def __init__(
        self, evaluate: Callable[[Any], tuple[float, float]], *, every: int, last_step: int
    ):
        self.evaluate = evaluate
        self.every, self.last_step = every, last_step

    def wants_state(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        if not metrics["finite"] or not self.wants_state(step):
            return
        began = time.perf_counter()
        loss, tokens = self.evaluate(state.params)
        metrics["eval_loss"] = loss
        metrics["eval_perplexity"] = math.inf if loss > 709 else math.exp(loss)
        metrics["eval_tokens"] = int(tokens)
        metrics["eval_time_s"] = time.perf_counter() - began
        logging.info("step %d: eval_loss %.4f (%d held-out tokens)", step, loss, tokens)

    def close(self) -> None:
        pass


class LogMetrics:
    """Every `every` steps, at the last one and at every step `Evaluate` evaluated (when the step
    is finite): one record to the `MetricsWriter`, timed over the steps since the previous record
    (evaluation time left out), with the `eval_*` values when there are. `last` is the latest."""

    def __init__(
        self,
        writer: MetricsWriter,
        schedule: Any,
        *,
        every: int,
        last_step: int,
        tokens_per_step: int,
        flops_per_step: float,
        peak_flops: float | None,
    ):
        self.writer = writer
        self.schedule = schedule
        self.every, self.last_step = every, last_step
        self.tokens_per_step = tokens_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.last: dict[str, Any] = {}
        self.skipped = 0  # steps whose update was not applied (nan_policy='skip')
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._window_eval_s = 0.0  # evaluation time within the window: not training time

    def wants_state(self, step: int) -> bool:
        return False

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        self._window_steps += 1
        self._window_eval_s += metrics.get("eval_time_s", 0.0)
        if not metrics["finite"]:
            self.skipped += 1
            return
        evaluated = "eval_loss" in metrics
        monitored = "gen_samples" in metrics
        if step % self.every and step != self.last_step and not (evaluated or monitored):
            return
        elapsed = time.perf_counter() - self._window_start - self._window_eval_s
        step_time = elapsed / max(self._window_steps, 1)
        peak = self.peak_flops
        self.last = {
            "step": step,
            "loss": float(metrics["loss"]),
            "lr": float(self.schedule(step - 1)),
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
            "mfu": (
                self.flops_per_step / step_time / (peak * jax.device_count()) if peak else None
            ),
            "epoch": metrics["epoch"],
            "skipped_steps": self.skipped,
        }
        if evaluated:
            self.last.update({key: metrics[key] for key in EVAL_KEYS})
        if monitored:
            self.last.update({key: metrics[key] for key in (*GENERATION_KEYS, "gen_samples")})
        self.writer.write(self.last)
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._window_eval_s = 0.0

    def close(self) -> None:
        self.writer.close()


class SaveCheckpoints:
    """Saves every `every` steps and at the last one; when `stop_requested()` (SIGTERM/SIGINT on
    any process) says so, saves this step, waits for the write and sets `preempted`: the loop
    then returns. `stop_requested` is asked once per step, in `wants_state` (with several
    processes it is a collective: every process asks at every step)."""

    def __init__(
        self, ckpt: Any, data_iter: Any, stop_requested: Any, *, every: int, last_step: int
    ):
        self.ckpt, self.data_iter, self.stop_requested = ckpt, data_iter, stop_requested
        self.every, self.last_step = every, last_step
        self.preempted = False
        self._save_at: int | None = None  # the step `wants_state` asked to save
        self._stop = False

    def wants_state(self, step: int) -> bool:
        self._stop = self.stop_requested()
        due = self._stop or step % self.every == 0 or step == self.last_step
        self._save_at = step if due else None
        return due

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        if step != self._save_at:
            return
        self.ckpt.save(step, state.params, state.opt_state, self.data_iter, force=True)
        if self._stop:
            self.ckpt.wait()
            logging.warning("saved step %d after a stop signal; exiting", step)
            self.preempted = True

    def close(self) -> None:
        pass  # the loop closes the checkpointer itself, after every hook


class Profile:
    """A `jax.profiler` trace of steps `first + 1 .. first + count` (`config.train.profile_steps`
    = (first, count)) into `directory`; a run resumed past `first` traces nothing."""

    def __init__(self, directory: str, first: int, count: int, *, start: int):
        self.directory, self.first, self.count = directory, first, count
        self.active = False
        self._maybe_start(start)

    def _maybe_start(self, step: int) -> None:
        if self.count and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def wants_state(self, step: int) -> bool:
        # Not the state: the steps around the trace must have finished before it starts and
        # stops, so that it holds exactly the requested steps.
        return bool(self.count) and step in (self.first, self.first + self.count)

    def __call__(self, step: int, state: TrainState | None, metrics: dict[str, Any]) -> None:
        if self.active and step == self.first + self.count:
            self.close()
        self._maybe_start(step)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
