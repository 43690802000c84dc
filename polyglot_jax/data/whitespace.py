"""Whitespace normalisation that keeps the text's line structure.

The authors' first pipeline normalised with `\\s+` and so turned every newline into a space; here
newlines are never merged into spaces: runs of horizontal whitespace (spaces, tabs, NBSP, ideographic
space, ...) become one space, lines are trimmed at both ends, runs of blank lines are capped (a
paragraph break stays a paragraph break), and CR / CRLF become LF.
"""

from __future__ import annotations

import re

_CRLF = re.compile(r"\r\n?")
_HSPACE = re.compile(r"[^\S\n]+")  # every Unicode whitespace but the newline
_INVISIBLE = re.compile("[\u200b\u2060\ufeff]")  # zero-width space, word joiner, BOM
_SPACE_AT_NEWLINE = re.compile(r" ?\n ?")


def normalize_spaces(text: str, max_blank_lines: int = 1) -> str:
    """`text` with horizontal whitespace collapsed, lines trimmed, at most `max_blank_lines`
    blank lines in a row, and no leading or trailing whitespace."""
    if max_blank_lines < 0:
        raise ValueError(f"max_blank_lines must be >= 0, got {max_blank_lines}")
    text = _CRLF.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _HSPACE.sub(" ", text)
    text = _SPACE_AT_NEWLINE.sub("\n", text)
    # re caches the compiled pattern per max_blank_lines.
    text = re.sub(f"\n{{{max_blank_lines + 2},}}", "\n" * (max_blank_lines + 1), text)
    return text.strip()
