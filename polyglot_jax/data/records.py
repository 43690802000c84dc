"""Tokenized corpora on disk, the read side: the record format, `manifest.json` and its checks.

A tokenized directory (written by `tokenize.py`) holds:
- `shard-00000.array_record`, ... ArrayRecord files (`group_size:1`), one record per token block;
- `shard-00000.json`, ... the counts and settings of each finished shard (written after the shard
  file is in place, so a shard counts as finished exactly when its `.json` exists);
- `manifest.json`, written last: `documents`, `tokens` (eos included), `records`, `shards` (a list
  of `{file, documents, tokens, records}`), `tokenizer_sha256`, `eos_id`, `vocab_size`,
  `token_dtype`, `block_tokens` and what produced them (`tokenizer`: its absolute path).

A record is a run of whole documents of one shard, each followed by eos (a document longer than a
block continues in the next record, which then starts with no document at offset 0). Record bytes,
little-endian: uint32 header `[num_tokens, num_starts, itemsize]`, the tokens (uint16 when the vocab
fits, else uint32), then the uint32 offsets at which documents start. Those offsets are what
packing needs to keep documents apart.

Nothing here imports the tokenizer machinery: the training pipeline reads records through this
module only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from polyglot_jax.errors import InputError

FORMAT = "polyglot_jax.token_blocks/1"
MANIFEST = "manifest.json"
_HEADER = np.dtype("<u4")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_record(tokens: np.ndarray, starts: np.ndarray) -> bytes:
    """Bytes of one record: `tokens` [n] uint16|uint32, `starts` [m] document start offsets (< n)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise ValueError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    header = np.array([tokens.size, len(starts), tokens.dtype.itemsize], _HEADER)
    return header.tobytes() + tokens.tobytes() + np.asarray(starts, _HEADER).tobytes()


def decode_record(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] uint16|uint32, starts [m] uint32) of a record written by `encode_record`."""
    n, m, itemsize = np.frombuffer(data, _HEADER, 3)
    offset = 3 * _HEADER.itemsize
    tokens = np.frombuffer(data, f"<u{itemsize}", int(n), offset)
    starts = np.frombuffer(data, _HEADER, int(m), offset + int(n) * int(itemsize))
    return tokens, starts


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


_COUNTS = ("documents", "tokens", "records")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _bad_field(path: Path, field: str, value: Any, expected: str) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{path}: field {field!r} is {shown}, expected {expected}")


def _check_manifest(path: Path, manifest: Any) -> None:
    """InputError naming `path` and the first field of the wrong type or value."""
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object but a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in (*_COUNTS, "shards", "eos_id", "token_dtype"):
        if key not in manifest:
            raise InputError(f"{path}: missing field {key!r}")
    for key in (*_COUNTS, "eos_id"):
        if not _is_int(manifest[key], 0):
            raise _bad_field(path, key, manifest[key], "a non-negative integer")
    for key in ("vocab_size", "block_tokens"):  # not read by the pipeline: checked when present
        if key in manifest and not _is_int(manifest[key], 1):
            raise _bad_field(path, key, manifest[key], "a positive integer")
    if manifest["token_dtype"] not in ("uint16", "uint32"):
        raise _bad_field(path, "token_dtype", manifest["token_dtype"], "'uint16' or 'uint32'")
    for key in ("tokenizer", "tokenizer_sha256"):
        if key in manifest and not isinstance(manifest[key], str):
            raise _bad_field(path, key, manifest[key], "a string")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise _bad_field(path, "shards", shards, "a non-empty list of shard objects")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise _bad_field(path, f"shards[{i}]", shard, "an object")
        for key in ("file", *_COUNTS):
            if key not in shard:
                raise InputError(f"{path}: missing field 'shards[{i}].{key}'")
        if not isinstance(shard["file"], str) or not shard["file"]:
            raise _bad_field(path, f"shards[{i}].file", shard["file"], "a file name")
        for key in _COUNTS:
            if not _is_int(shard[key], 0):
                raise _bad_field(path, f"shards[{i}].{key}", shard[key], "a non-negative integer")
    for key in _COUNTS:  # the pipeline sizes shares by the totals and finds records by shard
        total = sum(shard[key] for shard in shards)
        if manifest[key] != total:
            raise InputError(
                f"{path}: field {key!r} is {manifest[key]}, but its shards add up to {total}"
            )


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a tokenized directory, checked: InputError if missing, not JSON, of another
    format, with a field missing or of the wrong type, or naming a shard file that is not there."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: no {MANIFEST} (not a tokenized directory; run tokenize)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    _check_manifest(path, manifest)
    for shard in manifest["shards"]:
        if not (directory / shard["file"]).is_file():
            raise InputError(f"{directory / shard['file']}: shard listed in {MANIFEST} is missing")
    return manifest


def manifest_tokenizer(directory: str | os.PathLike, recorded: str | None) -> Path | None:
    """Where the tokenizer a manifest records (`recorded`) is, or None if it is not found.

    Manifests record an absolute path; older ones the path as typed, relative to where tokenize
    ran: that is tried relative to the manifest's directory first, then as given (from the
    current directory)."""
    if not recorded:
        return None
    for candidate in (Path(directory) / recorded, Path(recorded)):
        if candidate.is_dir():  # a tokenizer directory, or (as load_tokenizer takes) its file
            found = (candidate / "tokenizer.json").is_file()
        else:
            found = candidate.is_file()
        if found:
            return candidate
    return None


def _stats_name(file: str) -> str:
    return file.removesuffix(".array_record") + ".json"


def _documents(manifest: dict, k: int) -> str:
    """Shard k's documents, numbered in input order across the directory."""
    first = sum(s["documents"] for s in manifest["shards"][:k])
    return f"documents {first}-{first + manifest['shards'][k]['documents'] - 1}"


