"""Streaming readers: .txt blocks keep their newlines, bad records are skipped with a reason."""

import collections
import gzip
import json
import tracemalloc

import pytest
import zstandard

from polyglot_jax.data.sources import (
    SKIP_REASONS,
    input_format,
    iter_records,
    iter_texts,
    list_input_files,
    skip_summary,
)
from polyglot_jax.errors import InputError


def _write(path, data: bytes):
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


TXT = (
    "\ufeff첫 문서 첫 줄\n첫 문서 둘째 줄\n\n"
    "둘째 문서\r\n  들여쓴 줄\r\n\r\n\r\n \t \n"
    "셋째 문서\n\n\n"
).encode()
TXT_DOCS = ["첫 문서 첫 줄\n첫 문서 둘째 줄", "둘째 문서\n  들여쓴 줄", "셋째 문서"]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".txt.zst"])
def test_txt_blocks_keep_inner_newlines(tmp_path, suffix):
    path = _write(tmp_path / f"a{suffix}", TXT)
    assert list(iter_texts(path)) == TXT_DOCS


def test_txt_without_trailing_newline(tmp_path):
    path = _write(tmp_path / "a.txt", "하나\n\n둘\n셋".encode())
    assert list(iter_texts(path)) == ["하나", "둘\n셋"]


def test_txt_bad_blocks(tmp_path):
    raw = (
        "좋은 문서\n\n".encode()
        + b"\x00\x01\x02 binary junk\n\n\xc3\x28 broken\n\n"
        + "끝".encode()
    )
    assert list(iter_records(_write(tmp_path / "a.txt", raw))) == [
        ("좋은 문서", None),
        (None, "binary"),
        (None, "invalid_utf8"),
        ("끝", None),
    ]


def _jsonl_lines():
    """(raw line, expected record) pairs covering every skip reason but huge/corrupt."""
    good = [{"text": "줄바꿈\n포함", "id": 1}, {"text": "", "id": 2}, {"text": "끝"}]
    return [
        (json.dumps(good[0], ensure_ascii=False).encode(), ("줄바꿈\n포함", None)),
        (b"", None),  # blank line: no record at all
        (b"not json", (None, "not_json")),
        (b"[1, 2]", (None, "not_object")),
        (b'{"body": "x"}', (None, "missing_field")),
        (b'{"text": 3}', (None, "field_not_string")),
        (b'{"text": "\xff\xfe broken"}', (None, "invalid_utf8")),
        (b'{"text": "lone \\ud800 surrogate"}', (None, "invalid_utf8")),
        (b'{"text": "a\\u0000b"}', (None, "binary")),
        (json.dumps({"text": "\x01\x02\x03\x04" * 5}).encode(), (None, "binary")),
        (b"\x00\x01\x02\x03 raw junk \x00", (None, "not_json")),
        (b'{"text": "tab\\tand\\fform feed ok"}', ("tab\tand\fform feed ok", None)),
        (json.dumps(good[1]).encode(), ("", None)),
        (json.dumps(good[2], ensure_ascii=False).encode(), ("끝", None)),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".ndjson.zst"])
def test_jsonl_records_and_skip_reasons(tmp_path, suffix):
    lines = _jsonl_lines()
    raw = b"\n".join(line if isinstance(line, bytes) else line.encode() for line, _ in lines)
    path = _write(tmp_path / f"a{suffix}", raw + b"\n")
    expected = [rec for _, rec in lines if rec is not None]
    assert list(iter_records(path)) == expected
    skipped = collections.Counter()
    assert list(iter_texts(path, skipped=skipped)) == [
        "줄바꿈\n포함",
        "tab\tand\fform feed ok",
        "",
        "끝",
    ]
    assert skipped == collections.Counter(r for t, r in expected if t is None)
    assert set(skipped) <= set(SKIP_REASONS)


def test_jsonl_custom_field(tmp_path):
    path = _write(tmp_path / "a.jsonl", b'{"document": "A", "text": "B"}\n{"text": "C"}\n')
    assert list(iter_records(path, field="document")) == [("A", None), (None, "missing_field")]


def test_huge_records_skipped_in_bounded_memory(tmp_path):
    limit = 1 << 16
    huge = "가" * (8 << 20)  # 24 MB of UTF-8 on one line
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        json.dumps({"text": "앞"}) + "\n" + json.dumps({"text": huge}) + "\n" + '{"text": "뒤"}\n'
    )
    txt = tmp_path / "a.txt"
    txt.write_text(f"앞\n\n{huge}\n\n짧은\n{'나' * limit}\n줄들\n\n뒤\n")
    for path, n_huge in ((jsonl, 1), (txt, 2)):
        tracemalloc.start()
        records = list(iter_records(path, max_record_bytes=limit))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert records[0] == ("앞", None) and records[-1] == ("뒤", None)
        assert records[1:-1] == [(None, "huge_record")] * n_huge
        assert peak < 4 << 20, f"{path.name}: peak {peak} bytes"  # the line is 24 MB


