"""Repetition metrics on sequences whose values are counted by hand in the comments."""

import pytest

from polyglot_jax.eval import repetition as r


def test_seq_rep_and_rep_w_by_hand():
    ids = [1, 2, 3, 1, 2, 3, 1, 2]
    # bigrams: 12 23 31 12 23 31 12 -> 7 bigrams, 3 unique -> 1 - 3/7
    assert r.seq_rep(ids, 2) == pytest.approx(1 - 3 / 7)
    # 4-grams: 1231 2312 3123 1231 2312 -> 5, 3 unique
    assert r.seq_rep(ids, 4) == pytest.approx(1 - 3 / 5)
    # rep-w with w=2: position 3 (1) sees [2,3]: no; every later token sits 3 back: no -> 0
    assert r.rep_w(ids, 2) == 0.0
    # w=3: positions 3..7 each repeat the token 3 back -> 5 of 8
    assert r.rep_w(ids, 3) == pytest.approx(5 / 8)
    assert r.seq_rep([1, 2, 3, 4], 2) == 0.0 and r.seq_rep([1], 2) == 0.0 and r.rep_w([], 4) == 0.0


def test_longest_repeat_and_distinct_by_hand():
    assert r.longest_repeat([1, 2, 3, 1, 2, 3, 1, 2]) == 5  # 1 2 3 1 2 at 0 and 3 (overlapping)
    assert r.longest_repeat([1, 2, 3, 4]) == 0
    assert r.longest_repeat([7, 7]) == 1
    assert r.longest_repeat([5, 1, 2, 9, 1, 2, 8]) == 2
    # unigrams over the set: 1 2 3 | 3 4 -> 5 tokens, 4 distinct
    assert r.distinct([[1, 2, 3], [3, 4]], 1) == pytest.approx(4 / 5)
    # bigrams: 12 23 | 34 -> 3, all distinct
    assert r.distinct([[1, 2, 3], [3, 4]], 2) == 1.0


def test_summary_flags_a_loop():
    healthy = list(range(40))
    loop = [4, 5, 6] * 14
    s = r.summary([healthy, loop])
    assert s["broken_share"] == 0.5
    assert s["seq_rep_4"] == pytest.approx((0 + (1 - 3 / 39)) / 2)
