"""Start-up from the environment: which processes, which GPUs each sees, the timeouts.

Real processes are in test_multiprocess.py; these check each environment a scheduler makes."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polyglot_jax import distributed
from polyglot_jax.distributed import (
    DistributedSettings,
    distributed_settings,
    local_device_ids_for,
)
from polyglot_jax.errors import ConfigError
from polyglot_jax.partitioning import process_row_block


def slurm(tasks_per_node, localid, nodes=4, **extra):
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "gpu[001-004]",
        "SLURM_NTASKS": str(tasks_per_node * nodes),
        "SLURM_PROCID": str(localid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
    }
    return env | extra


@pytest.mark.parametrize(
    "env, want",
    [
        # One task per node: every GPU of the node (JAX alone would give it GPU 0 only).
        (slurm(1, 0), []),
        (slurm(1, 0, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), []),
        # One task per GPU, the scheduler binding them (--gpus-per-task=1): the one it sees.
        (slurm(8, 5, CUDA_VISIBLE_DEVICES="5"), []),
        # One task per GPU, all 8 visible to each: its own.
        (slurm(8, 5, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), [5]),
        (slurm(8, 5), [5]),
        # Two tasks per node with 4 GPUs each.
        (slurm(2, 1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), [4, 5, 6, 7]),
        # Uneven per-node counts: node 1 of "2,1" has one task.
        (
            slurm(2, 0, SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NODEID="1"),
            [],
        ),
        # Open MPI, 4 ranks per node.
        (
            {
                "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                "CUDA_VISIBLE_DEVICES": "0,1,2,3",
            },
            [3],
        ),
        # The user's own choice, and no scheduler at all: JAX decides.
        (slurm(8, 5, JAX_LOCAL_DEVICE_IDS="2"), None),
        ({}, None),
    ],
)
def test_local_device_ids(env, want):
    assert local_device_ids_for(env) == want


def test_uneven_gpus_per_task_is_refused():
    with pytest.raises(ConfigError, match="6 GPUs in CUDA_VISIBLE_DEVICES do not split evenly"):
        local_device_ids_for(slurm(4, 1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5"))


def test_processes_from_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed.logging, "info", lambda *a: None)
    env = {"JAX_COORDINATOR_ADDRESS": "head:1234", "JAX_NUM_PROCESSES": "4"}
    with pytest.raises(ConfigError, match="neither JAX_PROCESS_ID nor JOB_COMPLETION_INDEX"):
        distributed.initialize(None, None, None, env=env)
    settings = DistributedSettings(initialization_timeout_s=30, heartbeat_timeout_s=20)
    # A Kubernetes Indexed Job names the pod by its completion index.
    assert distributed.initialize(None, None, None, settings, env | {"JOB_COMPLETION_INDEX": "2"})
    assert calls[-1] == (
        ("head:1234", 4, 2),
        {
            "cluster_detection_method": "deactivate",
            "initialization_timeout": 30,
            "heartbeat_timeout_seconds": 50,
        },
    )
    assert distributed.initialize(None, None, None, env=env | {"JAX_PROCESS_ID": "3"})
    assert calls[-1][0] == ("head:1234", 4, 3)
    # Flags win over the environment.
    assert distributed.initialize("other:1", 2, 1, env=env | {"JAX_PROCESS_ID": "3"})
    assert calls[-1][0] == ("other:1", 2, 1)
    # SLURM: JAX finds the processes; we say which GPUs.
    assert distributed.initialize(None, None, None, env=slurm(1, 0))
    assert calls[-1] == ((), {"local_device_ids": [], **calls[-1][1]})
    n = len(calls)
    assert not distributed.initialize(None, None, None, env={})  # one process: nothing starts
    assert len(calls) == n
    with pytest.raises(ConfigError, match="go together"):
        distributed.initialize("a:1", None, 0, env={})
    with pytest.raises(ConfigError, match=r"process id 4 is not within \[0, 4\)"):
        distributed.initialize(None, None, None, env=env | {"JAX_PROCESS_ID": "4"})
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four' is not an integer"):
        distributed.initialize(None, None, None, env=env | {"JAX_NUM_PROCESSES": "four"})


def test_settings_are_checked():
    c = ml_collections.ConfigDict({"distributed": {"heartbeat_timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"config.distributed.heartbeat_timeout_s=0 must be"):
        distributed_settings(c)
    c.distributed.heartbeat_timeout_s = 5
    c.distributed.step_timeout_s = 0  # off is allowed
    assert distributed_settings(c) == DistributedSettings(300, 5, 0)
    assert distributed_settings(ml_collections.ConfigDict()) == DistributedSettings()


def test_one_process_holds_the_whole_batch_on_any_layout():
    devices = np.array(jax.devices()[:8])
    for shape, spec in [
        ((8,), PartitionSpec("data")),
        ((2, 4), PartitionSpec(("data", "fsdp"))),
        ((2, 4), PartitionSpec(None)),  # replicated
    ]:
        names = ("data", "fsdp")[: len(shape)]
        sharding = NamedSharding(Mesh(devices.reshape(shape), names), spec)
        assert process_row_block(sharding, 16) == (0, 1)
