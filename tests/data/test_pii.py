"""PII masking: a table of real-looking positives and of near misses that must stay untouched."""

import pytest

from polyglot_jax.data.pii import KINDS, MASKS, mask_pii

TEL, RRN, ACC = MASKS["tel"], MASKS["rrn"], MASKS["acc"]

# (input, expected output): every PII number in the input becomes its mask, nothing else moves.
POSITIVES = [
    # mobile, every prefix, every separator
    ("연락처 010-1234-5678 로 주세요", f"연락처 {TEL} 로 주세요"),
    ("010.1234.5678", TEL),
    ("010 1234 5678", TEL),
    ("01012345678으로 문자", f"{TEL}으로 문자"),
    ("011-123-4567", TEL),
    ("016-234-5678번", f"{TEL}번"),
    ("017 345 6789", TEL),
    ("018.456.7890", TEL),
    ("0199876543", TEL),
    ("전화:010-9876-5432.", f"전화:{TEL}."),
    ("(010-2222-3333)", f"({TEL})"),
    ("폰번호는010-1111-2222입니다", f"폰번호는{TEL}입니다"),
    ("연락주세요.010-4444-5555", f"연락주세요.{TEL}"),
    # area codes
    ("서울 02-123-4567", f"서울 {TEL}"),
    ("02-1234-5678", TEL),
    ("(02) 123-4567", TEL),
    ("02)1234-5678", TEL),
    ("031-123-4567 경기", f"{TEL} 경기"),
    ("032.555.1234", TEL),
    ("033 1234 5678", TEL),
    ("041-555-6666", TEL),
    ("044-300-1234", TEL),
    ("051-987-6543 부산", f"{TEL} 부산"),
    ("055 123 4567", TEL),
    ("0631234567", TEL),
    ("064-720-1234 제주", f"{TEL} 제주"),
    ("070-1234-5678", TEL),
    ("080-123-4567 수신자부담", f"{TEL} 수신자부담"),
    ("0505-123-4567", TEL),
    ("Tel.02-3456-7890", f"Tel.{TEL}"),
    # no separator at all
    ("0212345678", TEL),
    ("021234567번", f"{TEL}번"),
    ("0311234567", TEL),
    ("문의 07012345678 로", f"문의 {TEL} 로"),
    ("0801234567", TEL),
    ("05051234567", TEL),
    ("01612345678", TEL),
    ("(02)12345678", TEL),
    # nationwide numbers
    ("고객센터 1588-1234", f"고객센터 {TEL}"),
    ("1577.1234", TEL),
    ("1644-5678 로 문의", f"{TEL} 로 문의"),
    ("1800-1234", TEL),
    # +82
    ("+82 10-1234-5678", TEL),
    ("+82-10-1234-5678", TEL),
    ("+821012345678", TEL),
    ("+82 2 123 4567", TEL),
    ("+82 (0)10 1234 5678", TEL),
    ("(+82) 10-1234-5678", TEL),
    ("+82-1012345678", TEL),
    ("+82-31-123-4567", TEL),
    # resident registration numbers (valid date, gender digit 1-8)
    ("주민번호 900101-1234567", f"주민번호 {RRN}"),
    ("850315-2345678 입니다", f"{RRN} 입니다"),
    ("010203-3123456", RRN),
    ("991231-4234567", RRN),
    ("000229-3123456", RRN),  # 2000 was a leap year
    ("960229-1234567", RRN),  # so was 1996
    ("880705-5123456", RRN),  # foreigner, 1900s
    ("150101-7123456", RRN),  # foreigner, 2000s
    ("800101 - 1234567", RRN),
    ("주민등록번호: 9001011234567", f"주민등록번호: {RRN}"),  # keyword: no checksum needed
    ("외국인등록번호 8807055123450", f"외국인등록번호 {RRN}"),
    # no dash and no keyword: the check digit must hold
    ("9001011234568", RRN),
    ("본인 확인 8503152345678 입니다", f"본인 확인 {RRN} 입니다"),
    ("번호는0102033123451이고", f"번호는{RRN}이고"),
    ("9912314234567.", f"{RRN}."),
    ("8807055123459", RRN),  # foreigner: check digit (13 - sum % 11) % 10
    ("1501017123458", RRN),
    # account numbers: bank layouts
    ("123456-78-901234", ACC),
    ("110-123-456789", ACC),
    ("1002-123-456789", ACC),
    ("301-1234-5678-91", ACC),
    ("123-456789-01234", ACC),
    ("010-123456-01-012", ACC),
    ("3333-01-1234567", ACC),
    ("1000-1234-5678", ACC),
    ("123-45-678901-2", ACC),
    # account numbers: digit runs next to a bank word
    ("국민은행 12345678901234 홍길동", f"국민은행 {ACC} 홍길동"),
    ("계좌: 1234-5678-90 입니다", f"계좌: {ACC} 입니다"),
    ("농협 352-0123-4567-83", f"농협 {ACC}"),
    ("입금 계좌 9876543210", f"입금 계좌 {ACC}"),
    ("우리 1002-12-3456789", f"우리 {ACC}"),
    ("1234567890123 (카카오뱅크)", f"{ACC} (카카오뱅크)"),
    ("국민은행 12345678901", f"국민은행 {ACC}"),
    ("우리은행 123456789012 예금주 홍길동", f"우리은행 {ACC} 예금주 홍길동"),
    ("이체: 9876543210", f"이체: {ACC}"),
    ("98765432109 (신한)", f"{ACC} (신한)"),
    ("입금은 98765432101234 으로", f"입금은 {ACC} 으로"),
    # several in one text, kinds together, newlines kept
    (
        "이름: 홍길동\n전화 010-1234-5678\n주민 900101-1234567\n신한 110-123-456789",
        f"이름: 홍길동\n전화 {TEL}\n주민 {RRN}\n신한 {ACC}",
    ),
    ("010-1111-2222, 010-3333-4444", f"{TEL}, {TEL}"),
    ("입금 후 010-1234-5678로 문자", f"입금 후 {TEL}로 문자"),  # a phone stays a phone
    ("입금 후 01012345678로 문자", f"입금 후 {TEL}로 문자"),
]

