"""Caps runs of repeated characters, short units and words (ㅋㅋㅋㅋㅋ, !!!!!!, ㅋㅎㅋㅎㅋㅎㅋㅎ, 대박 대박
대박 대박) and measures how much of a document such runs made up.

Digits are never capped (1000000 and 010-0000-0000 are numbers, not noise); neither is whitespace,
which the whitespace rule handles. A run longer than the cap keeps exactly `cap` copies.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple


class RepeatCap(NamedTuple):
    """Result of `cap_repeats`: the new text, the number of runs capped, and the share (0..1)
    of the original non-space characters those runs removed."""

    text: str
    runs: int
    removed_share: float


@functools.lru_cache(maxsize=16)
def _patterns(max_char: int, max_unit: int, max_word: int) -> tuple[re.Pattern, ...]:
    return (
        # one non-space, non-digit character repeated more than max_char times
        re.compile(rf"([^\s0-9])\1{{{max_char},}}"),
        # a 2-4 character unit without digits (",000" is a number) repeated more than max_unit times
        re.compile(rf"([^\s0-9]{{2,4}}?)\1{{{max_unit},}}"),
        # a word that is not a bare number repeated more than max_word times in a row
        re.compile(rf"(?<!\S)(?=\S*[^\s0-9.,])(\S+)(?:[ \t]+\1(?!\S)){{{max_word},}}"),
    )


def _count_visible(text: str) -> int:
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t")


def cap_repeats(text: str, max_char: int = 3, max_unit: int = 3, max_word: int = 3) -> RepeatCap:
    """Caps each run of one repeated character at `max_char`, of a repeated 2-4 character unit at
    `max_unit` copies, and of a repeated word at `max_word` copies (joined by one space)."""
    if min(max_char, max_unit, max_word) < 1:
        raise ValueError("repeat caps must be >= 1")
    char_run, unit_run, word_run = _patterns(max_char, max_unit, max_word)
    before = _count_visible(text)
    text, n_char = char_run.subn(lambda m: m[1] * max_char, text)
    text, n_unit = unit_run.subn(lambda m: m[1] * max_unit, text)
    text, n_word = word_run.subn(lambda m: " ".join([m[1]] * max_word), text)
    runs = n_char + n_unit + n_word
    if runs == 0 or before == 0:
        return RepeatCap(text, runs, 0.0)
    return RepeatCap(text, runs, 1.0 - _count_visible(text) / before)
