"""The work plan of a preprocess run and where every stage keeps its files.

`plan.json` (written once, before any stage runs, and compared on every re-run) fixes everything a
task needs to find its share of the work and everyone else's files:

- the input files in the order `list_input_files` gives them (the order local `clean` reads);
- work units: each file, or, when there are fewer files than tasks, `parts` interleaved parts of a
  file (part p takes the blocks of `block_docs` documents whose index is p modulo parts; every
  part reads the whole file but cleans only its blocks), and the rank that owns each unit;
- the clean config, the MinHash band layout and permutations, the tokenizer identity.

Every document that survives the per-document rules gets a global id (`gid`, uint64): input file
index in the top 24 bits, the document's index among the file's readable documents in the low
40. Sorting by gid is input order, which is what makes "the first copy is kept" mean the same
thing here as in local `clean`; `rank_of` maps a gid back to the rank that holds it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from polyglot_jax.errors import InputError

FORMAT = "polyglot_jax.preprocess/1"
EXECUTORS = ("local", "slurm", "ray")
STAGES = ("clean", "exact", "buckets", "clusters", "resolve", "filter", "plan", "write", "manifest")
PLAN = "plan.json"
DOC_BITS = 40
MAX_FILES = 1 << (64 - DOC_BITS)
BLOCK_DOCS = 1024

# Structured records of the intermediate files (all little-endian, sorted as noted).
DOCS_DTYPE = np.dtype(  # work/docs/RANK.npy, by gid: one row per cleaned document
    [("gid", "<u8"), ("chars", "<u8"), ("nbytes", "<u8"), ("off", "<u8"), ("end", "<u8")]
)
EXACT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("gid", "<u8")])  # by (hi, lo, gid)
# work/bands/BAND/RANK.npy, by (h, gid); row: the document's row in its rank's docs/sigs
BAND_DTYPE = np.dtype([("h", "<u8"), ("gid", "<u8"), ("row", "<u8")])
EDGE_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8")])  # work/edges/TASK.npy
NODE_DTYPE = np.dtype([("gid", "<u8"), ("row", "<u8")])  # work/nodes/TASK.npy, by gid, unique
# work/kept/RANK.npy, by gid: the kept documents and where their lines are in work/texts/RANK
KEPT_DTYPE = np.dtype([("gid", "<u8"), ("chars", "<u8"), ("off", "<u8"), ("end", "<u8")])


def file_parts(n_files: int, tasks: int) -> int:
    """Parts per input file: 1 when there are at least as many files as tasks."""
    return max(1, math.ceil(tasks / max(n_files, 1)))


def assign_units(sizes: list[int], parts: list[int], tasks: int) -> list[list[int]]:
    """[[file, part, rank], ...] in file order: largest units first onto the least loaded rank
    (ties: the lower rank), so ranks get similar byte counts."""
    units = [(f, p) for f, n in enumerate(parts) for p in range(n)]
    load = [0.0] * tasks
    owner: dict[tuple[int, int], int] = {}
    for f, p in sorted(units, key=lambda u: (-sizes[u[0]] / parts[u[0]], u)):
        rank = min(range(tasks), key=lambda r: (load[r], r))
        owner[(f, p)] = rank
        load[rank] += sizes[f] / parts[f] + 1  # +1: empty files still spread out
    return [[f, p, owner[(f, p)]] for f, p in units]


def _numbered(directory: str, suffix: str = ".npy") -> Callable[[Layout, int], Path]:
    """A Layout method: the path of file number `index` in work/`directory`."""

    def path(self: Layout, index: int) -> Path:
        return self.work / directory / f"{index:05d}{suffix}"

    return path


class Layout:
    """Paths of one run's output directory and the plan's gid -> rank mapping."""

    def __init__(self, output: str | os.PathLike, plan: dict[str, Any]) -> None:
        self.root = Path(output).absolute()
        self.plan = plan
        parts = np.asarray(plan["parts"], np.int64)
        self._parts = parts
        self._unit_start = np.concatenate([[0], np.cumsum(parts)[:-1]]).astype(np.int64)
        self._unit_rank = np.asarray([u[2] for u in plan["units"]], np.int64)

    # ---- directories -------------------------------------------------------------------------
    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def clean_dir(self) -> Path:
        return self.root / "clean"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def stats(self, stage: str, rank: int) -> Path:
        return self.work / "stats" / stage / f"{rank:05d}.json"

    # work/DIRECTORY/NNNNN.npy (.jsonl, .u32) of a rank (texts ... exact, kept), a bucket task
    # (edges, nodes) or a resolve partition (cluster)
    texts = _numbered("texts", ".jsonl")
    docs = _numbered("docs")
    sigs = _numbered("sigs", ".u32")
    exact = _numbered("exact")
    edges = _numbered("edges")
    nodes = _numbered("nodes")
    cluster = _numbered("clusters")
    kept = _numbered("kept")

    def band(self, band: int, rank: int) -> Path:
        return self.work / "bands" / f"{band:03d}" / f"{rank:05d}.npy"

    def removed(self, kind: str, rank: int, task: int) -> Path:
        """Gids that task `task` of stage `kind` (exact | near) removes from rank `rank`."""
        return self.work / f"{kind}_removed" / f"{rank:05d}" / f"{task:05d}.npy"

    @property
    def shard_plan(self) -> Path:
        return self.work / "shards.json"

    # ---- the plan ----------------------------------------------------------------------------
    @property
    def tasks(self) -> int:
        return int(self.plan["tasks"])

    def units_of(self, rank: int) -> list[tuple[int, frozenset[int], int]]:
        """(file index, the parts of it rank `rank` owns, parts) for each file it reads, in input
        order: a file is read once however many of its parts the rank owns, so the rank's
        documents come out in gid order."""
        owned: dict[int, set[int]] = {}
        for f, p, r in self.plan["units"]:
            if r == rank:
                owned.setdefault(f, set()).add(p)
        return [(f, frozenset(ps), int(self._parts[f])) for f, ps in sorted(owned.items())]

    def rank_of(self, gids: np.ndarray) -> np.ndarray:
        """The rank holding each gid (int64 array)."""
        gids = np.asarray(gids, np.uint64)
        files = (gids >> np.uint64(DOC_BITS)).astype(np.int64)
        docs = (gids & np.uint64((1 << DOC_BITS) - 1)).astype(np.int64)
        part = (docs // int(self.plan["block_docs"])) % self._parts[files]
        return self._unit_rank[self._unit_start[files] + part]


def make_gid(file_index: int, doc_index: int) -> int:
    return (file_index << DOC_BITS) | doc_index


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` as JSON through a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary name and a rename (a killed task leaves no torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def load_array(path: Path) -> np.ndarray:
    """A saved array, read whole (a file of one task's share; the merges read with
    `merge.Records` instead, a chunk at a time)."""
    if not path.is_file():
        raise InputError(f"{path}: missing (did the stage that writes it finish?)")
    return np.load(path, allow_pickle=False)