def check_shards(directory: str | os.PathLike, manifest: dict | None = None) -> None:
    """InputError naming the first shard that cannot be opened (truncated or damaged) or holds
    another number of records than `manifest.json` lists. Cheap: reads each file's index only."""
    from array_record.python.array_record_module import ArrayRecordReader

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    for k, shard in enumerate(manifest["shards"]):
        path = directory / shard["file"]
        listed = shard["records"]
        redo = f"delete it and {_stats_name(shard['file'])}, then re-run tokenize to rewrite it"
        try:
            reader = ArrayRecordReader(str(path))
            ok, count = reader.ok(), reader.num_records()
            reader.close()  # a reader that is not ok raises its error here
            reason = None
        except Exception as e:  # array_record raises RuntimeError with Riegeli's message
            ok, reason = False, str(e)
        if not ok:
            raise InputError(
                f"{path}: truncated or damaged ArrayRecord shard ({reason or 'unreadable'}); "
                f"none of its {listed} records ({_documents(manifest, k)} of {directory}) can be "
                f"read; {redo}"
            )
        if count != listed:
            lost = f"records from index {count} on" if count < listed else "its records"
            raise InputError(
                f"{path}: holds {count} records but {MANIFEST} lists {listed}, so {lost} "
                f"(among {_documents(manifest, k)} of {directory}) cannot be read as listed; "
                f"{redo}"
            )


def unreadable_record_error(
    directory: str | os.PathLike, manifest: dict, index: int, error: Exception
) -> InputError:
    """The InputError for record `index` of a directory (counted across its shards) whose read
    failed with `error`: names the shard, the record in it and the documents at stake."""
    first = 0
    for k, shard in enumerate(manifest["shards"]):
        if index < first + shard["records"]:
            return InputError(
                f"{Path(directory) / shard['file']}: record {index - first} of "
                f"{shard['records']} cannot be read ({error}); the documents in it (among "
                f"{_documents(manifest, k)} of {directory}) are lost; delete the shard and "
                f"{_stats_name(shard['file'])}, then re-run tokenize to rewrite it"
            )
        first += shard["records"]
    return InputError(f"{directory}: record {index} cannot be read ({error})")


def shard_files(directory: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Paths of the shard files of a tokenized directory, in order."""
    manifest = manifest or read_manifest(directory)
    return [str(Path(directory) / s["file"]) for s in manifest["shards"]]