NEAR_MISSES = [
    # dates and times
    "2023-01-15",
    "2023.01.15 개봉",
    "2023/01/15",
    "20230115",
    "2023-01-15 10:30:00",
    "2023-01-15T10:30:00+09:00",
    "12:34:56.789",
    # years
    "2010년 2011년 2012년",
    "1800-1900년대",
    "1592-1598 임진왜란",
    "1988 2002 2018",
    # prices and counts
    "1,500,000원",
    "가격 1500-2000원",
    "15,000,000,000원",
    "관객수 10,234,567명",
    "3,141,592,653",
    "0.0101234567",
    # version numbers
    "1.2.3",
    "v10.1234.5678",
    "Python 3.11.4 / jax 0.10.2",
    "build 010.1234.56789",
    # ISBNs
    "ISBN 978-89-954321-0-5",
    "ISBN 979-11-6224-123-4",
    "9788995432105",
    "ISBN 89-7914-123-4",
    # order, tracking, serial and card-like numbers
    "주문번호 2023011512345",
    "주문번호 20230115-0001234",
    "ORD-123-456-789012",
    "송장번호 123456789012",
    "카드 1234-5678-9012-3456",
    "4111 1111 1111 1111",
    "일련번호 0123456789012345",
    # digit runs that look like phones or RRNs but are not
    "01234567890123456789",
    "123-4567-8901",
    "013-1234-5678",
    "02-012-3456",
    "900230-1234567",  # February 30th
    "901301-1234567",  # month 13
    "900101-9234567",  # gender digit 9
    "0101234",
    # phones: mixed separators, bad prefixes, no separator where one is required
    "010-1234.5678",
    "010.1234-5678",
    "010 1234-5678",
    "02-123.4567",
    "031 123-4567",
    "+82 10-1234.5678",
    "0201234567",
    "0131234567",
    "0001234567",
    "0505123456",
    "010123456789",
    "15881234",
    # RRNs without a dash or keyword: check digit wrong, or not a clean 13-digit run
    "9001011234567",  # 9001011234568 with the last digit changed
    "8503152345670",
    "8807055123450",  # foreigner, check digit of a citizen's number
    "1704067200000",  # millisecond Unix time: 2017-04-06, G 7, but the check digit fails
    "바코드 8801062123456",  # Korean EAN-13: 1988-01-06, G 2, but the check digit fails
    "9791162241234",  # ISBN: month 91
    "20240101123456",  # 14-digit timestamp
    "19001011234568",  # a valid RRN inside 14 digits
    "A9001011234568",
    "9001011234568kg",
    "9001011234568-1",
    "ORD-9001011234568",
    "9002301234563",  # February 30th
    "4111111111111111",
    # accounts: the same digits with no bank word nearby, or too few/many digits
    "12345678901",
    "번호 123456789012 개",
    "98765432101234",
    "신한\n12345678901",
    "국민은행 본점 주소는 서울시 중구 어딘가 12345678901",
    "계좌 123456789",
    "계좌 123456789012345",
    "계좌 없음, 가격 12,345,678원",  # bank word but a price
    "우리 2023-01-15에 만나",  # bank-ish word but a date (8 digits)
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_masks_positive(text, expected):
    assert mask_pii(text)[0] == expected


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_miss_untouched(text):
    assert mask_pii(text) == (text, {})


def test_counts_per_kind():
    text = "010-1234-5678 02-123-4567 900101-1234567 110-123-456789"
    masked, counts = mask_pii(text)
    assert counts == {"tel": 2, "rrn": 1, "acc": 1}
    assert masked == f"{TEL} {TEL} {RRN} {ACC}"


def test_kinds_switch():
    text = "010-1234-5678 900101-1234567 110-123-456789"
    assert mask_pii(text, kinds=["tel"]) == (f"{TEL} 900101-1234567 110-123-456789", {"tel": 1})
    assert mask_pii(text, kinds=[]) == (text, {})
    with pytest.raises(ValueError, match="unknown PII kinds"):
        mask_pii(text, kinds=["email"])


def test_masks_are_the_tokenizer_specials():
    assert KINDS == ("rrn", "acc", "tel")
    assert MASKS == {"rrn": "<|rrn|>", "acc": "<|acc|>", "tel": "<|tel|>"}
