"""`polyglot-jax info` as a user runs it: exact counts in JSON, one-line errors with exit code 2."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_info_json_counts_12_8b():
    out = _run("info", "--config=configs/polyglot_ko_12_8b.py", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["parameters"] == 12_893_603_840
    assert info["shapes"]["layers/attention/qkv_kernel"]["shape"] == [40, 5120, 40, 3, 128]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=configs/tiny.py", "--config.model.rotary_dim=7"], "config.model.rotary_dim=7"),
        (["--config=configs/tiny.py", "--config.model.bogus=1"], "no such config field"),
        (["--config=configs/missing.py"], "No such file"),
        (
            ["--config=configs/tiny.py", "--config.mesh.model=8", "--devices=8"],
            "config.model.num_heads=4",
        ),
        ([], "--config is required"),
        (["--config=configs/tiny.py", "--no_such_flag"], "no_such_flag"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    out = _run("info", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_subcommand():
    out = _run("nonsense")
    assert out.returncode == 2 and "unknown subcommand" in out.stderr


def test_top_level_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for sub in ("info", "clean", "train-tokenizer", "tokenize", "train", "convert", "generate"):
        assert f"\n  {sub} " in out.stdout
