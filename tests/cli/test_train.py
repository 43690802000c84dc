"""`polyglot-jax train` as a cluster runs it: killed at a seeded random step, stopped by SIGTERM or
SIGINT (Ctrl-C), resumed."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from train_fixtures import REPO, tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


def _command(
    shards: pathlib.Path, workdir: pathlib.Path, steps: int, checkpoint_every: int = 2
) -> list[str]:
    return [
        sys.executable, "-m", "polyglot_jax", "train", "--config=configs/tiny.py", f"--workdir={workdir}",
        "--config.model.d_model=64", "--config.model.d_ff=128", "--config.model.rotary_dim=8",
        f"--config.train.steps={steps}", "--config.train.seq_len=32", "--config.train.warmup_steps=2",
        "--config.train.log_every=1", f"--config.train.checkpoint_every={checkpoint_every}",
        f"--config.data.shards=('{shards}',)", "--config.data.shuffle_buffer=64",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r}


def _wait_for_step(
    proc: subprocess.Popen, workdir: pathlib.Path, step: int, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while max(_losses(workdir), default=0) < step:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


@pytest.mark.parametrize("seed", [20260512])
def test_sigkill_at_random_step_then_resume_is_bit_exact(shards, tmp_path, seed):
    """The kill step is drawn from `seed` (in the test id): a failure reruns at the same step."""
    steps = 10
    reference = tmp_path / "reference"
    done = subprocess.run(
        _command(shards, reference, steps), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    workdir = tmp_path / "killed"
    kill_at = random.Random(seed).randint(2, steps - 2)
    proc = subprocess.Popen(
        _command(shards, workdir, steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(proc, workdir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        _command(shards, workdir, steps), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    want, got = _losses(reference), _losses(workdir)
    assert sorted(want) == list(range(1, steps + 1))
    # every logged loss, bit for bit
    assert got == want, f"seed {seed}: killed at step >= {kill_at}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_and_exits_zero(shards, tmp_path, sig):
    # No periodic checkpoint within the run: only the signal can make the one that is found.
    proc = subprocess.Popen(
        _command(shards, tmp_path, 1000, checkpoint_every=100_000),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(proc, tmp_path, 3)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert time.monotonic() - sent < 60
    last = max(_losses(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [last] and 3 <= last < 1000
    assert f"stopped by a signal at step {last}" in out


def test_a_rerun_compiles_nothing_new(shards, tmp_path):
    """The persistent compilation cache: by default WORKDIR/xla_cache; a second run of the same
    config, in a new workdir pointed at that cache, finds every program there (no entry is
    added) and trains the same."""
    env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    first = subprocess.run(
        _command(shards, tmp_path / "a", steps=2), env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-2000:]
    cache = tmp_path / "a" / "xla_cache"
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) >= 3  # at least the parameters' init, the optimizer's and the train step
    flag = f"--config.train.compilation_cache_dir={cache}"
    again = subprocess.run(
        [*_command(shards, tmp_path / "b", steps=2), flag], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert not (tmp_path / "b" / "xla_cache").exists()
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2)], ids=["data2-fsdp4", "data2-fsdp2-model2"])
def test_sharded_step_replicates_no_activation(shards, tmp_path, mesh):
    """On meshes with both data and fsdp, XLA's SPMD partitioner once fell back to replicating a
    [batch, length, embed] cotangent on every device (the embedding lookup's gradient, resharded
    from batch to embed); it says so on stderr ("Involuntary full rematerialization"). The
    step is compiled here, not loaded from a cache, so the partitioner runs: `off` turns the
    cache off although $JAX_COMPILATION_CACHE_DIR names one (nothing is written there)."""
    data, fsdp, model = mesh
    env = {**_env(), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "env_cache")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    flags = [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
             f"--config.mesh.model={model}", "--config.train.compilation_cache_dir=off"]  # fmt: skip
    done = subprocess.run(
        [*_command(shards, tmp_path / "run", steps=1), *flags],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Involuntary full rematerialization" not in done.stderr, done.stderr[-3000:]
    cached = list((tmp_path / "env_cache").glob("*"))
    assert not cached, f"compilation_cache_dir=off still cached {len(cached)} programs"
