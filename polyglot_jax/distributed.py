"""Multi-process start-up on JAX's own distributed runtime (no MPI, no torchrun)."""

from __future__ import annotations

import os

import jax
from absl import logging

from polyglot_jax.errors import ConfigError

# Variables by which a cluster announces more than one process to JAX's auto-detection.
_CLUSTER_HINTS = (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
)


def _cluster_detected() -> bool:
    if (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    ):
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Starts the runtime when flags or the cluster's environment ask for more than one process.

    Explicit flags win; otherwise SLURM, Open MPI, TPU pods and Kubernetes (via
    JAX_COORDINATOR_ADDRESS) are detected by `jax.distributed.initialize()` itself.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} is not within [0, --num_processes={num_processes})"
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d; %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
