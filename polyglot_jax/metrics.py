"""Training metrics: `metrics.jsonl`, TensorBoard under `tb/`, and a watch on the loss curve.

The watch exists because of the report: the 1.3B and 3.8B models broke (repetitive generation) after
a sharp loss drop at the epoch boundary. Spikes and sudden drops against a running average become
warnings in the log, next to the epoch the pipeline reports.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from absl import logging


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard (process 0 only):
    `eval_<name>` as `eval/<name>`, every other key as `train/<key>`."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: the step the run resumes from; what was logged after it is dropped."""
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.truncate_after(resume_step)
            from tensorboardX import SummaryWriter

            # Events past the resumed step are hidden in TensorBoard, or it shows those steps twice.
            self._tb = SummaryWriter(
                str(pathlib.Path(workdir) / "tb"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (after a resume those steps are run and logged again) and a
        torn line (a run killed while writing it, a full disk), with a warning."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (ValueError, TypeError, KeyError):
                logging.warning("%s:%d is not a whole record; dropped it", self.path, number)
                continue
            if record_step <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self._tb.add_scalar(tag, value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class LossWatch:
    """Warns when the loss jumps above or falls below its exponential moving average.

    One warning per episode: a loss beyond a threshold (a fast fall on repeated data lasts many
    steps, in and out of the band as the loss is noisy) is reported at its first step; the
    episode ends, with one info line, once the loss stayed within both thresholds for `halflife`
    steps, and a new one warns again.

    Args:
      spike: relative rise that counts as a spike (0.5: 50% above the average).
      drop: relative fall that counts as a sudden drop (0.2: 20% below the average).
      halflife: steps for the average's weight to halve; warnings start after `halflife` steps.
    """

    def __init__(self, spike: float, drop: float, halflife: int):
        self.spike, self.drop = spike, drop
        self.decay = 0.5 ** (1.0 / max(halflife, 1))
        self.warmup = halflife
        self.average: float | None = None
        self.seen = 0
        # While an episode lasts: ("spike" | "drop", its first step).
        self.episode: tuple[str, int] | None = None
        self.calm_since: int | None = None  # first of the episode's latest steps within the band

    def update(self, step: int, loss: float, epoch: float | None) -> str | None:
        """Feeds one loss; returns (and logs) the warning when an episode starts, else None."""
        message = None
        kind = None
        where = f"step {step}" + (f", epoch {epoch:.3f}" if epoch is not None else "")
        if self.average is not None and self.seen >= self.warmup:
            if loss > self.average * (1 + self.spike):
                kind = "spike"
                message = f"loss spike at {where}: {loss:.4f} vs running average {self.average:.4f}"
            elif loss < self.average * (1 - self.drop):
                kind = "drop"
                message = (
                    f"sudden loss drop at {where}: {loss:.4f} vs running average {self.average:.4f} "
                    "(the report's models broke after such a drop at the epoch boundary)"
                )
        if kind is not None:
            self.calm_since = None
            if self.episode is not None and self.episode[0] == kind:
                message = None  # this episode has warned already
            else:
                self.episode = (kind, step)
                logging.warning(message)
        elif self.episode is not None:
            self.calm_since = self.calm_since or step
            if step - self.calm_since + 1 >= self.warmup:
                ended, began = self.episode
                logging.info(
                    "loss %s of step %d over: within the thresholds since step %d",
                    ended, began, self.calm_since,
                )  # fmt: skip
                self.episode = self.calm_since = None
        self.average = (
            loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        )
        self.seen += 1
        return message
