"""Repeat capping on hand-built cases whose answer is obvious."""

import pytest

from polyglot_jax.data.repetition import cap_repeats

CASES = [
    ("ㅋㅋㅋㅋㅋㅋㅋ 재밌다", "ㅋㅋㅋ 재밌다"),
    ("대박!!!!!!", "대박!!!"),
    ("ㅋㅋㅋ 딱 세 개", "ㅋㅋㅋ 딱 세 개"),
    ("ㅠㅠㅠㅠ...... 슬퍼", "ㅠㅠㅠ... 슬퍼"),
    ("ㅋㅎㅋㅎㅋㅎㅋㅎㅋㅎ 웃김", "ㅋㅎㅋㅎㅋㅎ 웃김"),
    ("hahahahaha", "hahaha"),
    ("대박 대박 대박 대박 대박 영화", "대박 대박 대박 영화"),
    ("최고\t최고 최고 최고", "최고 최고 최고"),
    ("1000000000원, 1,000,000,000,000원", "1000000000원, 1,000,000,000,000원"),
    ("0 0 0 0 0 0", "0 0 0 0 0 0"),
    ("010-0000-0000", "010-0000-0000"),
    ("줄1\n\n\n\n\n줄2", "줄1\n\n\n\n\n줄2"),  # whitespace is the whitespace rule's business
    ("평범한 문장입니다.", "평범한 문장입니다."),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_cap_repeats(text, expected):
    assert cap_repeats(text).text == expected


def test_removed_share_and_runs():
    capped = cap_repeats("ㅋ" * 20)
    assert (
        capped.text == "ㅋㅋㅋ"
        and capped.runs == 1
        and capped.removed_share == pytest.approx(17 / 20)
    )
    capped = cap_repeats("ㅋㅋㅋㅋㅋ 정말 재밌는 영화였어요")  # 2 of 15 visible characters removed
    assert capped.runs == 1 and capped.removed_share == pytest.approx(2 / 15)
    assert cap_repeats("반복 없음").removed_share == 0.0


def test_caps_are_parameters():
    assert cap_repeats("ㅋㅋㅋㅋㅋ", max_char=1).text == "ㅋ"
    assert cap_repeats("와 와 와 와", max_word=2).text == "와 와"
    assert cap_repeats("abababab", max_unit=2).text == "abab"
    with pytest.raises(ValueError):
        cap_repeats("x", max_char=0)
