"""Multi-process start-up on JAX's own distributed runtime (no MPI, no torchrun).

Where the processes come from, first match wins:
1. flags `--coordinator_address=host:port --num_processes=N --process_id=i`;
2. env `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (`launch/local/`,
   Kubernetes; in an Indexed Job the pod's `JOB_COMPLETION_INDEX` stands in for the process id);
3. a cluster JAX detects itself: SLURM (`srun`), Open MPI (`mpirun`), TPU VM pods.

Which GPUs a process sees (`local_device_ids`): JAX alone gives every SLURM / Open MPI task the
one GPU numbered by its local rank, which is wrong both ways the jobs are usually started:
- one task per node must see all of the node's GPUs: JAX's default would leave 7 of 8 idle;
- one task per GPU bound by the scheduler (`--gpus-per-task=1`: `CUDA_VISIBLE_DEVICES` already
  names only that GPU) must see device 0: JAX's default names a device that is not there.
`local_device_ids_for` decides from the environment; `JAX_LOCAL_DEVICE_IDS` overrides it.

Timeouts come from `config.distributed` (`distributed_settings`): how long process start-up waits
for every peer, and the bound within which a process that lost a peer exits (`watchdog.py`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from polyglot_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """`config.distributed`, checked (seconds)."""

    initialization_timeout_s: int = 300  # every process must have joined by then
    heartbeat_timeout_s: int = 60  # a peer silent this long is lost: the others exit non-zero
    step_timeout_s: int = 1800  # no step finished anywhere this long (after the first): exit


def distributed_settings(config: Any) -> DistributedSettings:
    """The checked `config.distributed` section (defaults where a config has none)."""
    section = config.get("distributed") if config is not None else None
    values = {}
    for field in dataclasses.fields(DistributedSettings):
        value = section.get(field.name, field.default) if section is not None else field.default
        low = 0 if field.name == "step_timeout_s" else 1  # 0 turns the step check off
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"config.distributed.{field.name}={value!r} must be an int of seconds >= {low}"
            )
        values[field.name] = value
    return DistributedSettings(**values)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """Processes the scheduler started on this node (SLURM or Open MPI), when it says."""
    local = _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    if local is not None:
        return local
    # SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE: "8(x4)" or "2,1" (per node, in node order).
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = _env_int(env, "SLURM_NODEID") or 0
    if spec:
        counts = []
        for part in spec.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                return _env_int(env, "SLURM_NTASKS_PER_NODE")
            counts += [int(match[1])] * int(match[2] or 1)
        return counts[node] if node < len(counts) else counts[-1]
    return _env_int(env, "SLURM_NTASKS_PER_NODE")


def local_device_ids_for(env: Mapping[str, str]) -> list[int] | None:
    """The GPUs this process should use, for a SLURM or Open MPI task; None: JAX's own choice.

    `[]` means every GPU the process can see. With one task per node that is all of them; with
    several, a task whose `CUDA_VISIBLE_DEVICES` lists fewer GPUs than there are tasks was bound
    by the scheduler and uses what it sees; otherwise task k of T on a node with G visible GPUs
    takes GPUs [k*G/T, (k+1)*G/T) (G unknown: GPU k, as JAX would)."""
    if "JAX_LOCAL_DEVICE_IDS" in env:
        return None  # JAX reads it itself
    rank = _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    if rank is None:
        rank = _env_int(env, "SLURM_LOCALID")
    if rank is None:
        return None
    tasks = _tasks_on_this_node(env) or 1
    if tasks == 1:
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [rank]
    count = len([v for v in visible.split(",") if v.strip()])
    if count < tasks:
        return []  # bound: each task sees only its own GPU(s)
    if count % tasks:
        raise ConfigError(
            f"{count} GPUs in CUDA_VISIBLE_DEVICES do not split evenly over the {tasks} tasks on "
            "this node (set JAX_LOCAL_DEVICE_IDS, or start one task per node or per GPU)"
        )
    per = count // tasks
    return list(range(rank * per, (rank + 1) * per))


def _from_env(env: Mapping[str, str]) -> tuple[str, int, int] | None:
    """(coordinator, processes, id) from JAX_COORDINATOR_ADDRESS & co., when they name them."""
    address = env.get("JAX_COORDINATOR_ADDRESS")
    count = _env_int(env, "JAX_NUM_PROCESSES")
    pid = _env_int(env, "JAX_PROCESS_ID")
    if pid is None:
        pid = _env_int(env, "JOB_COMPLETION_INDEX")
    if not address or count is None:
        return None
    if pid is None:
        raise ConfigError(
            "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but neither JAX_PROCESS_ID "
            "nor JOB_COMPLETION_INDEX says which process this is"
        )
    return address, count, pid


def _cluster_detected(env: Mapping[str, str]) -> bool:
    if (_env_int(env, "SLURM_NTASKS") or 1) > 1 or (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    settings: DistributedSettings | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Starts the runtime when flags or the environment ask for more than one process.

    Returns whether it started. JAX's own heartbeat is set to twice `heartbeat_timeout_s` (plus
    a margin), so that the watchdog, which names the lost peer in one line, acts first and the
    runtime's abort (a native stack trace) is only the backstop.
    """
    env = os.environ if env is None else env
    settings = settings or DistributedSettings()
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
    kwargs: dict[str, Any] = {
        "initialization_timeout": settings.initialization_timeout_s,
        "heartbeat_timeout_seconds": 2 * settings.heartbeat_timeout_s + 10,
    }
    if not all(given) and (found := _from_env(env)) is not None:
        coordinator_address, num_processes, process_id = found
        given = [True]
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"process id {process_id} is not within [0, {num_processes}) processes"
            )
        # Named outright: JAX's cluster detection must not second-guess them (it would give a
        # SLURM task one GPU, or look for the Kubernetes API).
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            cluster_detection_method="deactivate",
            **kwargs,
        )
    elif _cluster_detected(env):
        ids = local_device_ids_for(env)
        jax.distributed.initialize(local_device_ids=ids, **kwargs)
    else:
        return False
    logging.info(
        "process %d of %d; %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
