"""A run directory (`--workdir`): its layout, its configs, its checkpoint steps, its tokenizer, the
lock and the resume rules that keep it whole. Files only: nothing here imports jax or orbax.

    workdir/
      .lock                 held (flock) by the one `train` process 0 working on it
      config.json           the config of the latest start: it describes the checkpoints
      config_history.jsonl  one line per start or resume: {"step", "time", "host", "config"}
      checkpoints/<step>/   orbax (checkpoint.py; `convert from-hf` writes step 0 itself)
      tokenizer/            the tokenizer `convert from-hf` copies from the HF directory
      metrics.jsonl, tb/    metrics.py

Which checkpoints a workdir holds (`finished_steps`), one rule for every reader (resume, init_from,
to-hf, generate): orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it to
`<step>/` once every item is written (its CheckpointManager lists steps the same way on a local or
mounted filesystem), and `from-hf` assembles its whole output, `checkpoints/0/` included, in a
staged directory renamed into place at the end. So a directory named by a step number is a finished
checkpoint, and nothing else is. Whether its files are still readable is the reader's question: a
damaged step is named (or, when no step was asked for, skipped with a warning), never silently left
out of the listing.

Which config changes a resume accepts (`resume_changes`):
- free: how far the run goes and how it is logged, saved, laid out and computed without changing
  its math (`RESUMABLE`): more `steps` (which also moves the decay horizon), `log_every`,
  `checkpoint_every`, the mesh, `attention_impl`, `remat_policy`, `grad_accum`, the evaluation
  (`eval.eval_every`, `eval.eval_batches`, `eval.data`), ...;
- never: what fixes the shapes of the saved state (`SHAPE_FIELDS`): resume cannot load it;
- everything else (the data and its hold-out, batch, sequence length, seeds, optimizer and
  schedule, dtypes, RoPE) changes what the run computes: refused unless
  `config.train.allow_config_change=True`, which warns, keeps the parameters and optimizer state,
  and (when the data or batch changed) starts the new data from its beginning.
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
from absl import logging

from polyglot_jax.errors import ConfigError, InputError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
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
    "train.compilation_cache_dir",
    "train.spike_threshold",
    "train.drop_threshold",
    "train.spike_halflife",
    "data.prefetch",
    "data.cache_dir",
    "data.tokenizer",  # which tokenizer export and generation use; the ids stay
    "eval.eval_every",  # evaluation only reads: the training is the same with any of these
    "eval.eval_batches",
    "eval.generation_every",  # the monitor only reads the params
    "eval.generation_prompts",
    "eval.generation_max_new_tokens",
    "eval.data",
    "model.attention_impl",
    "model.remat_policy",
    "mesh.",  # every mesh field: restoring reshards onto the new mesh
    "distributed.",  # timeouts of a multi-process run: the global batch is the same on any layout
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
# Changes that make the saved data iterator state meaningless (with allow_config_change); the
# hold-out decides which documents train.
DATA_FIELDS = (
    "data.",
    "train.batch_size",
    "train.seq_len",
    "eval.holdout_fraction",
    "eval.holdout_seed",
)


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


def check_resume(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, has_checkpoints: bool
) -> bool:
    """The new config against the one that made the workdir's checkpoints (the rules above).

    Returns whether the saved data iterator state can be restored. Raises ConfigError for a change
    that no resume can take, or one that needs `config.train.allow_config_change`.
    """
    saved = read_config(workdir)
    if not has_checkpoints or saved is None:
        return True
    changes = resume_changes(flat_config(saved), flat_config(config))
    fresh = f"use a new --workdir (seeded from this run with --config.train.init_from={workdir})"
    if changes.shapes:
        raise ConfigError(
            f"{workdir} holds checkpoints of another model: {describe(changes.shapes)}; "
            f"resume with the old values or {fresh}"
        )
    if changes.guarded and not config.train.get("allow_config_change", False):
        raise ConfigError(
            f"{workdir} holds checkpoints made with other settings: "
            f"{describe(changes.guarded)}; resume with the old values, {fresh}, or pass "
            "--config.train.allow_config_change=True to continue its state with the new ones"
        )
    if changes.guarded:
        logging.warning(
            "resuming %s with changed settings (allow_config_change): %s%s",
            workdir,
            describe(changes.guarded, limit=20),
            "; the data starts from its beginning" if changes.data_changed else "",
        )
    if changes.free:
        logging.info("resuming %s with %s", workdir, describe(changes.free, limit=20))
    return not changes.data_changed


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


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """`workdir/config.json` (the resolved config a run writes) as a ConfigDict; InputError when
    the workdir has none (what reads a finished run: to-hf, generate)."""
    file = pathlib.Path(workdir) / CONFIG
    if not file.is_file():
        raise InputError(f"{file} does not exist: not a polyglot-jax run directory")
    try:
        return ml_collections.ConfigDict(json.loads(file.read_text()))
    except ValueError as e:
        raise InputError(f"{file}: not valid JSON ({e})") from e


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


# ---------------------------------------------------------------- checkpoint steps


def finished_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The finished checkpoints in a `checkpoints/` directory, ascending: its subdirectories named
    by a step number (the rule in the module docstring). Opens and creates nothing."""
    root = pathlib.Path(checkpoints_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def step_directory(workdir: str | os.PathLike, step: int | None) -> tuple[int, pathlib.Path]:
    """(step, `workdir/checkpoints/<step>`): the given step, or the latest when None."""
    root = pathlib.Path(workdir) / CHECKPOINTS
    steps = finished_steps(root)
    if not steps:
        raise InputError(f"no checkpoint with params under {root}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise InputError(
            f"no checkpoint for step {step} in {root} (available: {', '.join(map(str, steps))})"
        )
    return step, root / str(step)


def previous_step_hint(checkpoints_dir: pathlib.Path, step: int) -> str:
    """`; the previous one is step N (--step=N)` when an older checkpoint exists, else ``."""
    older = [s for s in finished_steps(checkpoints_dir) if s < step]
    return f"; the previous one is step {older[-1]} (--step={older[-1]})" if older else ""


# ---------------------------------------------------------------- tokenizer


def run_tokenizer(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, override: str | None = None
) -> pathlib.Path | None:
    """The tokenizer directory of a run: `override`, else `config.data.tokenizer` when set, else
    `workdir/tokenizer` (what `from_hf` writes) when present, else the tokenizer recorded in the
    manifest of the run's first tokenized directory; None when unknown."""
    data = config.get("data") or {}
    if override:
        path = pathlib.Path(override)
    elif data.get("tokenizer"):
        path = pathlib.Path(data["tokenizer"])
    elif (workdir / "tokenizer" / "tokenizer.json").is_file():
        path = workdir / "tokenizer"
    else:
        path = _manifest_tokenizer(data)
        if path is None:
            return None
    if not (path / "tokenizer.json").is_file():
        raise InputError(f"tokenizer directory {path} has no tokenizer.json")
    return path


def _manifest_tokenizer(data: Any) -> pathlib.Path | None:
    """The tokenizer that made the run's first tokenized directory, if that is still on disk.

    The built-in sample is not prepared just to find out (a run on it names its tokenizer in
    `config.data.tokenizer` when it matters, as the demo does).
    """
    shards = list(data.get("shards") or ())
    if not shards or shards[0] == "builtin":
        return None
    from polyglot_jax.data.records import manifest_tokenizer

    manifest = pathlib.Path(shards[0]) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        # Only a fallback for finding the tokenizer: say so, but do not block the export.
        logging.warning(
            "%s: not a readable manifest (%s); the export has no tokenizer", manifest, e
        )
        return None
    if not recorded:
        return None
    # Absolute in new manifests; older ones hold the path as typed: the same lookup as the data
    # side (manifest's directory first, then the current one).
    path = manifest_tokenizer(manifest.parent, str(recorded))
    if path is None:
        logging.warning(
            "%s names tokenizer %r, found neither under %s nor from %s; the export has no "
            "tokenizer (pass --tokenizer=DIR or set config.data.tokenizer)",
            manifest, recorded, manifest.parent, os.getcwd(),
        )  # fmt: skip
        return None
    return path.parent if path.is_file() else path  # a recorded tokenizer.json: its directory
