"""Whitespace normalisation keeps newlines and paragraph breaks (the authors' `\\s+` bug)."""

import pytest

from polyglot_jax.data.whitespace import normalize_spaces

CASES = [
    ("a  b\t\tc", "a b c"),
    ("줄 끝 공백   \n다음 줄", "줄 끝 공백\n다음 줄"),
    ("   앞 공백\n\t들여쓰기", "앞 공백\n들여쓰기"),
    ("문단 하나\n\n문단 둘", "문단 하나\n\n문단 둘"),
    ("문단 하나\n \n\t\n\n\n문단 둘", "문단 하나\n\n문단 둘"),
    ("윈도우\r\n줄바꿈\r\n\r\n문단\r옛 맥", "윈도우\n줄바꿈\n\n문단\n옛 맥"),
    ("전각\u3000공백\u00a0과 NBSP", "전각 공백 과 NBSP"),
    ("zero\u200bwidth\ufeff", "zerowidth"),
    ("\n\n  시작과 끝  \n\n", "시작과 끝"),
    ("a\x0bb\x0cc", "a b c"),
    ("이미 깨끗함\n둘째 줄", "이미 깨끗함\n둘째 줄"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_normalize_spaces(text, expected):
    assert normalize_spaces(text) == expected


def test_blank_line_cap():
    text = "a\n\n\n\nb\n\nc\nd"
    assert normalize_spaces(text, max_blank_lines=0) == "a\nb\nc\nd"
    assert normalize_spaces(text, max_blank_lines=1) == "a\n\nb\n\nc\nd"
    assert normalize_spaces(text, max_blank_lines=2) == "a\n\n\nb\n\nc\nd"
    with pytest.raises(ValueError):
        normalize_spaces(text, max_blank_lines=-1)


def test_every_newline_between_words_survives():
    lines = [f"{i}번째 줄 입니다" for i in range(50)]
    text = "\n".join("  ".join(line.split()) + "  " for line in lines)
    assert normalize_spaces(text).split("\n") == lines
