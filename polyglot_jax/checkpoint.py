"""Training checkpoints under `workdir/checkpoints/<step>/` with orbax, and the params of one read
back outside training (init_from, generation, verification).

Items of a checkpoint: `params` and `opt_state` (sharded arrays, restored onto whatever mesh the
abstract target names, so a run can resume on another mesh shape) and `data_iter` (the grain
iterator's state: the same on every process, since the global batch is; grain writes one JSON file
per process and a restore reads it on any process count). orbax writes into a temporary directory and renames it
when complete, so only finished checkpoints are visible; which steps a workdir holds is
`workdir.finished_steps`, for every reader. A latest checkpoint that cannot be read is reported and
the previous one is used.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as logging_std
import pathlib
import shutil
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from polyglot_jax.errors import ConfigError, InputError, PolyglotError
from polyglot_jax.output_dir import as_os_error
from polyglot_jax.workdir import CHECKPOINTS, finished_steps, previous_step_hint, step_directory


class _IteratorSnapshot:
    """The iterator state captured when the save was requested, not when orbax writes it."""

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


# What reading a damaged checkpoint raises: a missing file (OSError), garbled JSON or TensorStore
# data (ValueError), a missing key in its metadata (KeyError), a short read (EOFError).
UNREADABLE = (OSError, ValueError, KeyError, EOFError)


def unreadable_cause(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says a file cannot be read, or None (then it is a bug).

    orbax wraps TensorStore's read errors in a bare `Exception` whose cause is the ValueError."""
    link, seen = error, []
    while link is not None and all(link is not s for s in seen):
        if isinstance(link, UNREADABLE):
            return link
        seen.append(link)
        link = link.__cause__ or link.__context__
    return None


