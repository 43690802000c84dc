"""Train a model: auto-resumes from WORKDIR/checkpoints/, multi-process when flags or the cluster say so."""

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
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    from polyglot_jax.train import train  # after the runtime starts: it must precede any device use

    workdir = pathlib.Path(_WORKDIR.value)
    result = train(_CONFIG.value, workdir)
    if result.get("nothing_to_do"):
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
