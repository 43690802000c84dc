"""First-fit packing of whole documents into the rows of one window (`config.data.mode='packed'`).

Each document goes into the first row with room for it; the window ends at the first document
that fits in none. A document longer than a row is cut into row-sized pieces (one longer than a
record was already cut where records end when it was tokenized). segment_ids number the pieces of
a row 1, 2, 3..., positions restart at 0 for each, and padding (only the tail a row could not
fill) has segment id 0 and token 0 (`<pad>` in the Polyglot-Ko layout); `batch.loss_mask` says
which predictions count.
"""

from __future__ import annotations

import numpy as np

from polyglot_jax.data.batch import Batch


class _FirstFitRows:
    """Free space per row of a window, answering "the first row with room for n tokens" in
    O(log rows): a max segment tree over the rows, in Python lists (scalar steps are faster there
    than in numpy)."""

    def __init__(self, rows: int, capacity: int):
        size = 1
        while size < rows:
            size *= 2
        self.size = size
        tree = [-1] * (2 * size)  # leaves past `rows` never fit
        tree[size : size + rows] = [capacity] * rows
        for i in range(size - 1, 0, -1):
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
        self.tree = tree

    def first_fit(self, n: int) -> int:
        """Index of the first row with at least `n` free tokens, or -1."""
        tree = self.tree
        if tree[1] < n:
            return -1
        i = 1
        while i < self.size:
            i *= 2
            if tree[i] < n:
                i += 1
        return i - self.size

    def take(self, row: int, n: int) -> int:
        """Uses `n` tokens of `row`; returns its free space before."""
        tree = self.tree
        i = row + self.size
        before = tree[i]
        tree[i] = before - n
        i //= 2
        while i:
            best = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == best:
                break  # ancestors unchanged
            tree[i] = best
            i //= 2
        return before


class FirstFitPacker:
    """The rows of one window, filled first-fit record by record; `batch()` builds the arrays."""

    def __init__(self, rows: int, row_len: int):
        self.rows = rows
        self.row_len = row_len
        self._free = _FirstFitRows(rows, row_len)
        self._segments = [0] * rows
        # Per placed piece: row, offset in the row, offset in the stream, length, segment id.
        self._row: list[int] = []
        self._dst: list[int] = []
        self._src: list[int] = []
        self._len: list[int] = []
        self._seg: list[int] = []
        self._stream: list[np.ndarray] = []  # the tokens of the records read, from `offset` on
        self._stream_len = 0

    def add(self, tokens: np.ndarray, starts: np.ndarray, offset: int) -> int | None:
        """Places `tokens[offset:]` of one record (documents start at `starts`). Returns None when
        all of it is placed, else the offset in `tokens` of the first piece that fits in no row:
        the window is full and ends there."""
        row_len, free, segments = self.row_len, self._free, self._segments
        p_row, p_dst, p_src, p_len, p_seg = self._row, self._dst, self._src, self._len, self._seg
        base = self._stream_len - offset  # stream offset of tokens[0]
        self._stream.append(tokens[offset:])
        self._stream_len += tokens.size - offset
        bounds = [offset, *starts[starts > offset].tolist(), tokens.size]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            while a < b:
                n = min(b - a, row_len)
                r = free.first_fit(n)
                if r < 0:  # fits nowhere: the window is full and ends here
                    return a
                segments[r] += 1
                p_row.append(r)
                p_dst.append(row_len - free.take(r, n))
                p_src.append(base + a)
                p_len.append(n)
                p_seg.append(segments[r])
                a += n
        return None

    def batch(self) -> Batch:
        """The window's rows: tokens, segment_ids, positions int32 [rows, row_len]."""
        stream = np.concatenate(self._stream)
        lengths = np.asarray(self._len, np.int64)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        dst = np.repeat(np.asarray(self._row) * self.row_len + np.asarray(self._dst), lengths)
        dst += within
        src = np.repeat(np.asarray(self._src, np.int64), lengths) + within
        shape = (self.rows, self.row_len)
        tokens = np.zeros(self.rows * self.row_len, np.int32)
        segment_ids = np.zeros_like(tokens)
        positions = np.zeros_like(tokens)
        tokens[dst] = stream[src]
        segment_ids[dst] = np.repeat(np.asarray(self._seg, np.int32), lengths)
        positions[dst] = within
        return Batch(tokens.reshape(shape), segment_ids.reshape(shape), positions.reshape(shape))
