"""A k-way merge of sorted record files in bounded memory, vectorised with numpy.

This is the shuffle of the dedup stages: every rank writes its records sorted (by content hash,
by band hash, by gid), and a task of the next stage merges the slices of every rank's file that
fall into its key range. Memory is about BATCH_ROWS records (a few per input file when there
are many), not the files' size: the files are read with `pread` (`Records`), not memory-mapped,
so a task holds what it read and nothing around it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from polyglot_jax.errors import InputError

BATCH_ROWS = 1 << 22  # rows read per round across all streams (~64-100 MB of records)


def key_range(task: int, tasks: int) -> tuple[int, int]:
    """[lo, hi) of the uint64 key space that task `task` of `tasks` owns (hi may be 2**64)."""
    return (task << 64) // tasks, ((task + 1) << 64) // tasks


def bisect(column: np.ndarray, value: int, side: str = "left") -> int:
    """np.searchsorted for one value on a sorted (memory-mapped, strided) column, reading only
    the ~log2(n) rows it visits: numpy's own would first copy the whole column."""
    lo, hi = 0, len(column)
    while lo < hi:
        mid = (lo + hi) // 2
        x = int(column[mid])
        if x < value or (side == "right" and x == value):
            lo = mid + 1
        else:
            hi = mid
    return lo


class Records:
    """Rows [start, stop) of a saved 1-d structured array (`.npy`), read with os.pread.

    Not a memory map: each fault on a map also maps the pages around it (fault-around), so
    bisecting and reading slices of every rank's file grew a task's RSS by ~0.4 MB per 600 KB
    file (measured: 24 rank files, +10 MB, where 6 gave +2 MB), i.e. with the corpus. Read, a
    task holds exactly the rows it asked for.
    """

    def __init__(self, path: Path, start: int = 0, stop: int | None = None):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                header = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, self.dtype = header(f)
                self.offset = f.tell()
        except FileNotFoundError:
            raise InputError(
                f"{self.path}: missing (did the stage that writes it finish?)"
            ) from None
        if len(shape) != 1 or self.dtype.names is None:
            raise InputError(f"{self.path}: not a 1-d array of records (shape {shape})")
        self.start, self.stop = start, shape[0] if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows [a, b) of this range (b defaults to its end), as a new array."""
        if a < 0:  # no negative indexing: it would read rows before this range
            raise ValueError(f"Records.read: a={a} < 0")
        b = len(self) if b is None else min(b, len(self))
        out = np.empty(max(b - a, 0), self.dtype)
        if len(out):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(
                    fd, [memoryview(out).cast("B")], self.offset + (self.start + a) * out.itemsize
                )
            finally:
                os.close(fd)
            if got != out.nbytes:
                raise InputError(f"{self.path}: shorter than its header says (re-run its stage)")
        return out

    def restrict(self, key: str, lo: int, hi: int) -> Records:
        """The rows with lo <= key < hi (the range sorted by `key`), found by bisection."""
        column = _Column(self, key)
        start = bisect(column, lo)
        stop = len(self) if hi >= 1 << 64 else bisect(column, hi)
        return Records(self.path, self.start + start, self.start + stop)


class _Column:
    """One field of `Records`, read a row at a time (what `bisect` visits)."""

    def __init__(self, records: Records, key: str):
        self.records, self.key = records, key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.records.read(i, i + 1)[self.key][0]


def merged(
    streams: Sequence[Records],
    key: str,
    order: Sequence[str],
    chunk: int | None = None,
    rows: int = BATCH_ROWS,
) -> Iterator[np.ndarray]:
    """Batches of the records of `streams` (each sorted by `order`, whose first field is `key`)
    in global `order`. A run of records with equal `key` is never split across batches, so a
    caller can group by key batch by batch. Each stream is read `chunk` rows at a time (default:
    `rows` shared out, at least 1024 each) into a buffer of its own; a round yields what is final
    in every buffer."""
    streams = [s for s in streams if len(s)]
    chunk = chunk or max(1024, rows // max(len(streams), 1))
    done = [0] * len(streams)  # rows read from each stream
    buffers = [s.read(0, 0) for s in streams]  # read, not yet yielded
    while True:
        size = chunk
        while True:
            for i, s in enumerate(streams):
                if len(buffers[i]) < size and done[i] < len(s):
                    more = s.read(done[i], done[i] + size - len(buffers[i]))
                    done[i] += len(more)
                    buffers[i] = np.concatenate([buffers[i], more])
            live = [i for i in range(len(streams)) if len(buffers[i])]
            if not live:
                return
            bounded = [i for i in live if done[i] < len(streams[i])]
            if not bounded:  # every stream's rest is read: take it all
                cuts = {i: len(buffers[i]) for i in live}
                break
            # Records below the smallest last key read are final in every stream.
            bound = min(buffers[i][key][-1] for i in bounded)
            # (Streams read to their end too: their keys >= bound wait for the others.)
            cuts = {i: int(np.searchsorted(buffers[i][key], bound, "left")) for i in live}
            if any(cuts.values()):
                break
            size *= 2  # one key fills every buffer: read more of it
        parts = [buffers[i][: cuts[i]] for i in live if cuts[i]]
        for i in live:
            buffers[i] = buffers[i][cuts[i] :]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if len(parts) > 1:
            batch = batch[np.lexsort([batch[f] for f in reversed(order)])]
        yield batch
