"""Training checkpoints under `workdir/checkpoints/<step>/` with orbax.

Items of a checkpoint: `params` and `opt_state` (sharded arrays, restored onto whatever mesh the
abstract target names, so a run can resume on another mesh shape) and `data_iter` (the grain
iterator's state, one JSON file per process). orbax writes into a temporary directory and renames it
when complete, so only finished checkpoints are visible. A latest checkpoint that cannot be read is
reported and the previous one is used.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging

from polyglot_jax.errors import InputError


class _IteratorSnapshot:
    """The iterator state captured when the save was requested, not when orbax writes it."""

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


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
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
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
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(
        self, abstract_params: Any, abstract_opt_state: Any, data_iter: Any | None
    ) -> tuple[int, Any, Any] | None:
        """(step, params, opt_state) of the newest readable checkpoint, or None if there is none.

        `abstract_*` are trees of `jax.ShapeDtypeStruct` with the target shardings. The data
        iterator, when given, is set to the saved position in place.
        """
        for step in reversed(self.steps()):
            items = {
                "params": ocp.args.StandardRestore(abstract_params),
                "opt_state": ocp.args.StandardRestore(abstract_opt_state),
            }
            if data_iter is not None:
                items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back, say why
                aside = self._set_aside(step)
                logging.warning(
                    "checkpoint %s/%d cannot be restored (%s: %s); moved to %s, falling back to the previous one",
                    self.directory,
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                    aside,
                )
                continue
            return step, restored["params"], restored["opt_state"]
        return None

    def _set_aside(self, step: int) -> pathlib.Path:
        """Moves an unreadable checkpoint out of the way (kept for inspection, never reused)."""
        aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        aside.parent.mkdir(exist_ok=True)
        (self.directory / str(step)).rename(aside)
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Blocks until the async save in flight (if any) is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _candidate_steps(path: pathlib.Path) -> Iterator[tuple[pathlib.Path, int]]:
    """(checkpoints dir, step) pairs to try, newest first, for a workdir, a checkpoints dir or a step dir."""
    if path.name.isdigit() and (path / "params").is_dir():
        yield path.parent, int(path.name)
        return
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(
        (int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "params").is_dir()),
        reverse=True,
    )
    for step in steps:
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
    for root, step in candidates:
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(root / str(step) / "params", abstract_params)
            return params, root / str(step)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try an older one
            logging.warning(
                "checkpoint %s/%d cannot be restored (%s); trying an older one", root, step, e
            )
    raise InputError(f"no readable checkpoint under {path}")
