"""Real multi-process training on 127.0.0.1: processes x CPU devices on one mesh spanning them.

Every run trains the same tiny model on the same data; the reference is one process with 8
devices (whose own trajectory tests/test_train_reference.py checks against float64 numpy). The
global batch does not depend on the process count, so every layout gives the same losses, also
across a resume onto another process count. Gloo's cross-process sums add in another order than
one process does: losses agree to float32 rounding (rtol 1e-5), not bit for bit.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from polyglot_jax.train import train
from tests.train_fixtures import REPO, tiny_config, tiny_shards

STEPS = 24
HEARTBEAT_S = 5  # config.distributed.heartbeat_timeout_s of the runs that lose a peer


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


def overrides(shards: pathlib.Path, steps: int = STEPS) -> list[str]:
    """tests/train_fixtures.tiny_config as command-line flags."""
    return [
        "--config=" + str(REPO / "configs" / "tiny.py"),
        "--config.model.d_model=64",
        "--config.model.d_ff=128",
        "--config.model.rotary_dim=8",
        f"--config.train.steps={steps}",
        "--config.train.batch_size=16",
        "--config.train.seq_len=32",
        "--config.train.warmup_steps=2",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=4",
        "--config.train.async_checkpoints=False",
        f"--config.data.shards=('{shards}',)",
        "--config.data.shuffle_buffer=64",
        "--config.data.prefetch=0",
        f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
        *(f"--config.eval.{k}={v}" for k, v in EVAL.items()),
        f"--config.data.tokenizer={shards.parent / 'tokenizer'}",
    ]


# Validation loss and the generation monitor run on the mesh spanning the processes too. A hold-out
# of 0.5: without ../shared the built-in sample is 11 documents, and 0.05 of them holds none out.
EVAL = dict(
    eval_every=8, eval_batches=2, holdout_fraction=0.5, generation_every=12,
    generation_max_new_tokens=8,
)  # fmt: skip


def records(workdir: pathlib.Path) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def losses(workdir: pathlib.Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(workdir).items()}


def assert_same_run(workdir: pathlib.Path, want: dict[int, dict]) -> None:
    """Losses, validation losses and the monitor's greedy texts of every step equal `want`'s."""
    got = records(workdir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for key in ("loss", "eval_loss"):
        steps = [s for s in want if key in want[s]]
        assert steps == [s for s in got if key in got[s]] and steps
        np.testing.assert_allclose(
            [got[s][key] for s in steps], [want[s][key] for s in steps], rtol=1e-5, atol=0
        )
    texts = [s for s in want if "gen_samples" in want[s]]
    assert texts == [12, 24]
    assert [got[s]["gen_samples"] for s in texts] == [want[s]["gen_samples"] for s in texts]


def one_process_config(shards: pathlib.Path):
    config = tiny_config(shards, train__steps=STEPS, train__checkpoint_every=4)
    config.distributed.heartbeat_timeout_s = HEARTBEAT_S
    config.eval.update(EVAL)
    config.data.tokenizer = str(shards.parent / "tokenizer")
    return config


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[int, dict]:
    """One process, 8 devices (data-parallel: configs/tiny.py's mesh)."""
    workdir = tmp_path_factory.mktemp("one-process")
    train(one_process_config(shards), workdir)
    return records(workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(devices: int) -> dict[str, str]:
    """This environment without any sign of a cluster, with `devices` CPU devices per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "JAX_", "PMI_", "TPU_"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(REPO),
    )
    return env


TRAIN = [sys.executable, "-m", "polyglot_jax", "train"]


def run_local(processes: int, devices: int, workdir: pathlib.Path, args: list[str]):
    """The processes started as launch/local/run.sh starts them."""
    command = ["bash", str(REPO / "launch" / "local" / "run.sh"), "-n", str(processes)]
    command += ["-d", str(devices), "-p", str(free_port()), "--"]
    command += TRAIN + [f"--workdir={workdir}", *args]
    return subprocess.run(
        command, env=clean_env(devices), capture_output=True, text=True, timeout=600
    )


def test_two_processes_via_launch_local_equal_one(shards, reference, tmp_path):
    workdir = tmp_path / "run"
    done = run_local(2, 4, workdir, overrides(shards))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(workdir, reference)
    # Process 0 wrote the run's files; both processes saved the (same, global) iterator state.
    states = [
        json.loads(p.read_text())
        for p in sorted(workdir.glob("checkpoints/24/data_iter/process_*.json"))
    ]
    assert len(states) == 2 and states[0] == states[1] and "process_index" not in states[0]
    assert done.stdout.count("done: step 24") == 1  # from process 0 only


def slurm_env(task: int, tasks: int, port: int) -> dict[str, str]:
    """What `srun --ntasks=2` on one node sets: JAX's own SLURM detection forms the mesh."""
    env = clean_env(4)
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(tasks),
        SLURM_PROCID=str(task),
        SLURM_LOCALID=str(task),
        SLURM_NODEID="0",
        SLURM_STEP_TASKS_PER_NODE=str(tasks),
        SLURM_STEP_NUM_NODES="1",
        JAX_COORDINATOR_PORT=str(port),  # (else derived from the job id: tests may run at once)
    )
    return env


def wait_for_step(workdir: pathlib.Path, step: int, procs, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if max(losses(workdir), default=0) >= step:
                return
        except (OSError, json.JSONDecodeError):
            pass
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process exited early: {p.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {seconds} s")


def test_slurm_run_loses_a_peer_then_resumes_on_other_layouts(shards, reference, tmp_path):
    """2 SLURM tasks x 4 devices; task 1 is killed mid-run: task 0 exits naming it within the
    heartbeat bound. The run resumes from its last checkpoint as 1 x 8 and as 4 x 2."""
    workdir = tmp_path / "run"
    port = free_port()
    procs = [
        subprocess.Popen(
            TRAIN + [f"--workdir={workdir}", *overrides(shards, steps=STEPS)],
            env=slurm_env(i, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        wait_for_step(workdir, 5, procs)  # checkpoint 4 is written (synchronously)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=HEARTBEAT_S + 60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 3, err
    assert took <= HEARTBEAT_S + 5, took
    assert "polyglot-jax: error: lost process 1 of 2: no heartbeat for 5 s" in err
    steps_on_disk = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps_on_disk and steps_on_disk[-1] < STEPS

    as_one = tmp_path / "as-1x8"
    shutil.copytree(workdir, as_one)
    train(one_process_config(shards), as_one)
    assert_same_run(as_one, reference)

    as_four = tmp_path / "as-4x2"
    shutil.copytree(workdir, as_four)
    done = run_local(4, 2, as_four, overrides(shards))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from step {steps_on_disk[-1]} of {STEPS}" in done.stderr
    assert_same_run(as_four, reference)


def test_a_stop_signal_to_one_process_stops_both_at_the_same_step(shards, tmp_path):
    """SIGTERM to task 1 only (a preempted host): both tasks save the same step and exit 0,
    process 0 reporting it; nothing else was saved (no periodic checkpoint within the run)."""
    workdir = tmp_path / "run"
    port = free_port()
    skip = ("--config.eval.", "--config.train.checkpoint_every=")
    args = [a for a in overrides(shards, steps=1000) if not a.startswith(skip)]
    args += ["--config.train.checkpoint_every=100000"]
    procs = [
        subprocess.Popen(
            TRAIN + [f"--workdir={workdir}", *args],
            env=slurm_env(i, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        wait_for_step(workdir, 3, procs)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    last = max(losses(workdir))
    assert 3 <= last < 1000
    assert f"stopped by a signal at step {last}" in outs[0][0]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [last]
    assert len(list(workdir.glob(f"checkpoints/{last}/data_iter/process_*.json"))) == 2