def test_line_exactly_at_the_limit_is_kept(tmp_path):
    line = json.dumps({"text": "x" * 100}).encode()
    path = _write(tmp_path / "a.jsonl", line + b"\r\n" + line)
    assert [t for t, _ in iter_records(path, max_record_bytes=len(line))] == ["x" * 100] * 2
    assert [r for _, r in iter_records(path, max_record_bytes=len(line) - 1)] == ["huge_record"] * 2


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_stream_keeps_what_was_read(tmp_path, suffix):
    lines = b"".join(json.dumps({"text": f"문서 {i} " * 20}).encode() + b"\n" for i in range(2000))
    path = _write(tmp_path / f"a{suffix}", lines)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    records = list(iter_records(path))
    assert records[-1] == (None, "corrupt_stream")
    texts = [t for t, _ in records[:-1]]
    assert 0 < len(texts) < 2000 and texts == [f"문서 {i} " * 20 for i in range(len(texts))]


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (".jsonl.gz", "Compressed file ended before the end-of-stream marker was reached"),
        (".jsonl.zst", "zstd stream ends inside a frame"),
    ],
)
def test_stream_errors_hold_the_decompressor_message(tmp_path, suffix, message):
    path = _write(tmp_path / f"a{suffix}", b'{"text": "x"}\n' * 1000)
    path.write_bytes(path.read_bytes()[:-8])
    errors = []
    assert list(iter_records(path, stream_errors=errors))[-1] == (None, "corrupt_stream")
    assert errors == [message]
    good = _write(tmp_path / f"b{suffix}", b'{"text": "x"}\n')
    assert list(iter_records(good, stream_errors=errors)) == [("x", None)]
    assert errors == [message]


@pytest.mark.parametrize(
    ("path", "documents", "skipped", "error", "line"),
    [
        (
            "a.txt",
            0,
            {"binary": 2, "invalid_utf8": 1},
            None,
            "a.txt: 0 document(s) read, 3 bad record(s) skipped (binary 2, invalid_utf8 1)",
        ),
        (
            "d/b.jsonl.gz",
            1234,
            {"corrupt_stream": 1},
            "Not a gzipped file (b'{\"')",
            "d/b.jsonl.gz: 1,234 document(s) read; then the gz stream is truncated or damaged "
            "(Not a gzipped file (b'{\"')): the rest of the file is lost",
        ),
        (
            "c.ndjson.zst",
            5,
            {"corrupt_stream": 1, "not_json": 2},
            "zstd stream ends inside a frame",
            "c.ndjson.zst: 5 document(s) read, 2 bad record(s) skipped (not_json 2); then the zst "
            "stream is truncated or damaged (zstd stream ends inside a frame): the rest of the file "
            "is lost",
        ),
    ],
)
def test_skip_summary(path, documents, skipped, error, line):
    assert skip_summary(path, documents, collections.Counter(skipped), error) == line


def test_concatenated_zstd_frames(tmp_path):
    frames = [
        zstandard.ZstdCompressor().compress(f'{{"text": "{i}"}}\n'.encode()) for i in range(3)
    ]
    (tmp_path / "a.jsonl.zst").write_bytes(b"".join(frames))
    assert list(iter_texts(tmp_path / "a.jsonl.zst")) == ["0", "1", "2"]


def test_not_really_gzip(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(b'{"text": "plain, not gzip"}\n')
    assert list(iter_records(path)) == [(None, "corrupt_stream")]


@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.jsonl.gz", "e.txt.zst"])
def test_empty_files_yield_nothing(tmp_path, name):
    path = _write(tmp_path / name, b"")
    assert list(iter_records(path)) == []


def test_blank_only_txt_yields_nothing(tmp_path):
    assert list(iter_records(_write(tmp_path / "b.txt", b"\n \n\t\n\r\n"))) == []


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(iter_texts(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="unsupported input type"):
        list(iter_texts(_write(tmp_path / "a.csv", b"x")))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match="no such file"):
        list(iter_texts(tmp_path / "dir.jsonl"))
    assert input_format("x/A.JSONL.ZST") == ("jsonl", "zst")
    assert input_format("a.txt") == ("txt", None)


def test_list_input_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    a = _write(tmp_path / "d" / "a.jsonl", b"")
    b = _write(tmp_path / "d" / "sub" / "b.txt.gz", b"")
    _write(tmp_path / "d" / "report.json", b"{}")
    _write(tmp_path / "d" / "notes.md", b"")
    c = _write(tmp_path / "c.txt", b"")
    assert list_input_files([tmp_path / "d"]) == [str(a), str(b)]
    assert list_input_files([str(c), str(tmp_path / "d" / "*.jsonl"), str(a)]) == [str(c), str(a)]
    with pytest.raises(InputError, match="no such file or directory"):
        list_input_files([tmp_path / "nope.txt"])
    with pytest.raises(InputError, match="pattern matches no files"):
        list_input_files([str(tmp_path / "*.zst")])
    with pytest.raises(InputError, match="unsupported"):
        list_input_files([tmp_path / "d" / "notes.md"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        list_input_files([tmp_path / "empty"])
