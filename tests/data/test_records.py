"""The record format and manifest.json: round trips, and every malformed manifest named."""

import json
import subprocess
import sys

import numpy as np
import pytest

from polyglot_jax.data.records import (
    FORMAT,
    MANIFEST,
    decode_record,
    encode_record,
    read_manifest,
    token_dtype,
)
from polyglot_jax.data.tokenize import write_manifest, write_shard
from polyglot_jax.errors import InputError


def test_record_round_trip():
    for dtype in (np.uint16, np.uint32):
        tokens = np.array([0, 5, np.iinfo(dtype).max, 7], dtype)
        got_tokens, got_starts = decode_record(encode_record(tokens, np.array([0, 2])))
        assert got_tokens.dtype == dtype and got_tokens.tolist() == tokens.tolist()
        assert got_starts.tolist() == [0, 2]
        got_tokens, got_starts = decode_record(encode_record(tokens, np.array([], np.uint32)))
        assert got_tokens.tolist() == tokens.tolist() and got_starts.size == 0


def _valid_manifest(directory):
    tokens = np.arange(10, dtype=np.uint16)
    records = write_shard(directory / "shard-00000.array_record", tokens, np.array([4, 6]), 8)
    manifest = {
        "format": FORMAT, "tokenizer_sha256": "ab", "eos_id": 2, "vocab_size": 100,
        "token_dtype": "uint16", "block_tokens": 8, "documents": 2, "tokens": 10,
        "records": records, "tokenizer": "/tok",
        "shards": [{"file": "shard-00000.array_record", "documents": 2, "tokens": 10,
                    "records": records}],
    }  # fmt: skip
    return manifest


def _set(manifest, field, value):
    """A copy of `manifest` with `field` ('a' or 'shards.0.b') set, or removed when value is ..."""
    manifest = json.loads(json.dumps(manifest))
    *parents, last = [int(k) if k.isdigit() else k for k in field.split(".")]
    target = manifest
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return manifest


BAD_MANIFESTS = [  # (how the valid manifest is changed, what the error names)
    (("vocab_size", "abc"), "field 'vocab_size' is 'abc', expected a positive integer"),
    (("vocab_size", 0), "field 'vocab_size' is 0, expected a positive integer"),
    (("shards", 5), "field 'shards' is 5, expected a non-empty list"),
    (("shards", []), "field 'shards' is [], expected a non-empty list"),
    (("shards.0", "shard-00000.array_record"), "field 'shards[0]' is 'shard-00000.array_record'"),
    (("shards.0.file", 3), "field 'shards[0].file' is 3, expected a file name"),
    (("shards.0.records", "1"), "field 'shards[0].records' is '1', expected a non-negative"),
    (("shards.0.tokens", ...), "missing field 'shards[0].tokens'"),
    (("records", ...), "missing field 'records'"),
    (("eos_id", ...), "missing field 'eos_id'"),
    (("documents", 2.0), "field 'documents' is 2.0, expected a non-negative integer"),
    (("documents", True), "field 'documents' is True, expected a non-negative integer"),
    (("tokens", -1), "field 'tokens' is -1, expected a non-negative integer"),
    (("tokens", 11), "field 'tokens' is 11, but its shards add up to 10"),
    (("eos_id", None), "field 'eos_id' is None, expected a non-negative integer"),
    (("token_dtype", "int8"), "field 'token_dtype' is 'int8', expected 'uint16' or 'uint32'"),
    (("block_tokens", "8"), "field 'block_tokens' is '8', expected a positive integer"),
    (("tokenizer", ["a"]), "field 'tokenizer' is ['a'], expected a string"),
    (("format", "other/1"), "format 'other/1', expected"),
    (("format", ...), "format None, expected"),
]


@pytest.mark.parametrize(("change", "error"), BAD_MANIFESTS, ids=lambda x: str(x)[:40])
def test_read_manifest_names_the_bad_field(tmp_path, change, error):
    manifest = _valid_manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    write_manifest(tmp_path, _set(manifest, *change))
    with pytest.raises(InputError) as e:
        read_manifest(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / MANIFEST}: ")
    assert error in str(e.value)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b'{"format": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2]", "not a JSON object but a list"),
        (b'"manifest"', "not a JSON object but a str"),
    ],
)
def test_read_manifest_of_a_file_that_is_not_a_json_object(tmp_path, content, error):
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(InputError, match=rf"^{tmp_path / MANIFEST}: {error}"):
        read_manifest(tmp_path)


def test_reading_records_needs_no_tokenizer_machinery():
    """The training pipeline decodes records through records.py alone: neither the tokenize job
    nor the `tokenizers` library is imported with it."""
    code = (
        "import sys, polyglot_jax.data.records, polyglot_jax.data.pipeline; "
        "bad = [m for m in ('polyglot_jax.data.tokenize', 'polyglot_jax.data.tokenizer', "
        "'tokenizers') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_token_dtype_is_uint16_exactly_while_every_id_fits():
    """Ids run to vocab_size - 1: 65,536 ids fit uint16 (max 65,535), one more does not."""
    assert token_dtype(65536) == np.dtype("<u2") and np.iinfo(np.uint16).max == 65536 - 1
    assert token_dtype(65537) == np.dtype("<u4")
