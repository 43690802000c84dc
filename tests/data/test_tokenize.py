"""The tokenize job: block layout, shard contents and manifest, workers, resume, the CLI."""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polyglot_jax.data.records import (
    MANIFEST,
    decode_record,
    manifest_tokenizer,
    read_manifest,
    shard_files,
)
from polyglot_jax.data.tokenize import block_boundaries, tokenize_to_shards
from polyglot_jax.errors import ConfigError, InputError

DOCS = [
    "대한민국은 민주공화국이다.",
    "",  # empty: skipped, counted
    "영화가 정말 재밌어요 ㅋㅋㅋ\n\n두 번 봤어요.",
    "A long document. " * 40,  # longer than a block: split over records
    "짧음",
    "<|tel|>로 연락 주세요",
    "😀 emoji and   spaces\t\ttabs",
] + [f"리뷰 {i}번: 배우들의 연기가 {'좋았다' if i % 2 else '아쉬웠다'}." for i in range(60)]


def _byte_bpe(texts, vocab_size, path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<|endoftext|>", "<|tel|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tok = _byte_bpe(DOCS, 400, root / "tok")
    half = len(DOCS) // 2
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS[:half])
    )
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS[half:])
    return root, tok


def _read_documents(directory):
    """Documents (token lists with eos) by reading every record in order, split at the starts."""
    stream, starts = [], []
    offset = 0
    for path in shard_files(directory):
        reader = ArrayRecordReader(path)
        assert reader.writer_options_string().startswith("group_size:1,")
        for record in reader.read_all():
            tokens, doc_starts = decode_record(record)
            stream.extend(tokens.tolist())
            starts.extend((doc_starts.astype(np.int64) + offset).tolist())
            offset += tokens.size
        reader.close()
    bounds = [*starts, len(stream)]
    assert bounds[0] == 0
    return [stream[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_block_boundaries_layout():
    rng = np.random.default_rng(0)
    for block in (1, 7, 32):
        lengths = rng.integers(1, 3 * block, size=300).tolist()
        bounds = block_boundaries(lengths, block).tolist()
        doc_starts = np.cumsum([0, *lengths]).tolist()
        assert bounds[0] == 0 and bounds[-1] == sum(lengths)
        sizes = np.diff(bounds)
        assert (sizes > 0).all() and (sizes <= block).all()
        cut = set(bounds)
        for d, n in enumerate(lengths):
            a, b = doc_starts[d], doc_starts[d + 1]
            inner = [x for x in bounds if a < x < b]
            if n <= block:
                assert inner == []  # a document that fits a block is never split
            else:  # a long one starts a record and is cut every block
                assert a in cut and inner == list(range(a + block, b, block))
        # Greedy: a record closes only when the next document does not fit in it.
        for k in range(1, len(bounds) - 1):
            x = bounds[k]
            if x in doc_starts:
                d = doc_starts.index(x)
                record_start = bounds[k - 1]
                assert (x - record_start) + lengths[d] > block or (x - record_start) == block


@pytest.mark.parametrize("num_workers", [1, 2])
def test_tokenize_contents_and_manifest(tmp_path, corpus, num_workers):
    root, tok = corpus
    out = tmp_path / "tokens"
    manifest = tokenize_to_shards(
        root / "tok", [root / "a.jsonl", root / "b.jsonl.gz"], out,
        block_tokens=32, shard_chars=300, num_workers=num_workers, show_progress=False,
    )  # fmt: skip
    eos = tok.token_to_id("<|endoftext|>")
    expected = [tok.encode(t).ids + [eos] for t in DOCS if t]
    assert _read_documents(out) == expected
    assert manifest == read_manifest(out)
    assert manifest["documents"] == len(expected)
    assert manifest["tokens"] == sum(map(len, expected))
    assert manifest["eos_id"] == eos and manifest["token_dtype"] == "uint16"
    assert manifest["skipped"] == {"empty": 1}
    digest = hashlib.sha256((root / "tok" / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["tokenizer_sha256"] == digest
    assert len(manifest["shards"]) > 3
    assert sum(s["documents"] for s in manifest["shards"]) == manifest["documents"]
    assert sum(s["records"] for s in manifest["shards"]) == manifest["records"]
    # <|tel|> stays one id.
    assert tok.token_to_id("<|tel|>") in expected[4]


def test_workers_write_identical_shards(tmp_path, corpus):
    root, _ = corpus
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_to_shards(
            root / "tok", [root / "a.jsonl", root / "b.jsonl.gz"], out,
            block_tokens=32, shard_chars=300, num_workers=workers, show_progress=False,
        )  # fmt: skip
        outs.append({p.name: p.read_bytes() for p in out.glob("*.array_record")})
    assert outs[0] == outs[1]


def test_rerun_skips_finished_shards(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "tokens"
    args = (root / "tok", [root / "a.jsonl", root / "b.jsonl.gz"], out)
    kwargs = dict(block_tokens=32, shard_chars=300, show_progress=False)
    first = tokenize_to_shards(*args, **kwargs)

    def stamps():
        return {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    before = stamps()
    assert tokenize_to_shards(*args, **kwargs) == first
    assert stamps() == before
    # A shard without its stats file (a crash between the two writes) is redone, alone; a
    # temporary file of a dead run is removed.
    os.remove(out / "shard-00001.json")
    (out / "shard-00002.array_record.tmp-999").write_bytes(b"partial")
    assert tokenize_to_shards(*args, **kwargs) == first
    after = stamps()
    changed = {n for n in before if before[n] != after.get(n)}
    assert changed == {"shard-00001.array_record", "shard-00001.json"}
    assert not list(out.glob("*.tmp-*"))
    # Other settings or inputs cannot resume into the same directory.
    with pytest.raises(InputError, match="other settings"):
        tokenize_to_shards(*args, block_tokens=64, shard_chars=300, show_progress=False)
    with pytest.raises(InputError, match="other inputs"):
        tokenize_to_shards(*args, block_tokens=32, shard_chars=200, show_progress=False)


def test_bad_arguments(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(ConfigError, match="block_tokens"):
        tokenize_to_shards(root / "tok", [root / "a.jsonl"], tmp_path / "o", block_tokens=0)
    with pytest.raises(InputError, match="no such file"):
        tokenize_to_shards(root / "tok", [tmp_path / "none.jsonl"], tmp_path / "o")
    with pytest.raises(InputError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_uint32_when_the_vocab_needs_it(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)} | {"<|endoftext|>": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "w1 w69999 w65536"}) + "\n")
    manifest = tokenize_to_shards(
        tmp_path / "tok", [tmp_path / "in.jsonl"], tmp_path / "out", show_progress=False
    )
    assert manifest["token_dtype"] == "uint32"
    assert _read_documents(tmp_path / "out") == [[1, 69999, 65536, 70000]]


def test_cli(tmp_path, corpus):
    root, tok = corpus
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-m", "polyglot_jax", "tokenize", f"--tokenizer={root / 'tok'}",
           f"--input={root / 'a.jsonl'},{root / 'b.jsonl.gz'}", f"--output={out}",
           "--num_workers=1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["documents"] == sum(1 for t in DOCS if t)
    bad = subprocess.run(cmd[:5] + [f"--output={out}"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--input is required" in bad.stderr


def test_manifest_records_the_tokenizer_so_it_resolves_from_anywhere(tmp_path, corpus, monkeypatch):
    root, _ = corpus
    work = tmp_path / "work"
    shutil.copytree(root / "tok", work / "tok")
    monkeypatch.chdir(work)
    manifest = tokenize_to_shards(
        "tok", [root / "a.jsonl"], "tokens", block_tokens=32, show_progress=False
    )  # relative paths, as typed on a command line
    assert manifest["tokenizer"] == str(work.resolve() / "tok")
    assert read_manifest(work / "tokens")["tokenizer"] == manifest["tokenizer"]
    monkeypatch.chdir(tmp_path)  # elsewhere
    assert manifest_tokenizer(work / "tokens", manifest["tokenizer"]) == work.resolve() / "tok"
    # Older manifests hold the path as typed: manifest-relative first, then from the cwd.
    assert manifest_tokenizer(work / "tokens", "../tok") == work / "tokens" / ".." / "tok"
    assert manifest_tokenizer(work / "tokens", "work/tok") == pathlib.Path("work/tok")
    (work / "tokens" / "work").mkdir()
    shutil.copytree(root / "tok", work / "tokens" / "work" / "tok")
    assert manifest_tokenizer(work / "tokens", "work/tok") == work / "tokens" / "work" / "tok"
    assert manifest_tokenizer(work / "tokens", "../tok/tokenizer.json") == (
        work / "tokens" / ".." / "tok" / "tokenizer.json"
    )
    assert manifest_tokenizer(work / "tokens", "nowhere") is None
    assert manifest_tokenizer(work / "tokens", "../tokens") is None  # a directory, no tokenizer
    assert manifest_tokenizer(work / "tokens", None) is None


def test_convert_finds_the_manifest_tokenizer_from_another_directory(tmp_path, corpus, monkeypatch):
    import ml_collections
    from absl import logging as absl_logging

    from polyglot_jax.workdir import run_tokenizer

    root, _ = corpus
    work = tmp_path / "work"
    shutil.copytree(root / "tok", work / "tok")
    monkeypatch.chdir(work)
    tokenize_to_shards("tok", [root / "a.jsonl"], "tokens", block_tokens=32, show_progress=False)
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict({"data": {"shards": ("work/tokens",), "tokenizer": ""}})
    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
    assert run_tokenizer(config, tmp_path / "run") == work.resolve() / "tok"
    # An older manifest with the path as typed in `work/`: found relative to the manifest.
    path = work / "tokens" / MANIFEST
    old = json.loads(path.read_text())
    path.write_text(json.dumps(old | {"tokenizer": "../tok/tokenizer.json"}))
    assert run_tokenizer(config, tmp_path / "run").resolve() == work.resolve() / "tok"
    assert warnings == []
    # A tokenizer that is gone: no tokenizer, and a warning that says which and where looked.
    path.write_text(json.dumps(old | {"tokenizer": "gone/tok"}))
    assert run_tokenizer(config, tmp_path / "run") is None
    assert len(warnings) == 1
    assert (
        "work/tokens/manifest.json" in warnings[0]
        and "'gone/tok'" in warnings[0]
        and "no tokenizer" in warnings[0]
    )
