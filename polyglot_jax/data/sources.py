"""Streaming document readers for the text inputs of `clean`, `train-tokenizer` and `tokenize`.

Formats, chosen by the file name (after an optional `.gz` or `.zst` suffix):
- `.txt`: a document is a block of lines separated by one or more blank (empty or
  whitespace-only) lines; newlines inside a block are kept (CRLF becomes LF, the last one dropped).
- `.jsonl` (also `.ndjson`): one JSON object per line; the document is the string in `field`.

Everything streams line by line with bounded memory: a line (or `.txt` block) longer than
`max_record_bytes` is skipped without being held in memory. Bad records never raise; they come out
of `iter_records` as `(None, reason)` with a reason from `SKIP_REASONS`. Only a missing or unusable
path raises `InputError`. `skip_summary` words a file's skipped records as one line for the user.
"""

from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO

import zstandard

from polyglot_jax.errors import InputError

MAX_RECORD_BYTES = 8 << 20  # 8 MiB: far above any real document, well below a memory problem.

SKIP_REASONS = (
    "invalid_utf8",  # bytes that are not UTF-8 (or JSON escapes of lone surrogates)
    "binary",  # NUL bytes or many control characters: not text
    "huge_record",  # a line / .txt block over max_record_bytes
    "not_json",  # a .jsonl line that does not parse
    "not_object",  # a .jsonl line that parses to something other than an object
    "missing_field",  # the object has no `field`
    "field_not_string",  # `field` is there but not a string
    "corrupt_stream",  # the gzip/zstd stream is truncated or damaged; the rest of the file is lost
)

# (text, None) for a document, (None, reason) for a skipped record.
Record = tuple[str | None, str | None]

_TEXT_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_COMPRESSIONS = (".gz", ".zst")
# C0 controls other than \t \n \v \f \r, and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_BINARY_CONTROL_SHARE = 0.01
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")
_BOM = b"\xef\xbb\xbf"
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)


def input_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """(`"txt"` | `"jsonl"`, `"gz"` | `"zst"` | None) from the file name.

    InputError if the name is unsupported."""
    name = os.fspath(path).lower()
    compression = None
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    fmt = _TEXT_FORMATS.get(os.path.splitext(name)[1])
    if fmt is None:
        raise InputError(
            f"{os.fspath(path)}: unsupported input type; expected .txt or .jsonl (or .ndjson), "
            "optionally .gz or .zst"
        )
    return fmt, compression


def is_supported(path: str | os.PathLike) -> bool:
    """Whether `input_format` accepts this file name."""
    try:
        input_format(path)
    except InputError:
        return False
    return True


def list_input_files(specs: Iterable[str | os.PathLike]) -> list[str]:
    """Expands input specs into files: a file as is, a directory into its supported files
    (recursively, sorted), a glob pattern into its matches. InputError for a spec matching nothing.
    Duplicates (the same file named twice) are kept once, in first-seen order."""
    files: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if is_supported(name)
            )
            if not found:
                raise InputError(f"{spec}: directory holds no .txt/.jsonl(.gz/.zst) files")
        elif os.path.exists(spec):
            input_format(spec)
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{spec}: pattern matches no files")
            for p in found:
                input_format(p)
        else:
            raise InputError(f"{spec}: no such file or directory")
        files.extend(found)
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


class _ZstdFrames(io.RawIOBase):
    """Decompresses every frame of a .zst file in turn (concatenated frames are one stream) and
    raises EOFError when the file ends inside a frame; zstandard's `stream_reader` returns a
    truncated file's data without any error. Input is fed in 32 KiB pieces."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> None:
        pieces = []
        while data:
            self._in_frame = True
            pieces.append(self._frame.decompress(data))
            data = b""
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = self._dctx.decompressobj()
                self._in_frame = False
        self._out, self._pos = b"".join(pieces), 0

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._raw.read(1 << 15)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame")
                return 0
            self._feed(data)
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: str, compression: str | None) -> BinaryIO:
    if compression == "gz":
        return gzip.open(path, "rb")
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned stream
    if compression == "zst":
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    return raw


def _read_lines(stream: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Raw lines (with their newline), or None for a line longer than `limit` bytes (which is read
    past in 256 KiB pieces, never held whole)."""
    first = True
    while True:
        line = stream.readline(limit + 2)
        if not line:
            return
        if first:
            first = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if len(line) > limit and not (line.endswith(b"\n") and len(line.rstrip(b"\r\n")) <= limit):
            while not line.endswith(b"\n"):
                line = stream.readline(1 << 18)
                if not line:
                    break
            yield None
        else:
            yield line