class _Echoes(logging_std.Filter):
    """asyncio's "Future/Task exception was never retrieved" records of the failed I/O, and
    orbax's own traceback of the error that the caller raises."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        if "exception was never retrieved" in record.getMessage():
            return False
        return not (record.exc_info and "/orbax/" in record.pathname)


@contextlib.contextmanager
def _orbax_echoes_dropped() -> Iterator[None]:
    """orbax reads and writes arrays in parallel coroutines on an event loop of its own. When files
    are damaged or the disk is full, the first error ends the loop: the other coroutines' errors
    are never retrieved (Python prints each, with a 60-line TensorStore spec, when it is collected;
    asyncio logs each future's) and I/O still in flight reports "Event loop is closed". The caller
    reports the first error in one line; this drops the echoes."""
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    echoes = _Echoes()

    def closed_loop(value: BaseException | None) -> bool:
        return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

    def unraisable(u) -> None:
        obj = u.object
        if isinstance(obj, types.CoroutineType) and "/orbax/" in obj.cr_code.co_filename:
            return
        if not closed_loop(u.exc_value):
            previous_unraisable(u)

    def excepthook(kind, value, tb) -> None:
        if not closed_loop(value):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    loggers = [logging_std.getLogger(name) for name in ("asyncio", "absl")]
    for logger in loggers:
        logger.addFilter(echoes)
    try:
        yield
    except BaseException:
        # Echoes keep coming as the failed coroutines are collected, up to interpreter exit: the
        # hooks stay for the rest of this process (they drop those echoes and nothing else).
        gc.collect()
        raise
    sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except
    for logger in loggers:
        logger.removeFilter(echoes)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error message, cut short (TensorStore's carry a long JSON spec)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path_key(path: tuple) -> str:
    """`mu/layers/attention/qkv_kernel`, whatever the key types (dict, sequence, attribute)."""
    names = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return "/".join(names)


def saved_shapes(item_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """`{path: shape}` of the arrays in one saved item, read from its metadata (no array data)."""
    metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
    flat = jax.tree_util.tree_flatten_with_path(metadata)[0]
    return {_path_key(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")}


def check_fits(
    step_dir: pathlib.Path, item: str, saved: dict, abstract: Any, hint: str | None = None
) -> None:
    """ConfigError naming the first arrays whose saved shape differs from the new config's."""
    wanted = {
        _path_key(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    if saved == wanted:
        return
    diffs = [
        f"{k} saved {saved.get(k, 'absent')}, now {wanted.get(k, 'absent')}"
        for k in sorted(saved.keys() | wanted.keys())
        if saved.get(k) != wanted.get(k)
    ]
    raise ConfigError(
        f"checkpoint {step_dir} was made with another model or optimizer config ({item}: "
        f"{'; '.join(diffs[:3])}{f' and {len(diffs) - 3} more' if len(diffs) > 3 else ''}); "
        + (
            hint
            or "resume with the old config, use a new --workdir, or seed one with "
            f"--config.train.init_from={step_dir.parent.parent}"
        )
    )


class Checkpointer:
    """Async saves every N steps, keeps the last `keep` plus every `keep_period`-th step for good."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        keep: int,
        keep_period: int | None,
        async_save: bool = True,
    ):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: int | None = None  # the step of the latest save

    @staticmethod
    def steps_in(workdir: str | pathlib.Path) -> list[int]:
        """Finished checkpoint steps of a workdir, without opening (or creating) anything."""
        return finished_steps(pathlib.Path(workdir) / CHECKPOINTS)

    def steps(self) -> list[int]:
        """The steps this manager holds, a save still being written included."""
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, params: Any, opt_state: Any, data_iter: Any | None, *, force: bool = False
    ) -> bool:
        items = {
            "params": ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
        }
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
        self._writing = step
        with self._write_errors_named():
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _write_errors_named(self) -> Iterator[None]:
        """A failed write (disk full, permission) is one OSError naming the step; its partial
        files (orbax's `<step>.orbax-checkpoint-tmp*`) are removed."""
        try:
            with _orbax_echoes_dropped():
                yield
        except Exception as e:
            error = as_os_error(e) if not isinstance(e, PolyglotError) else None
            if error is None or self._writing is None:
                raise
            for partial in self.directory.glob(f"{self._writing}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            where = self.directory / str(self._writing)
            raise OSError(error.errno, error.strerror, str(where)) from e

    def restore_latest(
        self, abstract_params: Any, abstract_opt_state: Any, data_iter: Any | None
    ) -> tuple[int, Any, Any] | None:
        """(step, params, opt_state) of the newest readable checkpoint, or None if there is none.

        `abstract_*` are trees of `jax.ShapeDtypeStruct` with the target shardings. The data
        iterator, when given, is set to the saved position in place.

        A checkpoint whose files cannot be read (missing, truncated, garbled) is moved to
        `corrupt_checkpoints/` and the previous one is tried. A readable one whose arrays do not
        fit the abstract trees is a ConfigError, and so is a data iterator state that does not fit
        the pipeline: nothing is moved then.
        """
        for step in reversed(finished_steps(self.directory)):
            step_dir = self.directory / str(step)
            try:
                saved = {item: saved_shapes(step_dir / item) for item in ("params", "opt_state")}
            except UNREADABLE as e:
                self._fall_back(step, e)
                continue
            check_fits(step_dir, "params", saved["params"], abstract_params)
            check_fits(step_dir, "opt_state", saved["opt_state"], abstract_opt_state)
            items = {
                "params": ocp.args.StandardRestore(abstract_params),
                "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            }
            try:
                with _orbax_echoes_dropped():
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                state = None if data_iter is None else read_iterator_state(step_dir)
            except Exception as e:  # noqa: BLE001 - only unreadable files fall back; others raise
                cause = unreadable_cause(e)  # shapes fit (checked above): the data is damaged
                if cause is None:
                    raise
                self._fall_back(step, cause)
                continue
            if data_iter is not None:
                data_iter.set_state(state)
                if hasattr(data_iter, "start_prefetch"):  # as grain's own restore does
                    data_iter.start_prefetch()
            return step, restored["params"], restored["opt_state"]
        return None

    def _fall_back(self, step: int, error: BaseException) -> None:
        aside = self._set_aside(step)
        logging.warning(
            "checkpoint %s/%d cannot be restored (%s: %s); moved to %s, falling back to the previous one",
            self.directory,
            step,
            type(error).__name__,
            first_line(error),
            aside,
        )

    def _set_aside(self, step: int) -> pathlib.Path:
        """Moves an unreadable checkpoint out of the way (kept for inspection, never reused)."""
        aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        aside.parent.mkdir(exist_ok=True)
        (self.directory / str(step)).rename(aside)
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Blocks until the async save in flight (if any) is committed."""
        with self._write_errors_named():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._write_errors_named():
            self.manager.wait_until_finished()
        self.manager.close()


def read_iterator_state(step_dir: pathlib.Path) -> dict[str, Any]:
    """The data iterator state of a checkpoint, whichever process count saved it.

    grain names its files `process_<i>-of-<n>.json`; the state is global, so this process's own
    file is read when the process count is the same, and process 0's otherwise. Missing or garbled
    files raise OSError / ValueError (UNREADABLE)."""
    directory = step_dir / "data_iter"
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not own.exists():
        saved = sorted(directory.glob("process_0-of-*.json"))
        if not saved:
            raise FileNotFoundError(2, "no data iterator state", str(directory))
        own = saved[0]
    return json.loads(own.read_text())


def _is_step_dir(path: pathlib.Path) -> bool:
    """A path given as one checkpoint (`checkpoints/<step>`), not as a workdir named by a number."""
    return path.name.isdigit() and (path / "params").is_dir()


def _candidate_steps(path: pathlib.Path) -> Iterator[tuple[pathlib.Path, int]]:
    """(checkpoints dir, step) pairs to try, newest first, for a workdir, a checkpoints dir or a step dir."""
    if _is_step_dir(path):
        yield path.parent, int(path.name)
        return
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    for step in reversed(finished_steps(root)):
        yield root, step


def restore_params(path: str | pathlib.Path, abstract_params: Any) -> tuple[Any, pathlib.Path]:
    """Only the parameters of a workdir's newest checkpoint (or of a given `checkpoints/<step>` dir).

    Used to seed a new run (`config.train.init_from`) and by conversion. Returns (params, step dir).
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise InputError(f"checkpoint path {path} does not exist")
    candidates = list(_candidate_steps(path))
    if not candidates:
        raise InputError(f"no checkpoint with params under {path}")
    named_step = _is_step_dir(path)
    for root, step in candidates:
        step_dir = root / str(step)
        try:
            saved = saved_shapes(step_dir / "params")
            check_fits(step_dir, "params", saved, abstract_params, "config.model must match it")
            with _orbax_echoes_dropped(), ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(step_dir / "params", abstract_params), step_dir
        except Exception as e:  # noqa: BLE001 - only unreadable files fall back; others raise
            cause = unreadable_cause(e)
            if cause is None:
                raise
            if named_step:
                raise InputError(
                    f"checkpoint {step_dir} cannot be read ({first_line(cause)})"
                    f"{previous_step_hint(root, step)}"
                ) from e
            logging.warning(
                "checkpoint %s cannot be read (%s); trying an older one",
                step_dir,
                first_line(cause),
            )
    raise InputError(f"no readable checkpoint under {path}")


def load_params(
    workdir: str | pathlib.Path, step: int | None, cfg: Any, shardings: Any = None
) -> Any:
    """The params of `workdir`'s checkpoint `step` (latest when None); `cfg` is the run's
    `ModelConfig`. Restored straight into `shardings` (a tree like the params, e.g. from
    `partitioning.logical_shardings`), or whole on the first device when None."""
    import flax.linen as nn

    from polyglot_jax.model import abstract_params

    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype),
        abstract_params(cfg),
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    if shardings is None:
        shardings = jax.tree.map(
            lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes
        )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    if step is None:  # the latest readable one: a damaged newest step falls back, with a warning
        step_directory(workdir, None)  # one clear error when there is none
        params, _ = restore_params(pathlib.Path(workdir) / CHECKPOINTS, abstract)
        return params
    _, step_dir = step_directory(workdir, step)
    params, _ = restore_params(step_dir, abstract)
    return params
