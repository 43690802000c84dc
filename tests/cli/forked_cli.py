"""`python -m polyglot_jax SUB ...` without paying for the imports every time: a fork server.

Started once (`python tests/cli/forked_cli.py`, the cases' environment already in its own), it
imports the heavy libraries every subcommand needs (jax, flax, optax, orbax, transformers...; none
of our subcommand modules, which define their flags when imported), then reads one JSON request
a line on stdin: `{"argv": [...], "cwd": ..., "stdout": FILE, "stderr": FILE, "timeout": s}`. For
each it forks a child that becomes `python -m polyglot_jax ARGV` from that point on: stdin from
/dev/null, stdout and stderr into the files, its own process group, the interpreter's own exit
(SystemExit, an uncaught traceback, atexit, waiting for threads) and exit code. The server answers
`{"code": N}` (negative: killed by signal -N; -999: past the timeout, its group killed).

What a fresh process would do differently: print at import. So whatever the preload printed is
reported on the first line (`{"ready": true, "preload_stderr": ...}`) and the caller must refuse
to use the server when it is not empty. No backend is initialised before the fork (JAX warns, and
would deadlock, when forked after that).
"""

from __future__ import annotations

import io
import json
import os
import runpy
import signal
import sys
import time

PRELOAD = (
    "numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "tensorstore",
    "ml_collections.config_flags", "absl.flags", "tokenizers", "safetensors.numpy", "transformers",
    "tqdm",
)  # fmt: skip


def _preload() -> str:
    """Imports PRELOAD; returns what that printed on stderr (fd 2, C++ libraries included)."""
    import importlib
    import tempfile

    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            for name in PRELOAD:
                importlib.import_module(name)
            sys.stderr.flush()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return captured.read().decode(errors="replace")


def _serve() -> dict:
    """Answers requests until stdin ends (then exits); in a forked child, returns its request."""
    import jax._src.xla_bridge as xb

    # What `polyglot_jax.cli.main` sets before anything imports transformers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    out = sys.stdout
    out.write(json.dumps({"ready": True, "preload_stderr": _preload()}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        assert not xb._backends, "a backend was initialised before the fork"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return request
        deadline = time.monotonic() + request["timeout"]
        code = None
        while code is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = -999
            else:
                time.sleep(0.01)
        out.write(json.dumps({"code": code}) + "\n")
        out.flush()
    sys.exit(0)


def _become(request: dict) -> None:
    """In the child: from here on, `python -m polyglot_jax ARGV`."""
    os.setpgid(0, 0)  # the server kills the whole group on a timeout (workers included)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    # Fresh text streams on the new descriptors (the server's are line-buffered pipes).
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # `python -m` puts the working directory first
    sys.argv = ["-m", *request["argv"]]
    runpy.run_module("polyglot_jax", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _become(_serve())
