"""`polyglot-jax plan` as a user runs it: the JSON contract, the table, one-line errors with exit 2."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
KINDS = "a100-40gb, a100-80gb, h100-80gb, h200, tpu-v4, tpu-v5p, tpu-v6e"


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "plan", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_candidates_for_1_3b_on_256_a100s():
    out = _run(
        "--config=configs/polyglot_ko_1_3b.py",
        "--devices=256",
        "--device_kind=a100-40gb",
        "--json",
        "--top=0",
    )
    assert out.returncode == 0, out.stderr
    candidates = json.loads(out.stdout)
    assert len(candidates) > 100
    for c in candidates:
        assert math.prod(c["mesh"].values()) == 256
        assert c["remat_policy"] in ("none", "full", "dots", "dots_no_batch")
        assert 1024 % c["grad_accum"] == 0
        # days to the config's steps x batch x seq_len at the candidate's own rate
        assert c["days"] == pytest.approx(102000 * 1024 * 2048 / c["tokens_per_day"])
        assert c["fits"] == (c["bytes_per_device"] <= 0.9 * 40 * 2**30)
    fits = [c["fits"] for c in candidates]
    assert fits == sorted(fits, reverse=True) and fits[0]


def test_table_with_token_budget_and_assumptions():
    out = _run(
        "--config=configs/small.py",
        "--devices=8",
        "--device_kind=h100-80gb",
        "--tokens=1e9",
        "--mfu=0.5",
        "--top=3",
        "--mesh=fsdp:4,model:2",
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 3 and all("fsdp:4,model:2" in r for r in rows)
    assert "compute at 50% of peak" in out.stdout
    assert "budget 1e+09 tokens" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh=data:2,tensor:4"], "unknown mesh axis 'tensor'; valid axes: data, fsdp, model"),
        (["--mesh=data:2,model:2"], "uses 4 devices, not all 8: its sizes must multiply to 8"),
        (["--mesh=model:8"], "model sizes that divide on 8 devices: 1, 2, 4"),
        (["--device_kind=v100"], f"known kinds: {KINDS}"),
        (["--devices=0"], "--devices=0 must be a positive int"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    base = {"--devices": "--devices=8", "--device_kind": "--device_kind=a100-40gb"}
    for a in args:
        base[a.split("=")[0]] = a
    out = _run("--config=configs/small.py", *base.values())
    assert out.returncode == 2, out.stdout
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
