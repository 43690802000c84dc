"""`polyglot-jax mesh-bench` as a user runs it: the contract's JSON list, a PNG, a table; bad
layouts and outputs are one line with exit code 2, refused before anything compiles."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FIELDS = {"mesh", "bytes_per_device", "flops", "collective_bytes", "step_time_s"}


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "mesh-bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_writes_json_list_chart_and_table(tmp_path):
    """--devices=4 although the test session's XLA_FLAGS ask for 8: the flag decides."""
    out = tmp_path / "bench.json"
    meshes = "--meshes=data:4 data:2,model:2"
    result = _run("--config=configs/tiny.py", "--devices=4", meshes, f"--out={out}")
    assert result.returncode == 0, result.stderr
    entries = json.loads(out.read_text())
    assert isinstance(entries, list) and len(entries) == 2
    for entry, model in zip(entries, (1, 2), strict=True):
        assert FIELDS <= set(entry)
        assert entry["mesh"]["model"] == model and entry["devices"] == 4
        assert entry["step_time_s"] is None  # fake CPU devices: compile only by default
        assert entry["bytes_per_device"] > 0 and entry["flops"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line.split()[0] for line in result.stdout.splitlines()]
    assert rows[:3] == ["layout", "data:4", "data:2,model:2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--meshes=data:2,tensor:4", "--out={tmp}/r.json"],
            "mesh-bench: error: mesh layout 'data:2,tensor:4': unknown mesh axis 'tensor'; valid axes: "
            "data, fsdp, model, dcn_data, dcn_fsdp, dcn_model",
        ),
        (
            ["--meshes=data:2,model:2", "--out={tmp}/r.json"],
            "mesh-bench: error: mesh layout 'data:2,model:2' uses 4 devices, not all 8: its sizes "
            "must multiply to 8, e.g. model:8, data:2,model:4, data:4,model:2, data:8",
        ),
        (
            ["--meshes=data:8", "--out={tmp}/missing/r.json"],
            "mesh-bench: error: --out={tmp}/missing/r.json: directory {tmp}/missing does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = _run("--config=configs/tiny.py", "--devices=8", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"polyglot-jax {message.format(tmp=tmp_path)}"
    assert list(tmp_path.iterdir()) == []