def _text_problem(text: str) -> str | None:
    """'binary' when the decoded text is not plausibly text, else None."""
    if _CONTROL.search(text) is None:
        return None
    if "\x00" in text or len(_CONTROL.findall(text)) > _BINARY_CONTROL_SHARE * len(text):
        return "binary"
    return None


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    problem = _text_problem(text)
    return (None, problem) if problem else (text, None)


def _jsonl_records(lines: Iterator[bytes | None], field: str) -> Iterator[Record]:
    for raw in lines:
        if raw is None:
            yield None, "huge_record"
            continue
        if not raw.strip():
            continue  # a blank line is no record
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield None, "invalid_utf8"
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            yield None, "not_json"
            continue
        if not isinstance(obj, dict):
            yield None, "not_object"
            continue
        if field not in obj:
            yield None, "missing_field"
            continue
        text = obj[field]
        if not isinstance(text, str):
            yield None, "field_not_string"
            continue
        if _SURROGATE_ESCAPE.search(raw):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                yield None, "invalid_utf8"
                continue
        problem = _text_problem(text)
        yield (None, problem) if problem else (text, None)


def _txt_records(lines: Iterator[bytes | None], limit: int) -> Iterator[Record]:
    block: list[bytes] = []
    size = 0
    huge = False
    for raw in lines:
        if raw is not None and not raw.strip():
            if huge:
                yield None, "huge_record"
            elif block:
                yield _decode(b"\n".join(block))
            block, size, huge = [], 0, False
            continue
        if huge:
            continue
        if raw is None:
            block, huge = [], True
            continue
        line = raw.rstrip(b"\n")
        if line.endswith(b"\r"):
            line = line[:-1]
        size += len(line) + 1
        if size > limit:
            block, huge = [], True
            continue
        block.append(line)
    if huge:
        yield None, "huge_record"
    elif block:
        yield _decode(b"\n".join(block))


def iter_records(
    path: str | os.PathLike,
    field: str = "text",
    *,
    max_record_bytes: int = MAX_RECORD_BYTES,
    stream_errors: list[str] | None = None,
) -> Iterator[Record]:
    """Streams `(text, None)` for each document of `path` and `(None, reason)` for each bad record.

    `reason` is one of `SKIP_REASONS`. A damaged compressed stream ends the file with one
    `(None, "corrupt_stream")` after the records read so far; the decompressor's message is
    appended to `stream_errors` when given. InputError if `path` is missing, is not a file, or
    has an unsupported name.
    """
    path = os.fspath(path)
    fmt, compression = input_format(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        stream = _open_binary(path, compression)
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror or e})") from e
    with stream:
        lines = _read_lines(stream, max_record_bytes)
        if fmt == "jsonl":
            records = _jsonl_records(lines, field)
        else:
            records = _txt_records(lines, max_record_bytes)
        try:
            yield from records
        except _STREAM_ERRORS as e:
            if stream_errors is not None:
                stream_errors.append(str(e) or type(e).__name__)
            yield None, "corrupt_stream"


def skip_summary(
    path: str | os.PathLike,
    documents: int,
    skipped: Mapping[str, int],
    stream_error: str | None = None,
) -> str:
    """One line naming `path` and what was wrong with it: `documents` read, `skipped` bad records
    by reason, and whether (and with which `stream_error`) the compressed stream broke off."""
    path = os.fspath(path)
    line = f"{path}: {documents:,} document(s) read"
    bad = {reason: n for reason, n in sorted(skipped.items()) if reason != "corrupt_stream" and n}
    if bad:
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in bad.items())
        line += f", {sum(bad.values()):,} bad record(s) skipped ({reasons})"
    if skipped.get("corrupt_stream"):
        _, compression = input_format(path)
        line += (
            f"; then the {compression} stream is truncated or damaged"
            f" ({stream_error or 'corrupt_stream'}): the rest of the file is lost"
        )
    return line


def iter_texts(
    path: str | os.PathLike,
    field: str = "text",
    *,
    skipped: collections.Counter | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[str]:
    """The documents of `path` (see `iter_records`); bad records are dropped and, when `skipped`
    is given, counted there by reason."""
    for text, reason in iter_records(path, field, max_record_bytes=max_record_bytes):
        if text is not None:
            yield text
        elif skipped is not None:
            skipped[reason] += 1
