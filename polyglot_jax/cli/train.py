"""Train a model: auto-resumes from WORKDIR/checkpoints/, multi-process when flags or the cluster say so.

Processes come from flags, from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or
from SLURM, Open MPI and TPU pods (distributed.py). Exit codes: 0 done, 1 failed, 2 bad usage or
input, 3 lost a peer (watchdog.py).
"""

from __future__ import annotations

import pathlib

from absl import flags
from ml_collections import config_flags

from polyglot_jax import distributed
from polyglot_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py[:variant]."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints/, metrics.jsonl, tb/, config.json."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Total number of processes (multi-process)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")


def main(argv):
    if _CONFIG.value is None:
        raise ConfigError("--config is required (e.g. --config=configs/tiny.py)")
    if not _WORKDIR.value:
        raise ConfigError("--workdir is required")
    started = distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        distributed.distributed_settings(_CONFIG.value),
    )

    from polyglot_jax.train import train  # after the runtime starts: it must precede any device use

    workdir = pathlib.Path(_WORKDIR.value)
    try:
        result = train(_CONFIG.value, workdir)
    except Exception as e:
        if started:
            _leave(e)
        raise
    import jax

    if result.get("nothing_to_do") or jax.process_index() != 0:  # one report, from process 0
        return 0
    if result.get("preempted"):
        print(
            f"stopped by a signal at step {result.get('step')}; checkpoint saved in {workdir}/checkpoints"
        )
    else:
        print(f"done: step {result.get('step')}, loss {result.get('loss', float('nan')):.4f}")
    print(
        f"outputs: {workdir}/checkpoints (orbax), {workdir}/metrics.jsonl, {workdir}/tb, {workdir}/config.json"
    )


def _leave(error: Exception) -> None:
    """Reports a failed multi-process run and exits at once. JAX's exit handler would wait at a
    barrier for every peer, and a peer that is gone makes it hang, then abort with a stack trace."""
    import os
    import sys
    import traceback

    from polyglot_jax.cli import PROG, os_error_line
    from polyglot_jax.errors import PolyglotError

    if isinstance(error, PolyglotError):
        line, code = str(error).splitlines()[0] if str(error) else type(error).__name__, 2
    elif isinstance(error, OSError):
        line, code = os_error_line(error), 1
    else:
        traceback.print_exception(error)
        line, code = f"{type(error).__name__} (traceback above)", 1
    print(f"{PROG} train: error: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)
