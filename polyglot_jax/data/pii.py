"""Masks Korean personal data: resident registration numbers, bank account numbers and phone numbers.

Each kind is replaced by its special token, the ones the Polyglot-Ko tokenizer reserves:
`<|rrn|>`, `<|acc|>`, `<|tel|>`. Kinds run in that order (an RRN is never half-eaten by the
account or phone patterns).

What counts (ASCII digits only; a number glued to a letter/digit, or to `digit.`/`digit,`/`word-`
on its left, or followed by a letter, a digit or `-digit`/`.digit`, is part of something else):
- RRN (also the foreigners' registration number): `YYMMDD-GNNNNNN` (spaces around the dash
  allowed) or the 13 digits `YYMMDDGNNNNNN` without a dash, where YYMMDD is a real calendar date
  in the century that G implies (1, 2, 5, 6: 1900s; 3, 4, 7, 8: 2000s; 5-8 are foreigners).
  With the dash, or within 20 characters after `주민(등록)번호` / `외국인등록번호`, the check digit
  is not verified: numbers issued since October 2020 no longer follow the checksum. A bare
  13-digit run must also pass the checksum (weights 2..9, 2..5; check `(11 - sum % 11) % 10`, for
  foreigners `(13 - sum % 11) % 10`). Without a dash or a keyword, a valid date and G alone are
  too weak: EAN-13 barcodes (Korean ones start `880`: `8801062...` reads as 1988-01-06, G 2),
  millisecond Unix times (`1704067200000` reads as 2017-04-06, G 7) and order numbers pass them
  often, while the checksum lets through one in ten. What it misses, a post-2020 number written
  bare with no keyword, belongs almost always to a child born since then. ISBNs (`978`/`979`:
  month 8x/9x) and 14-digit timestamps (`20240101123456`: no clean 13-digit run) never match.
- Account: common bank layouts with dashes (KB/우체국 6-2-6, 신한/케이뱅크 3-3-6, SC/신한 3-2-6,
  우리 4-3-6, 농협/부산 3-4-4-2, 하나 3-6-5, 기업 3-6-2-3, 카카오뱅크 4-2-7, 대구 3-2-6-1,
  씨티 3-6-3, 토스뱅크 1000-4-4), and any run of digits and dashes (dashes optional) holding
  10-14 digits with a bank word (은행, 계좌, 입금, 농협, 국민, 신한, 우리, 하나, 기업, 카카오뱅크,
  토스, ...) on the same line at most 20 characters before or 10 after it, unless that run is
  itself a phone number. The same digits with no bank word nearby stay.
- Phone: mobile 010/011/016-019, area codes 02, 031-033, 041-044, 051-055, 061-064, 070, 080,
  0502-0508 (also written `(02)` or `02)`), with one separator `-`, `.` or space used for both
  gaps, or none at all (`01012345678`, `0212345678`); mixed separators (`010-1234.5678`) are not
  a phone. Nationwide `15xx/16xx/18xx-xxxx` (dash or dot, never bare; not a year or price
  range); `+82` forms with or without the leading 0, the same separator rule applying to the
  two groups after the area code.

Unlike the authors' pattern, a bare 9-11 digit run is not a phone number unless it starts with a
real prefix: ISBNs, order numbers, prices, dates, versions and card numbers stay untouched.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable

MASKS = {"rrn": "<|rrn|>", "acc": "<|acc|>", "tel": "<|tel|>"}
KINDS = tuple(MASKS)  # the order they run in

# Left edge: not inside a word/number, not right after "1." / "1," (decimals, thousands) or
# "x-" (serial numbers like ORD-...). Right edge: no letter/digit, no "-1" or ".1" continuation.
_LEFT = r"(?<![0-9A-Za-z_])(?<![0-9][.,])(?<![0-9A-Za-z_]-)"
_RIGHT = r"(?![0-9A-Za-z_])(?![-.][0-9])"

_RRN = re.compile(
    _LEFT + r"(?P<yy>[0-9]{2})(?P<mm>0[1-9]|1[0-2])(?P<dd>0[1-9]|[12][0-9]|3[01])"
    r"(?P<sep> ?- ?|)(?P<g>[1-8])[0-9]{6}" + _RIGHT
)
_RRN_CONTEXT = re.compile(r"주민(?:등록)?\s*번호|외국인\s*등록\s*번호")
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
_CENTURY = {"1": 1900, "2": 1900, "5": 1900, "6": 1900, "3": 2000, "4": 2000, "7": 2000, "8": 2000}

_ACCOUNT_LAYOUTS = (
    (6, 2, 6),
    (3, 3, 6),
    (3, 2, 6),
    (4, 3, 6),
    (3, 4, 4, 2),
    (3, 6, 5),
    (3, 6, 2, 3),
    (4, 2, 7),
    (3, 2, 6, 1),
    (3, 6, 3),
)
_ACCOUNT_FORMAT = re.compile(
    _LEFT
    + "(?:"
    + "|".join("-".join(f"[0-9]{{{n}}}" for n in layout) for layout in _ACCOUNT_LAYOUTS)
    + r"|1000-[0-9]{4}-[0-9]{4})"
    + _RIGHT
)
_DIGIT_DASH_RUN = re.compile(_LEFT + r"[0-9]+(?:-[0-9]+)*" + _RIGHT)
_BANK_WORDS = re.compile(
    r"은행|뱅크|계좌|통장|입금|송금|이체|예금주|농협|국민|신한|우리|하나|기업|카뱅|토스|우체국|새마을|"
    r"신협|수협|씨티|제일|KB|NH|IBK|SC"
)
_BANK_WINDOW_BEFORE = 20  # characters before the number searched for a bank word
_BANK_WINDOW_AFTER = 10
_ACCOUNT_DIGITS = (10, 14)

_AREA = r"02|0(?:3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|80)|050[2-8]"
_PHONE = re.compile(
    r"(?:\+82|\(\+82\))[-. ]?(?:\(0\)[-. ]?)?0?(?:1[016789]|2|3[1-3]|4[1-4]|5[1-5]|6[1-4]|70|80)"
    r"(?P<s0>[-. ]?)[0-9]{3,4}(?P=s0)[0-9]{4}"
    + _RIGHT
    + "|"
    + _LEFT
    + r"(?:"
    + r"01[016789](?P<s1>[-. ]?)[0-9]{3,4}(?P=s1)[0-9]{4}"
    + rf"|(?:{_AREA})(?P<s2>[-. ]?)[1-9][0-9]{{2,3}}(?P=s2)[0-9]{{4}}"
    + rf"|\(?(?:{_AREA})\) ?[1-9][0-9]{{2,3}}[-. ]?[0-9]{{4}}"
    + r"|(?P<rep>1[568][0-9]{2})[-.](?P<rep2>[0-9]{4})(?! ?(?:년|원|명|개|회|호|권|쪽|번째|~))"
    + r")"
    + _RIGHT
)
_PHONE_FULL = re.compile(r"(?:" + _PHONE.pattern + r")\Z")
_HAS_DIGIT = re.compile(r"[0-9]")


def _valid_rrn(m: re.Match) -> bool:
    year = _CENTURY[m["g"]] + int(m["yy"])
    try:
        datetime.date(year, int(m["mm"]), int(m["dd"]))
    except ValueError:
        return False
    if m["sep"]:
        return True
    before = m.string[max(0, m.start() - 20) : m.start()]
    return _RRN_CONTEXT.search(before) is not None or _rrn_checksum_ok(m[0])


def _rrn_checksum_ok(digits: str) -> bool:
    total = sum(int(d) * w for d, w in zip(digits, _RRN_WEIGHTS, strict=False))
    base = 13 if digits[6] in "5678" else 11  # foreigners' numbers add 2
    return (base - total % 11) % 10 == int(digits[12])


def _year_range(m: re.Match) -> bool:
    """`1800-1900`: two years, the second later, read as a range, not a 18xx number."""
    a, b = int(m["rep"]), int(m["rep2"])
    return 1000 <= a < b <= 2100


def _near_bank_word(m: re.Match) -> bool:
    s = m.string
    before = s[max(0, m.start() - _BANK_WINDOW_BEFORE) : m.start()]
    after = s[m.end() : m.end() + _BANK_WINDOW_AFTER]
    # A bank word on another line is about something else.
    before = before.rsplit("\n", 1)[-1]
    after = after.split("\n", 1)[0]
    return _BANK_WORDS.search(before) is not None or _BANK_WORDS.search(after) is not None


def _account_in_context(m: re.Match) -> bool:
    digits = sum(c.isdigit() for c in m[0])
    lo, hi = _ACCOUNT_DIGITS
    return lo <= digits <= hi and _PHONE_FULL.match(m[0]) is None and _near_bank_word(m)


def mask_pii(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, dict[str, int]]:
    """Replaces each PII number of the given kinds (subset of `KINDS`) by its `MASKS` token.

    Returns the new text and the number of replacements per kind (kinds with none are absent).
    """
    counts: dict[str, int] = {}
    if _HAS_DIGIT.search(text) is None:
        return text, counts
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown PII kinds {sorted(unknown)}; choose from {list(KINDS)}")

    def substitute(pattern: re.Pattern, kind: str, accept) -> None:
        nonlocal text
        n = 0

        def replace(m: re.Match) -> str:
            nonlocal n
            if accept is not None and not accept(m):
                return m[0]
            n += 1
            return MASKS[kind]

        text = pattern.sub(replace, text)
        if n:
            counts[kind] = counts.get(kind, 0) + n

    if "rrn" in kinds:
        substitute(_RRN, "rrn", _valid_rrn)
    if "acc" in kinds:
        substitute(_ACCOUNT_FORMAT, "acc", None)
        substitute(_DIGIT_DASH_RUN, "acc", _account_in_context)
    if "tel" in kinds:
        substitute(_PHONE, "tel", lambda m: m["rep"] is None or not _year_range(m))
    return text, counts
