"""A run directory (`--workdir`) and what keeps it whole: a lock, its configs, resume rules.

    workdir/
      .lock                 held (flock) by the one `train` process 0 working on it
      config.json           the config of the latest start: it describes the checkpoints
      config_history.jsonl  one line per start or resume: {"step", "time", "host", "config"}
      checkpoints/<step>/   orbax (checkpoint.py)
      metrics.jsonl, tb/    metrics.py

Which config changes a resume accepts (`resume_changes`):
- free: how far the run goes and how it is logged, saved, laid out and computed without changing
  its math (`RESUMABLE`): more `steps` (which also moves the decay horizon), `log_every`,
  `checkpoint_every`, the mesh, `attention_impl`, `remat_policy`, `grad_accum`, ...;
- never: what fixes the shapes of the saved state (`SHAPE_FIELDS`): resume cannot load it;
- everything else (the data, batch, sequence length, seeds, optimizer and schedule, dtypes, RoPE)
  changes what the run computes: refused unless `config.train.allow_config_change=True`, which
  warns, keeps the parameters and optimizer state, and (when the data or batch changed) starts
  the new data from its beginning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import ml_collections

from polyglot_jax.errors import ConfigError, InputError

CONFIG = "config.json"
HISTORY = "config_history.jsonl"
LOCK = ".lock"

RESUMABLE = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_every",
    "train.async_checkpoints",
    "train.init_from",  # only seeds a new run; a resume has its own state
    "train.allow_config_change",
    "train.grad_accum",  # the same global batch, summed in another number of pieces
    "train.loss_chunk",
    "train.nan_policy",
    "train.peak_flops_per_device",
    "train.profile_steps",
    "train.spike_threshold",
    "train.drop_threshold",
    "train.spike_halflife",
    "data.prefetch",
    "data.cache_dir",
    "data.tokenizer",  # which tokenizer export and generation use; the ids stay
    "model.attention_impl",
    "model.remat_policy",
    "mesh.",  # every mesh field: restoring reshards onto the new mesh
)
SHAPE_FIELDS = (
    "model.vocab_size",
    "model.num_layers",
    "model.d_model",
    "model.d_ff",
    "model.num_heads",
    "model.param_dtype",
    "model.scan_layers",
)
# Changes that make the saved data iterator state meaningless (with allow_config_change).
DATA_FIELDS = ("data.", "train.batch_size", "train.seq_len")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """`{"section.field": value}` as the config reads back from JSON (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", config)
    return flat


@dataclasses.dataclass(frozen=True)
class ResumeChanges:
    """How a new config differs from the one that made a run's checkpoints."""

    free: dict[str, tuple[Any, Any]]  # field -> (old, new)
    shapes: dict[str, tuple[Any, Any]]
    guarded: dict[str, tuple[Any, Any]]

    @property
    def data_changed(self) -> bool:
        return any(_matches(k, DATA_FIELDS) for k in self.guarded)


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> ResumeChanges:
    """Classifies the fields that differ between two `flat_config`s.

    Fields present in only one of them (a config written by another version) are not compared.
    """
    free, shapes, guarded = {}, {}, {}
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key]:
            continue
        pair = (old[key], new[key])
        if _matches(key, RESUMABLE):
            free[key] = pair
        elif _matches(key, SHAPE_FIELDS):
            shapes[key] = pair
        else:
            guarded[key] = pair
    return ResumeChanges(free, shapes, guarded)


def describe(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """`a.b 1 -> 2, c.d 'x' -> 'y'` (the first `limit`, then a count)."""
    items = [f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def read_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """`workdir/config.json` as a nested dict, or None when the run has none."""
    file = pathlib.Path(workdir) / CONFIG
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{file} cannot be read ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{file} holds {type(data).__name__}, not a config object")
    return data


def record_start(config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int) -> None:
    """Writes `config.json` (atomically) and appends the start to `config_history.jsonl`."""
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    tmp = workdir / f"{CONFIG}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(workdir / CONFIG)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {
        "step": step,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "config": json.loads(text),
    }
    with open(workdir / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


@contextlib.contextmanager
def locked(workdir: pathlib.Path) -> Iterator[None]:
    """An exclusive `flock` on `workdir/.lock` for the block; ConfigError when another holds it.

    The kernel drops the lock when the holder dies, so a killed run never leaves it stale. Only
    process 0 of a job locks. Across hosts this relies on the filesystem's `flock` (local disks
    and NFSv4 have it; some FUSE mounts do not, and there two jobs are not kept apart).
    """
    path = workdir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(
                f"{workdir} is in use by {holder}: one train per workdir (wait for it, stop it, "
                "or use another --workdir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the holder's name goes with it: an idle workdir's lock is empty
    finally:
        os.close(fd)  # closing releases the lock
