"""A k-way merge of sorted record files in bounded memory, vectorised with numpy.

This is the shuffle of the dedup stages: every rank writes its records sorted (by content hash,
by band hash, by gid), and a task of the next stage merges the slices of every rank's file that
fall into its key range. Memory is about BATCH_ROWS records (a few per input file when there
are many), not the files' size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

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


def restrict(array: np.ndarray, key: str, lo: int, hi: int) -> np.ndarray:
    """The rows of `array` (sorted by `key`) with lo <= key < hi, as a (memory-mapped) slice."""
    column = array[key]
    start = bisect(column, lo)
    stop = len(array) if hi >= 1 << 64 else bisect(column, hi)
    return array[start:stop]


def merged(
    streams: Sequence[np.ndarray],
    key: str,
    order: Sequence[str],
    chunk: int | None = None,
    rows: int = BATCH_ROWS,
) -> Iterator[np.ndarray]:
    """Batches of the records of `streams` (structured arrays, each sorted by `order`, whose
    first field is `key`) in global `order`. A run of records with equal `key` is never split
    across batches, so a caller can group by key batch by batch. `chunk` rows are read from each
    stream per round (default: `rows` shared out, at least 1024 each)."""
    streams = [s for s in streams if len(s)]
    chunk = chunk or max(1024, rows // max(len(streams), 1))
    pos = [0] * len(streams)
    sizes = [len(s) for s in streams]
    while True:
        live = [i for i in range(len(streams)) if pos[i] < sizes[i]]
        if not live:
            return
        size = chunk
        while True:
            ends = {i: min(pos[i] + size, sizes[i]) for i in live}
            bounded = [i for i in live if ends[i] < sizes[i]]
            if not bounded:  # every stream's rest fits: take it all
                cuts = ends
                break
            # Records below the smallest last key read are final in every stream.
            bound = min(streams[i][key][ends[i] - 1] for i in bounded)
            # (Streams read to their end too: their keys >= bound wait for the others.)
            cuts = {
                i: pos[i] + int(np.searchsorted(streams[i][key][pos[i] : ends[i]], bound, "left"))
                for i in live
            }
            if any(cuts[i] > pos[i] for i in live):
                break
            size *= 2  # one key fills every chunk read: read more of it
        parts = [np.asarray(streams[i][pos[i] : cuts[i]]) for i in live if cuts[i] > pos[i]]
        for i in live:
            pos[i] = cuts[i]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if len(parts) > 1:
            batch = batch[np.lexsort([batch[f] for f in reversed(order)])]
        yield batch
