"""Staged outputs: refused when they would touch an input, complete or absent, leftovers of dead
runs cleaned up (and a previous output put back when a run died between its two renames)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from polyglot_jax.errors import InputError
from polyglot_jax.output_dir import check_output, remove_stale, staged


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "a.jsonl").write_text("{}\n")
    (tmp_path / "file").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    "out, message",
    [
        ("data/in", "would replace the input"),
        ("data", "would replace the input"),
        ("data/in/out", "lies inside the input"),
        ("file", "exists and is not a directory"),
        ("file/out", "is a file, not a directory"),
    ],
)
def test_outputs_that_would_lose_data_are_refused(tree, out, message):
    with pytest.raises(InputError, match=message):
        check_output(tree / out, [tree / "data" / "in"], overwrite=True)
    assert (tree / "data" / "in" / "a.jsonl").read_text() == "{}\n"


def test_a_non_empty_output_needs_overwrite(tree):
    (tree / "out").mkdir()
    (tree / "out" / "old").write_text("old")
    with pytest.raises(InputError, match="not empty"):
        check_output(tree / "out", [], overwrite=False)
    assert check_output(tree / "out", [], overwrite=True) == (tree / "out").resolve()


def test_staged_output_appears_whole_or_not_at_all(tree):
    with pytest.raises(RuntimeError), staged(tree / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed half-way")
    assert sorted(p.name for p in tree.iterdir()) == ["data", "file"]
    with staged(tree / "out") as tmp:
        (tmp / "whole").write_text("x")
    assert sorted(p.name for p in (tree / "out").iterdir()) == ["whole"]
    assert sorted(p.name for p in tree.iterdir()) == ["data", "file", "out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tree):
    host = socket.gethostname()
    dead = tree / f".out.partial-{host}-{_dead_pid()}-abc123"
    live = tree / f".out.partial-{host}-{os.getpid()}-def456"
    other_host = tree / f".out.partial-elsewhere-{_dead_pid()}-ghi789"
    for d in (dead, live, other_host):
        d.mkdir()
    assert remove_stale(tree / "out") == [dead]
    assert not dead.exists() and live.exists() and other_host.exists()


def test_a_run_killed_between_its_renames_gets_the_previous_output_back(tree):
    host, pid = socket.gethostname(), _dead_pid()
    new = tree / f".out.partial-{host}-{pid}-abc123"
    previous = tree / f".out.partial-{host}-{pid}-abc123-replaced"
    new.mkdir()
    previous.mkdir()
    (previous / "kept").write_text("the user's earlier output")
    remove_stale(tree / "out")
    assert (tree / "out" / "kept").read_text() == "the user's earlier output"
    assert not new.exists() and not previous.exists()
