"""Repetition metrics of generated token sequences: how the report's "broken generation" shows.

seq_rep(ids, n)     1 - |unique n-grams| / |n-grams| within one continuation (0 when none)
rep_w(ids, w)       share of tokens that already occur among the previous w tokens
distinct(seqs, n)   |unique n-grams| / |n-grams| over a set of continuations
longest_repeat(ids) length of the longest token span that occurs twice (overlap allowed)
"""

from __future__ import annotations

from collections.abc import Sequence

# Past these a continuation counts as broken (the monitor warns): a healthy model's greedy
# continuations of 128 tokens stay well below, a looping one is near 1.
THRESHOLDS = {"seq_rep_4": 0.5, "rep_w_16": 0.6}


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def seq_rep(ids: Sequence[int], n: int) -> float:
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def rep_w(ids: Sequence[int], w: int) -> float:
    if not ids:
        return 0.0
    hits = sum(ids[i] in ids[max(0, i - w) : i] for i in range(len(ids)))
    return hits / len(ids)


def distinct(seqs: Sequence[Sequence[int]], n: int) -> float:
    grams = [g for ids in seqs for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def longest_repeat(ids: Sequence[int]) -> int:
    """Binary search on the length: a span of length L repeats => one of every length < L does."""

    def repeats(length: int) -> bool:
        seen = set()
        for gram in ngrams(ids, length):
            if gram in seen:
                return True
            seen.add(gram)
        return False

    low, high = 0, max(0, len(ids) - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if repeats(mid):
            low = mid
        else:
            high = mid - 1
    return low


def metrics(ids: Sequence[int]) -> dict[str, float]:
    """The per-continuation metrics the monitor logs."""
    return {
        "seq_rep_2": seq_rep(ids, 2),
        "seq_rep_4": seq_rep(ids, 4),
        "rep_w_16": rep_w(ids, 16),
        "longest_repeat": float(longest_repeat(ids)),
    }


def summary(seqs: Sequence[Sequence[int]]) -> dict[str, float]:
    """Means of `metrics` over continuations, distinct-1/2 over the set, and the share flagged."""
    per = [metrics(ids) for ids in seqs]
    out = {k: sum(m[k] for m in per) / len(per) for k in per[0]} if per else {}
    out["distinct_1"] = distinct(seqs, 1)
    out["distinct_2"] = distinct(seqs, 2)
    out["broken_share"] = (
        sum(any(m[k] > v for k, v in THRESHOLDS.items()) for m in per) / len(per) if per else 0.0
    )
    return out
