"""`polyglot-jax preprocess` (datatrove stages) against the local `clean` + `tokenize`.

Equality, not resemblance: on the same inputs the distributed path (LocalPipelineExecutor, 1 task
and several tasks on 2 workers, input files split into interleaved parts) must keep the same
documents in the same order with the same texts (PII masks, newlines), count every rule the same,
and write token shards byte for byte those of local `tokenize` on local `clean`'s output (so the
manifest counts are equal and `make_pipeline` reads the same batches). Duplicates planted across
different input files are removed by both. A failed task, or one whose completion marker and files
are deleted, is redone alone on the next run with the same final output. Slurm: the job arrays
it submits (a fake sbatch) and those jobs run here from their pickles.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polyglot_jax.data.clean import CleanConfig, clean_files
from polyglot_jax.data.dedup import MinHasher, NearDuplicateIndex, exact_key
from polyglot_jax.data.engine import STAGES, preprocess, steps_dedup
from polyglot_jax.data.engine.merge import Records, bisect, key_range, merged
from polyglot_jax.data.records import read_manifest
from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.data.tokenize import tokenize_to_shards
from polyglot_jax.errors import InputError

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARD_CHARS = 3000
BLOCK_TOKENS = 64

# ---------------------------------------------------------------------------- the corpus ---


def _korean(rng: np.random.Generator, chars: int) -> str:
    words, left = [], chars
    while left > 0:
        n = min(left, int(rng.integers(2, 6)))
        words.append("".join(chr(c) for c in rng.integers(0xAC00, 0xD7A4, n)))
        left -= n
    return " ".join(words)


LONG = _korean(np.random.default_rng(7), 240)  # its near copy differs in 2 syllables
NEAR = LONG[:60] + "가나" + LONG[62:]
EXACT = "오늘 본 영화는 정말 최고였습니다 배우들의 연기가 훌륭했어요"
EXACT_COPY = "오늘  본 영화는  정말 최고였습니다\t배우들의 연기가 훌륭했어요  "  # same exact key
CHAIN = _korean(np.random.default_rng(8), 200)
CHAIN_NEAR = CHAIN[:100] + "다" + CHAIN[101:]  # near copy of CHAIN ...
PII = "문의는 010-1234-5678 로, 주민번호 900101-1234567 계좌는 신한 110-123-456789 입니다"
PARAGRAPHS = "첫 문단 첫 줄\n첫 문단 둘째 줄\n\n\n\n둘째 문단 \n\n셋째 문단의 줄"
HTML = "<p>제목:  오늘의   영화</p>\n<p>정말 &amp; 재밌었어요 ㅋㅋㅋㅋㅋㅋㅋ!!!!!!</p>"
CODE = "<div class='x'><script>var a = 1; function f(){ return a; }</script></div>" * 3
SPECIAL = [EXACT, PII, PARAGRAPHS, HTML, CODE, LONG, CHAIN, "짧음", "   ", "ㅋ" * 40]


def _write_corpus(root: pathlib.Path) -> list[pathlib.Path]:
    """Three files: a.jsonl (specials, 2,500 filler reviews, two bad records), b.txt (the exact
    and a chain's near copy, blank-line separated), c.jsonl.gz (near copies, filler)."""
    rng = np.random.default_rng(0)
    filler = [_korean(rng, int(rng.integers(15, 60))) for _ in range(3200)]
    a = [*SPECIAL[:5], *filler[:1200], *SPECIAL[5:], *filler[1200:2500]]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in a]
    lines.insert(7, "{not json")
    lines.insert(900, json.dumps({"title": "no text field"}))
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    b = [filler[2500], EXACT_COPY, CHAIN_NEAR, filler[2501], filler[0]]  # filler[0]: exact dup
    (root / "b.txt").write_text("\n\n".join(b) + "\n", encoding="utf-8")
    c = [NEAR, CHAIN_NEAR, *filler[2502:]]  # CHAIN_NEAR again: an exact dup of a near dup
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in c)
    return [root / "a.jsonl", root / "b.txt", root / "c.jsonl.gz"]


def _byte_bpe(texts: list[str], path: pathlib.Path) -> pathlib.Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<pad>", "<|endoftext|>", "<|acc|>", "<|tel|>", "<|rrn|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def _texts(directory: pathlib.Path) -> list[str]:
    return [t for f in list_input_files([directory]) for t in iter_texts(f)]


def _counts(report: dict) -> dict:
    rules = {
        rule: {k: v for k, v in entry.items() if k != "examples"}
        for rule, entry in report["rules"].items()
    }
    return {
        "documents": report["documents"],
        "bytes": report["bytes"],
        "skipped": report["skipped"]["counts"],
        "bad_files": report["skipped"]["files"],
        "rules": rules,
    }


