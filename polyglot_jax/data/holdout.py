"""Which documents the training and the evaluation side read, when `config.eval.holdout_fraction`
holds a share of the training documents out.

A document is held out when a
seeded hash of its *content* falls below the fraction, so the split is fixed by the tokenized data
and `config.eval.holdout_seed` alone (not by the shuffle seed, the process count or the corpus
order), and copies of one text always land on the same side. The rule, exactly
(`document_hashes`, `held_out`; all arithmetic mod 2**64):
- a document's *first piece* is its tokens (eos included) from its start offset in the record
  that holds its start up to the next start or that record's end (all of a document that fits a
  record); the tokens of a record before its first start continue the document of the previous
  record's last piece (tokenize.py cuts only documents longer than a block that way);
- h = sum_i (t_i + 1) * M**i over the first piece's tokens t_0, t_1, ..., M = 0x9E3779B97F4A7C15;
- x = mix64(h ^ mix64(seed)), mix64 the splitmix64 finalizer (`_mix64`);
- held out iff (x >> 11) / 2**53 < fraction.
The "train" side keeps every other document, the "eval" side only these, in both modes: records
are filtered before rows are built (concat joins the kept documents, packing packs them), so no
document has tokens on both sides. A filtered record keeps its place in the stream (epochs still
count records; an emptied one is skipped over).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from polyglot_jax.data.records import decode_record, encode_record
from polyglot_jax.errors import ConfigError

SIDES = ("train", "eval")
_M = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class Holdout:
    """Which documents a pipeline reads (module docstring): `side` "train" keeps those not held
    out, "eval" only the held-out ones; `fraction` within (0, 1)."""

    fraction: float
    seed: int
    side: str

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ConfigError(
                f"config.eval.holdout_fraction={self.fraction!r} must be within (0, 1) to hold out"
            )
        if self.side not in SIDES:
            raise ConfigError(f"hold-out side {self.side!r} is not one of {SIDES}")


def holdout_for(eval_config: Any, side: str) -> Holdout | None:
    """The `Holdout` of `config.eval` for one side, or None when nothing is held out."""
    fraction = (eval_config or {}).get("holdout_fraction", 0.0) or 0.0
    if not fraction:
        return None
    return Holdout(float(fraction), int(eval_config.get("holdout_seed", 0)), side)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_powers = np.ones(1, np.uint64)  # M**i mod 2**64, grown on demand


def _powers_of_m(n: int) -> np.ndarray:
    global _powers
    if _powers.size < n:
        table = np.full(max(n, 2 * _powers.size), _M, np.uint64)
        table[0] = 1
        _powers = np.cumprod(table, dtype=np.uint64)
    return _powers[:n]


def document_hashes(tokens: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """uint64 [len(bounds) - 1]: h = sum_i (t_i + 1) * M**i of each piece tokens[bounds[k]:
    bounds[k + 1]] (pieces non-empty, bounds ascending from 0 to tokens.size)."""
    bounds = np.asarray(bounds, np.int64)
    lengths = np.diff(bounds)
    within = np.arange(tokens.size) - np.repeat(bounds[:-1], lengths)
    terms = (tokens.astype(np.uint64) + np.uint64(1)) * _powers_of_m(int(lengths.max()))[within]
    return np.add.reduceat(terms, bounds[:-1])


def held_out(hashes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool: which documents (by `document_hashes` of their first piece) are held out."""
    key = _mix64(np.asarray([seed], np.uint64))
    x = _mix64(np.asarray(hashes, np.uint64) ^ key) >> np.uint64(11)
    return x.astype(np.float64) < fraction * 2.0**53  # exact: x < 2**53


class HoldoutSource:
    """A corpus's records with only the document pieces of one side of a `Holdout` (record
    bytes in the same format, possibly empty). A record that starts inside a document asks the
    records before it which document that is (cached: long documents span many records)."""

    _CACHE = 1 << 16

    def __init__(self, source: Any, holdout: Holdout):
        self.source, self.holdout = source, holdout
        self._last_held: dict[int, bool] = {}  # record -> is its last document held out

    def __len__(self) -> int:
        return len(self.source)

    def _held(self, tokens: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
        return held_out(document_hashes(tokens, bounds), self.holdout.fraction, self.holdout.seed)

    def _ends_held(self, index: int) -> bool:
        """Whether the document that record `index` ends in is held out."""
        visited = []
        while index not in self._last_held:
            tokens, starts = decode_record(self.source[index])
            visited.append(index)
            if starts.size or index == 0:  # (a first record without a start: its own document)
                first = int(starts[-1]) if starts.size else 0
                held = bool(self._held(tokens[first:], [0, tokens.size - first])[0])
                break
            index -= 1
        else:
            held = self._last_held[index]
        if len(self._last_held) + len(visited) > self._CACHE:
            self._last_held.clear()
        self._last_held.update(dict.fromkeys(visited, held))
        return held

    def __getitem__(self, index: int) -> bytes:
        tokens, starts = decode_record(self.source[index])
        if tokens.size == 0:
            return encode_record(tokens, starts)
        continued = bool(starts.size == 0 or starts[0] != 0)
        bounds = np.asarray([0] * continued + starts.tolist() + [tokens.size], np.int64)
        held = self._held(tokens, bounds)
        if continued and index > 0:
            held[0] = self._ends_held(index - 1)
        keep = held if self.holdout.side == "eval" else ~held
        lengths = np.diff(bounds)
        kept_tokens = tokens[np.repeat(keep, lengths)]
        # New offsets of the kept pieces; the continued piece is not a document start.
        offsets = (np.cumsum(lengths * keep) - lengths * keep)[keep]
        is_start = np.ones(bounds.size - 1, bool)
        is_start[0] = not continued
        return encode_record(kept_tokens, offsets[is_start[keep]])