def _tree(directory: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _assert_same_tokens(local: pathlib.Path, dist: pathlib.Path) -> dict:
    a, b = read_manifest(local), read_manifest(dist)
    for key in ("documents", "tokens", "records", "shards", "skipped", "shard_chars"):
        assert a[key] == b[key], key
    for key in ("format", "tokenizer_sha256", "eos_id", "vocab_size", "token_dtype"):
        assert a[key] == b[key], key
    assert _tree(local) == _tree(dist)  # every shard and its stats, byte for byte
    return b


def _batches(tokens: pathlib.Path, n: int = 6) -> list[np.ndarray]:
    from polyglot_jax.data.pipeline import default_data_config, make_pipeline

    config = default_data_config()
    config.shards = (str(tokens),)
    config.prefetch = 0
    config.shuffle_buffer = 16
    it = make_pipeline(
        config, seq_len=31, global_batch_size=4, seed=3, process_index=0, process_count=1
    )
    return [next(it).batch.tokens for _ in range(n)]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The corpus, a tokenizer, and local clean + tokenize on it (the reference)."""
    root = tmp_path_factory.mktemp("engine")
    inputs = _write_corpus(root)
    tok = _byte_bpe([*SPECIAL, _korean(np.random.default_rng(1), 3000)], root / "tok")
    report = clean_files(inputs, root / "local", CleanConfig())
    tokenize_to_shards(
        tok, [root / "local"], root / "local_tokens",
        block_tokens=BLOCK_TOKENS, shard_chars=SHARD_CHARS, show_progress=False,
    )  # fmt: skip
    return {"root": root, "inputs": inputs, "tok": tok, "report": report}


def _run(fx, out, **kw):
    kw.setdefault("progress", False)
    return preprocess(
        fx["inputs"], out, CleanConfig(), tokenizer=fx["tok"],
        block_tokens=BLOCK_TOKENS, shard_chars=SHARD_CHARS, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------- tests ---


def test_planted_duplicates_are_duplicates_locally():
    """The near copies are near duplicates by local `clean`'s own definition, the exact copy has
    the same key: what the distributed path must find across files."""
    assert exact_key(EXACT) == exact_key(EXACT_COPY)
    hasher = MinHasher()
    for first, copy in ((LONG, NEAR), (CHAIN, CHAIN_NEAR)):
        index = NearDuplicateIndex()
        assert index.add(hasher.signature(first)) and not index.add(hasher.signature(copy))


@pytest.mark.parametrize(("tasks", "workers"), [(1, 1), (5, 2)])
def test_same_documents_masks_counts_and_shards_as_local(tmp_path, synthetic, tasks, workers):
    """5 tasks over 3 files: each file in 2 parts, one rank owning both parts of a file."""
    fx = synthetic
    result = _run(fx, tmp_path / "out", tasks=tasks, workers=workers)
    out = tmp_path / "out"
    if tasks == 5:  # 2 parts per file; a rank owns both parts of one file
        units = json.loads((out / "plan.json").read_text())["units"]
        owners = [(f, r) for f, _, r in units]
        assert len(units) == 6 and len(set(owners)) < len(owners)
    local_texts, dist_texts = _texts(fx["root"] / "local"), _texts(out / "clean")
    assert dist_texts == local_texts
    report = result["report"]
    assert _counts(report) == _counts(fx["report"])
    # What was planted: first copies kept, later copies (in other files) removed, by both.
    for kept in (EXACT, LONG, CHAIN):
        assert dist_texts.count(kept) == 1
    for gone in (NEAR, CHAIN_NEAR, EXACT_COPY.strip()):
        assert gone not in dist_texts
    rules = report["rules"]
    assert rules["exact_dedup"]["dropped"] >= 3 and rules["minhash"]["dropped"] >= 2
    assert "문의는 <|tel|> 로, 주민번호 <|rrn|> 계좌는 신한 <|acc|> 입니다" in dist_texts
    assert "첫 문단 첫 줄\n첫 문단 둘째 줄\n\n둘째 문단\n\n셋째 문단의 줄" in dist_texts
    assert report["skipped"]["counts"] == {"missing_field": 1, "not_json": 1}
    # Tokens: byte for byte local tokenize's on local clean's output; train reads them alike.
    manifest = _assert_same_tokens(fx["root"] / "local_tokens", out / "tokens")
    assert len(manifest["shards"]) > 3
    for a, b in zip(_batches(fx["root"] / "local_tokens"), _batches(out / "tokens"), strict=True):
        np.testing.assert_array_equal(a, b)
    engine = report["engine"]
    assert engine["tasks"] == tasks and engine["tokens"]["tokens"] == manifest["tokens"]
    assert engine["newlines"]["out"] > 0
    assert engine["stages"]["clean"]["tasks"] == tasks
    assert engine["stages"]["write"]["masks_tel"] == 1
    assert not (out / "work").exists()  # removed at the end (--keep_work keeps it)
    assert (out / "logs" / "manifest" / "completions" / "00000").is_file()


@pytest.fixture(scope="module")
def nsmc(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nsmc")
    with gzip.open(shared_data / "nsmc" / "reviews.jsonl.gz", "rb") as f:
        (root / "reviews.jsonl").write_bytes(b"".join(itertools.islice(f, 8000)))
    tok = shared_data / "polyglot-ko-mbbpe-2022"
    report = clean_files([root / "reviews.jsonl"], root / "local", CleanConfig())
    tokenize_to_shards(tok, [root / "local"], root / "local_tokens", shard_chars=60_000,
                       show_progress=False)  # fmt: skip
    return {"root": root, "tok": tok, "report": report}


@pytest.mark.parametrize(("tasks", "workers"), [(1, 1), (2, 2)])
def test_nsmc_reviews_as_local(tmp_path, nsmc, tasks, workers):
    """8,000 real reviews in one file (2 tasks: the file in 2 interleaved parts) with the
    released tokenizer: the same kept reviews, counts and shards as local clean + tokenize."""
    out = tmp_path / "out"
    result = preprocess(
        [nsmc["root"] / "reviews.jsonl"], out, CleanConfig(), tasks=tasks, workers=workers,
        tokenizer=nsmc["tok"], shard_chars=60_000, progress=False,
    )  # fmt: skip
    assert _texts(out / "clean") == _texts(nsmc["root"] / "local")
    assert _counts(result["report"]) == _counts(nsmc["report"])
    assert nsmc["report"]["rules"]["exact_dedup"]["dropped"] > 10
    assert nsmc["report"]["rules"]["minhash"]["dropped"] > 0
    manifest = _assert_same_tokens(nsmc["root"] / "local_tokens", out / "tokens")
    assert manifest["documents"] == nsmc["report"]["documents"]["kept"]


def test_a_failed_task_is_redone_alone(tmp_path, synthetic, monkeypatch):
    """A task that dies (here: filter's rank 1) fails the run; the same call again skips every
    finished task and redoes rank 1 from scratch, over its torn temporary file; the output is
    that of an uninterrupted run."""
    fx = synthetic
    reference = tmp_path / "reference"
    _run(fx, reference, tasks=3, workers=1)
    out = tmp_path / "out"
    original = steps_dedup.KeptDocuments.run

    def dies_on_rank_1(self, data=None, rank=0, world_size=1):
        if rank == 1:
            (pathlib.Path(self.output) / "work" / "kept" / "00001.npy.tmp").write_bytes(b"torn")
            raise RuntimeError("killed")
        yield from original(self, data, rank, world_size)

    monkeypatch.setattr(steps_dedup.KeptDocuments, "run", dies_on_rank_1)
    with pytest.raises(RuntimeError, match="killed"):
        _run(fx, out, tasks=3, workers=1)
    done = sorted(p.name for p in (out / "logs" / "filter" / "completions").iterdir())
    assert done == ["00000"]
    kept0 = out / "work" / "kept" / "00000.npy"
    before = kept0.stat().st_mtime_ns
    clean0 = (out / "work" / "texts" / "00000.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(steps_dedup.KeptDocuments, "run", original)
    result = _run(fx, out, tasks=3, workers=1, keep_work=True)
    assert result["stages_seconds"]["clean"] == 0.0  # every clean task was done before
    assert kept0.stat().st_mtime_ns == before
    assert (out / "work" / "texts" / "00000.jsonl").stat().st_mtime_ns == clean0
    assert not list(out.rglob("*.tmp"))
    assert _texts(out / "clean") == _texts(reference / "clean")
    assert _tree(out / "tokens") == _tree(reference / "tokens")
    # Delete one clean task's completion marker and files: only it runs again, identically.
    texts1 = out / "work" / "texts" / "00001.jsonl"
    digest = hashlib.sha256(texts1.read_bytes()).hexdigest()
    (out / "logs" / "clean" / "completions" / "00001").unlink()
    texts1.unlink()
    (out / "work" / "docs" / "00001.npy").unlink()
    _run(fx, out, tasks=3, workers=1, keep_work=True)
    assert hashlib.sha256(texts1.read_bytes()).hexdigest() == digest
    assert (out / "work" / "texts" / "00000.jsonl").stat().st_mtime_ns == clean0
    assert sorted(p.name for p in (out / "logs" / "clean" / "completions").iterdir()) == [
        "00000",
        "00001",
        "00002",
    ]


def test_another_plan_on_the_same_output_is_refused(tmp_path, synthetic):
    fx = synthetic
    out = tmp_path / "out"
    _run(fx, out, tasks=2, workers=1, stop_after="clean")
    before = _tree(out)
    with pytest.raises(InputError, match="'clean'"):
        preprocess(fx["inputs"], out, CleanConfig(min_chars=30), tasks=2, progress=False,
                   tokenizer=fx["tok"], block_tokens=BLOCK_TOKENS, shard_chars=SHARD_CHARS)  # fmt: skip
    with pytest.raises(InputError, match="'tasks'"):
        _run(fx, out, tasks=3)
    assert _tree(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        _run(fx, tmp_path / "other", tasks=1)


def test_merge_keeps_order_and_key_runs(tmp_path):
    rng = np.random.default_rng(0)
    dtype = np.dtype([("h", "<u8"), ("gid", "<u8")])
    arrays = []
    for s in range(4):
        rows = np.empty(3000, dtype)
        rows["h"] = rng.integers(0, 50, 3000)  # many long runs of one key across streams
        rows["gid"] = np.arange(3000) * 4 + s
        arrays.append(rows[np.lexsort((rows["gid"], rows["h"]))])
        np.save(tmp_path / f"{s}.npy", arrays[-1])
    streams = [Records(tmp_path / f"{s}.npy") for s in range(4)]
    batches = list(merged(streams, "h", ("h", "gid"), chunk=100))
    joined = np.concatenate(batches)
    full = np.concatenate(arrays)
    np.testing.assert_array_equal(joined, full[np.lexsort((full["gid"], full["h"]))])
    keys = [set(b["h"].tolist()) for b in batches]
    assert all(not (a & b) for a, b in itertools.combinations(keys, 2))
    # `rows` (preprocess's merge_rows) bounds a round across all streams: 1024 from each of 4.
    bounded = list(merged(streams, "h", ("h", "gid"), rows=4096))
    assert len(bounded) > 1 and max(map(len, bounded)) <= 4096
    np.testing.assert_array_equal(np.concatenate(bounded), joined)
    column = arrays[0]["h"]
    for value in (0, 1, 7, 49, 50, 10**6):
        for side in ("left", "right"):
            assert bisect(column, value, side) == np.searchsorted(column, value, side)


def test_records_restrict_and_read_match_numpy(tmp_path):
    """A key range of a record file (bisected with single-row reads) and its rows = numpy's
    searchsorted and slicing of the same array; a truncated or missing file is one clear error."""
    rng = np.random.default_rng(1)
    rows = np.zeros(5000, [("hi", "<u8"), ("lo", "<u8"), ("gid", "<u8")])
    rows["hi"] = np.sort(rng.integers(0, 2**64, 5000, dtype=np.uint64, endpoint=False))
    rows["gid"] = rng.permutation(5000)
    np.save(tmp_path / "r.npy", rows)
    records = Records(tmp_path / "r.npy")
    assert len(records) == 5000
    for task in range(7):
        lo, hi = key_range(task, 7)
        part = records.restrict("hi", lo, hi)
        first = np.searchsorted(rows["hi"], np.uint64(lo))
        last = 5000 if hi >= 2**64 else np.searchsorted(rows["hi"], np.uint64(hi))
        np.testing.assert_array_equal(part.read(), rows[first:last])
        np.testing.assert_array_equal(part.read(3, 10), rows[first + 3 : first + 10])
    with pytest.raises(ValueError, match="a=-1"):  # would read the row before the range
        records.restrict("hi", *key_range(3, 7)).read(-1)
    data = (tmp_path / "r.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-24])
    with pytest.raises(InputError, match="short.npy: shorter than its header says"):
        Records(tmp_path / "short.npy").read(4990)
    with pytest.raises(InputError, match="gone.npy: missing"):
        Records(tmp_path / "gone.npy")


def _fake_slurm(tmp_path: pathlib.Path) -> pathlib.Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/usr/bin/env bash\n"
        'n=$(find "$FAKE_SBATCH_DIR" -name "*.txt" | wc -l)\n'
        'id=$((1000 + n))\n'
        '{ printf "%s\\n" "$@"; echo ---; cat "${@: -1}"; } > "$FAKE_SBATCH_DIR/$id.txt"\n'
        'echo "Submitted batch job $id"\n'
    )  # fmt: skip
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_slurm_job_arrays_and_their_jobs(tmp_path, synthetic, monkeypatch):
    """--executor=slurm submits one job array per stage, each after the previous one (afterok);
    running those jobs' pickled executors here, rank by rank, gives the local output."""
    import dill

    fx = synthetic
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_DIR", str(jobs))
    out = tmp_path / "out"
    from polyglot_jax.data.engine import SlurmOptions

    slurm = SlurmOptions(partition="cpu", time="1:00:00", tasks_per_job=50)
    result = _run(fx, out, tasks=2, executor="slurm", slurm=slurm)
    assert result["submitted"] == list(STAGES)
    scripts = sorted(jobs.glob("*.txt"), key=lambda p: int(p.stem))
    assert len(scripts) == 2 * len(STAGES)  # each stage and its merge_stats job
    stage_scripts = [p.read_text() for p in scripts[::2]]
    for i, (stage, text) in enumerate(zip(STAGES, stage_scripts, strict=True)):
        assert f"--job-name=polyglot-preprocess-{stage}" in text
        assert "--partition=cpu" in text and "launch_pickled_pipeline" in text
        if i:
            assert f"--dependency=afterok:{1000 + 2 * (i - 1)}" in text
    assert "--mem-per-cpu=64G" in stage_scripts[STAGES.index("clusters")]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    for stage in STAGES:  # what each array job runs: its pickle, its ranks
        with open(out / "logs" / stage / "executor.pik", "rb") as f:
            dill.load(f).run()
    assert _texts(out / "clean") == _texts(fx["root"] / "local")
    _assert_same_tokens(fx["root"] / "local_tokens", out / "tokens")


def _cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "preprocess", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


def test_cli(tmp_path, synthetic):
    fx = synthetic
    inputs = ",".join(map(str, fx["inputs"]))
    bad = _cli(f"--input={tmp_path}/nope.jsonl", f"--output={tmp_path}/o", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "nope.jsonl" in bad.stderr and not (tmp_path / "o").exists()
    bad = _cli(f"--input={inputs}", f"--output={tmp_path}/o", "--executor=slurm", cwd=tmp_path)
    assert bad.returncode == 2 and "--tasks" in bad.stderr and not (tmp_path / "o").exists()
    ok = _cli(
        f"--input={inputs}", f"--output={tmp_path}/o", "--workers=2", "--tasks=2",
        f"--tokenizer={fx['tok']}", f"--shard_chars={SHARD_CHARS}", f"--block_tokens={BLOCK_TOKENS}",
        cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "preprocess: [9/9] manifest: done" in ok.stderr
    assert "kept" in ok.stdout and "tokens in" in ok.stdout
    assert _texts(tmp_path / "o" / "clean") == _texts(fx["root"] / "local")


def test_union_find_matches_connected_components():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(1)
    n = 2000
    a, b = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    chain = np.arange(400, 900)  # a long path: many hooking rounds
    a, b = np.concatenate([a, chain[:-1]]), np.concatenate([b, chain[1:]])
    parent = np.arange(n)
    for lo in range(0, len(a), 300):  # edge files one at a time, as the clusters stage reads them
        steps_dedup.union_edges(parent, a[lo : lo + 300], b[lo : lo + 300])
    roots = steps_dedup._find_roots(parent)
    _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)))
    # Same partition, and each root is its component's smallest node.
    assert len(set(zip(roots.tolist(), labels.tolist(), strict=True))) == len(set(labels.tolist()))
    for root in np.unique(roots):
        assert root == np.flatnonzero(roots == root).min()


def test_write_tasks_share_one_tokenizer_until_its_file_changes(tmp_path, synthetic):
    """A worker loads the tokenizer once for all its write tasks (tokenizers keeps memory of every
    instance that has encoded), and a changed tokenizer.json is loaded afresh, never stale."""
    from polyglot_jax.data.engine.steps_output import worker_tokenizer

    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((synthetic["tok"] / "tokenizer.json").read_bytes())
    first = worker_tokenizer(str(directory), None)
    assert worker_tokenizer(str(directory), None) is first
    changed = json.loads((directory / "tokenizer.json").read_text())
    changed["added_tokens"].append(
        {"id": first.tokenizer.get_vocab_size(), "content": "<|new|>", "single_word": False,
         "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(changed))
    second = worker_tokenizer(str(directory), None)
    assert second is not first
    assert second.tokenizer.token_to_id("<|new|>") == first.tokenizer.get_vocab_size()
