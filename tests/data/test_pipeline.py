"""grain pipeline: shuffling and shares, concat and packed rows, checkpoints, epochs, mixtures,
global batches (one and two processes), the built-in sample, and an NSMC run end to end."""

import dataclasses
import gzip
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polyglot_jax.data.batch import LocalBatch
from polyglot_jax.data.pipeline import default_data_config, make_pipeline
from polyglot_jax.data.record_stream import Corpus, record_stream
from polyglot_jax.data.records import FORMAT, decode_record, read_manifest, shard_name
from polyglot_jax.data.sample import (
    builtin_corpus_texts,
    konlpy_corpus_files,
    nsmc_path,
    prepare_builtin_sample,
)
from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.data.tokenize import write_manifest, write_shard
from polyglot_jax.data.tokenizer import load_tokenizer
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.train import make_global_batch

EOS = 1
SPAN = 1000  # token = 2 + doc * SPAN + position: every token says which document and where


def write_corpus(directory, lengths, *, first_doc=0, block_tokens=64, docs_per_shard=40):
    """A tokenized directory of synthetic documents (ids + EOS); returns the documents."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [
        np.array([2 + (first_doc + d) * SPAN + i for i in range(n)] + [EOS], np.uint32)
        for d, n in enumerate(lengths)
    ]
    shards = []
    for k, lo in enumerate(range(0, len(docs), docs_per_shard)):
        part = docs[lo : lo + docs_per_shard]
        tokens = np.concatenate(part)
        records = write_shard(
            directory / shard_name(k), tokens, np.array([d.size for d in part]), block_tokens
        )
        shards.append(
            {
                "file": shard_name(k),
                "documents": len(part),
                "tokens": tokens.size,
                "records": records,
            }
        )
    write_manifest(
        directory,
        {
            "format": FORMAT,
            "tokenizer_sha256": "synthetic",
            "eos_id": EOS,
            "vocab_size": 1 << 30,
            "token_dtype": "uint32",
            "block_tokens": block_tokens,
            "documents": len(docs),
            "tokens": int(sum(s["tokens"] for s in shards)),
            "records": sum(s["records"] for s in shards),
            "shards": shards,
        },
    )
    return docs


def config(*dirs, **overrides):
    c = default_data_config()
    c.shards = tuple(str(d) for d in dirs)
    c.prefetch = 0
    c.update(overrides)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def fields(item):
    """The arrays of a Batch, or of a LocalBatch's batch plus its epoch and epochs, by name (the
    fields a concat batch does not have, None, left out)."""
    batch = item.batch if isinstance(item, LocalBatch) else item
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    out = {k: v for k, v in out.items() if v is not None}
    if isinstance(item, LocalBatch):
        out.update(epoch=item.epoch, epochs=item.epochs)
    return out


def doc_of(tokens):
    return (np.asarray(tokens) - 2) // SPAN


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Short documents (each fits one 64-token record)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("small")
    docs = write_corpus(root, rng.integers(1, 30, size=400).tolist())
    return root, docs


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Documents of all sizes, some longer than a 33-token row and than a 64-token record."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("mixed")
    lengths = np.concatenate([rng.integers(1, 20, 300), rng.integers(20, 150, 60)])
    docs = write_corpus(root, rng.permutation(lengths).tolist())
    return root, docs


def test_record_stream_shuffles_every_epoch(small):
    root, _ = small
    manifest = read_manifest(root)
    total = manifest["records"]
    corpus = Corpus(str(root), manifest, total)
    ds = record_stream([corpus], [1.0], seed=3, shuffle=True)
    epoch0 = [ds[i] for i in range(total)]
    epoch1 = [ds[i] for i in range(total, 2 * total)]
    assert [e[1] for e in epoch0] == list(range(total))  # index within the share: the epoch
    assert sorted(e[2] for e in epoch0) == sorted(e[2] for e in epoch1)
    assert [e[2] for e in epoch0] != [e[2] for e in epoch1]  # reshuffled
    unshuffled = record_stream([corpus], [1.0], seed=3, shuffle=False)
    assert {e[2] for e in epoch0} == {unshuffled[i][2] for i in range(total)}
    assert len({e[2] for e in epoch0}) == total  # every record once per epoch


def test_concat_rows_are_the_token_stream(small):
    root, docs = small
    stream = np.concatenate(docs)
    it = make_pipeline(
        config(root, shuffle=False, shuffle_buffer=16, mode="concat"),
        seq_len=32,
        global_batch_size=8,
        process_index=0,
        process_count=1,
    )
    batches = take(it, 60)  # > 1 epoch: wraps around
    assert set(fields(batches[0])) == {"tokens", "epoch", "epochs"}
    rows = np.concatenate([b.batch.tokens for b in batches])
    assert rows.shape == (480, 33) and rows.dtype == np.int32
    n = rows.size
    assert np.array_equal(rows.ravel(), np.tile(stream, -(-n // stream.size))[:n])


def test_concat_shuffled_rows_are_chunks_of_the_record_stream(small):
    root, _ = small
    manifest = read_manifest(root)
    rows_per_window, row_len = 16, 33
    it = make_pipeline(
        config(root, shuffle=True, shuffle_buffer=rows_per_window, seed=5),
        seq_len=row_len - 1,
        global_batch_size=8,
        process_index=0,
        process_count=1,
    )
    emitted = np.concatenate([b.batch.tokens for b in take(it, 6)])  # 3 windows
    records = record_stream(
        [Corpus(str(root), manifest, manifest["records"])],
        [1.0],
        seed=5,
        shuffle=True,
    )
    stream = np.concatenate([decode_record(records[i][2])[0] for i in range(60)])
    chunks = stream[: 3 * rows_per_window * row_len].reshape(3, rows_per_window, row_len)
    for w in range(3):
        got = emitted[w * rows_per_window : (w + 1) * rows_per_window]
        assert sorted(map(tuple, got)) == sorted(map(tuple, chunks[w]))
    assert not np.array_equal(emitted[:rows_per_window], chunks[0])  # order shuffled


def first_fit_reference(docs, rows, row_len, block_tokens=64):
    """Brute force: pieces of the document stream (documents cut where records cut them, every
    `block_tokens`, then into rows) go into the first row with room; stops at the first piece that
    fits nowhere. Returns the rows as lists of pieces (token arrays)."""
    free = [row_len] * rows
    placed = [[] for _ in range(rows)]
    for doc in docs:
        for b in range(0, doc.size, block_tokens):
            part = doc[b : b + block_tokens]
            for a in range(0, part.size, row_len):
                piece = part[a : a + row_len]
                r = next((i for i in range(rows) if free[i] >= piece.size), None)
                if r is None:
                    return placed
                placed[r].append(piece)
                free[r] -= piece.size
    raise AssertionError("corpus too small for the window")


def check_packed_row(tokens, segment_ids, positions, row_len):
    """Structure of one packed row; returns its pieces (token arrays) in order."""
    n = int((segment_ids != 0).sum())
    assert (segment_ids[:n] != 0).all() and (segment_ids[n:] == 0).all()  # padding only at the end
    assert (tokens[n:] == 0).all() and (positions[n:] == 0).all()
    pieces = []
    start = 0
    for k in range(1, n + 1):
        if k == n or segment_ids[k] != segment_ids[start]:
            seg = tokens[start:k]
            assert segment_ids[start] == len(pieces) + 1
            assert (positions[start:k] == np.arange(k - start)).all()
            body = seg[seg != EOS]
            assert (seg[:-1] != EOS).all()  # eos only closes a document
            assert len(set(doc_of(body))) <= 1 and (np.diff(body) == 1).all()
            pieces.append(seg)
            start = k
    return pieces


def test_packed_rows_match_a_brute_force_first_fit(mixed):
    root, docs = mixed
    rows, row_len = 24, 33
    it = make_pipeline(
        config(root, mode="packed", shuffle=False, shuffle_buffer=rows),
        seq_len=row_len - 1,
        global_batch_size=8,
        process_index=0,
        process_count=1,
    )
    window = take(it, rows // 8)
    tokens = np.concatenate([b.batch.tokens for b in window])
    segs = np.concatenate([b.batch.segment_ids for b in window])
    pos = np.concatenate([b.batch.positions for b in window])
    expected = first_fit_reference(docs, rows, row_len)
    for r in range(rows):
        pieces = check_packed_row(tokens[r], segs[r], pos[r], row_len)
        assert [p.tolist() for p in pieces] == [p.tolist() for p in expected[r]]
    fill = (segs != 0).mean()
    assert fill > 0.9, fill


def test_packed_windows_cover_the_record_stream_exactly_once(mixed):
    root, _ = mixed
    manifest = read_manifest(root)
    rows, row_len = 16, 33
    it = make_pipeline(
        config(root, mode="packed", shuffle=True, shuffle_buffer=rows, seed=1),
        seq_len=row_len - 1,
        global_batch_size=8,
        process_index=0,
        process_count=1,
    )
    emitted = []
    for b in take(it, 8 * rows // 8):  # 8 whole windows
        for r in range(b.batch.tokens.shape[0]):
            pieces = check_packed_row(
                b.batch.tokens[r], b.batch.segment_ids[r], b.batch.positions[r], row_len
            )
            emitted.extend(np.concatenate(pieces).tolist())
    state = it.get_state()  # where the 9th window starts in the record stream
    assert state["row"] == 0
    records = record_stream(
        [Corpus(str(root), manifest, manifest["records"])],
        [1.0],
        seed=1,
        shuffle=True,
    )
    prefix = [decode_record(records[i][2])[0] for i in range(state["record"] + 1)]
    prefix[-1] = prefix[-1][: state["offset"]]
    expected = np.concatenate(prefix).tolist()
    assert sorted(emitted) == sorted(expected)  # every token read exactly once (eos repeats)


@pytest.mark.parametrize("mode", ["concat", "packed"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_restored_state_reproduces_the_next_batches(mixed, mode, prefetch):
    root, _ = mixed
    cfg = config(root, mode=mode, shuffle_buffer=24, prefetch=prefetch, seed=7)
    kwargs = dict(seq_len=32, global_batch_size=8, process_index=0, process_count=1)
    for skip in (3, 5):  # mid-window and at a window boundary (3 batches per window)
        first = make_pipeline(cfg, **kwargs)
        take(first, skip)
        state = first.get_state()
        json.dumps(state)  # plain JSON
        expected = take(first, 7)
        second = make_pipeline(cfg, **kwargs)
        second.set_state(state)
        for want, got in zip(expected, take(second, 7), strict=True):
            want, got = fields(want), fields(got)
            assert want.keys() == got.keys()
            for k in want:
                np.testing.assert_array_equal(want[k], got[k])


def test_orbax_checkpoint_of_the_iterator(tmp_path, mixed):
    root, _ = mixed
    cfg = config(root, mode="packed", shuffle_buffer=16, prefetch=2)
    kwargs = dict(seq_len=32, global_batch_size=8, process_index=0, process_count=1)
    it = make_pipeline(cfg, **kwargs)
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = take(it, 4)
    restored = make_pipeline(cfg, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(
            5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    for want, got in zip(expected, take(restored, 4), strict=True):
        np.testing.assert_array_equal(want.batch.tokens, got.batch.tokens)
        np.testing.assert_array_equal(want.batch.segment_ids, got.batch.segment_ids)


def test_state_of_other_settings_is_refused(small):
    root, _ = small
    it = make_pipeline(config(root), seq_len=32, global_batch_size=8, process_count=1)
    state = it.get_state()
    other = make_pipeline(
        config(root), seq_len=16, global_batch_size=8, process_index=0, process_count=2
    )
    with pytest.raises(ConfigError, match="other data or config"):
        other.set_state(state)
    # The state is global: it resumes any block of the same global batches...
    take(it, 3)
    state, want = it.get_state(), next(it).batch.tokens
    for index, count in ((0, 1), (1, 2), (3, 4)):
        elsewhere = make_pipeline(
            config(root), seq_len=32, global_batch_size=8, process_index=index,
            process_count=count,
        )  # fmt: skip
        elsewhere.set_state(state)
        rows = 8 // count
        np.testing.assert_array_equal(
            next(elsewhere).batch.tokens, want[index * rows : (index + 1) * rows]
        )
    # ...but one saved per process, before it was global, only when one process saved it.
    old = {k: v for k, v in state.items()} | {"version": 1, "process_index": 0}
    for count, fits in ((1, True), (2, False)):
        fresh = make_pipeline(config(root), seq_len=32, global_batch_size=8, process_count=1)
        if fits:
            fresh.set_state(old | {"process_count": count})
            np.testing.assert_array_equal(next(fresh).batch.tokens, want)
        else:
            with pytest.raises(ConfigError, match="saved by process 0 of 2 before"):
                fresh.set_state(old | {"process_count": count})


def test_epoch_tracks_the_tokens_read(small):
    root, _ = small
    manifest = read_manifest(root)
    rows, row_len, batch = 16, 33, 8
    it = make_pipeline(
        config(root, shuffle=False, shuffle_buffer=rows),
        seq_len=row_len - 1,
        global_batch_size=batch,
        process_index=0,
        process_count=1,
    )
    epochs = [float(b.epoch) for b in take(it, 100)]
    assert all(b >= a for a, b in zip(epochs, epochs[1:], strict=False))
    window_tokens = rows * row_len
    mean_record = manifest["tokens"] / manifest["records"]
    for step, epoch in enumerate(epochs, 1):
        read = step * batch * row_len / manifest["tokens"]
        # exact at window ends; in between, interpolated within one window (+ a started record)
        assert abs(epoch - read) <= (window_tokens + mean_record) / manifest["tokens"]
    assert epochs[-1] > 1.5


def test_weighted_mixture(tmp_path):
    rng = np.random.default_rng(2)
    a = write_corpus(tmp_path / "a", rng.integers(1, 40, 600).tolist(), block_tokens=64)
    b = write_corpus(
        tmp_path / "b", rng.integers(1, 40, 600).tolist(), first_doc=10_000, block_tokens=200
    )
    assert a and b
    it = make_pipeline(
        config(tmp_path / "a", tmp_path / "b", weights=(3.0, 1.0)),
        seq_len=63,
        global_batch_size=16,
        process_index=0,
        process_count=1,
    )
    batches = take(it, 40)
    tokens = np.concatenate([x.batch.tokens.ravel() for x in batches])
    body = tokens[tokens != EOS]
    share_a = (doc_of(body) < 10_000).mean()
    assert abs(share_a - 0.75) < 0.03, share_a
    epochs = batches[-1].epochs
    assert epochs.shape == (2,) and batches[-1].epoch == epochs.max()
    with pytest.raises(ConfigError, match="weights has 1 entries for 2"):
        make_pipeline(config(tmp_path / "a", tmp_path / "b", weights=(1.0,)), seq_len=8,
                      global_batch_size=8, process_index=0, process_count=1)  # fmt: skip


@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_blocks_of_processes_are_the_one_global_batch(small, mode):
    """Any number of processes yields, block by block, exactly the batches of one process, with
    the same epochs: the global batch of step s does not depend on the process count."""
    root, docs = small
    cfg = config(root, mode=mode, shuffle=True, shuffle_buffer=24)
    alone = take(make_pipeline(cfg, seq_len=32, global_batch_size=16, process_count=1), 12)
    for count in (2, 4, 8):
        blocks = [
            take(
                make_pipeline(
                    cfg, seq_len=32, global_batch_size=16, process_index=i, process_count=count
                ),
                12,
            )  # fmt: skip
            for i in range(count)
        ]
        for step, whole in enumerate(alone):
            parts = [b[step] for b in blocks]
            for name, value in fields(whole.batch).items():
                got = np.concatenate([fields(part.batch)[name] for part in parts])
                np.testing.assert_array_equal(got, value, err_msg=f"{name} step {step}")
            for part in parts:
                np.testing.assert_array_equal(part.epochs, whole.epochs)


def test_bad_configs(small):
    root, _ = small
    with pytest.raises(ConfigError, match="mode"):
        make_pipeline(config(root, mode="nope"), seq_len=8, global_batch_size=8)
    with pytest.raises(ConfigError, match="multiple of the 3"):
        make_pipeline(
            config(root), seq_len=8, global_batch_size=8, process_index=0, process_count=3
        )
    with pytest.raises(ConfigError, match="empty"):
        make_pipeline(config(), seq_len=8, global_batch_size=8)


def test_global_batch_on_a_mesh(small):
    root, _ = small
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    it = make_pipeline(config(root, mode="packed"), seq_len=16, global_batch_size=16)
    local = next(it).batch
    arrays = fields(make_global_batch(local, sharding))
    assert set(arrays) == {"tokens", "segment_ids", "positions"}
    for k, v in arrays.items():
        assert v.shape == (16, 17) and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), fields(local)[k])
        assert len({s.data.shape for s in v.addressable_shards}) == 1  # 2 rows per device


@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_loss_mask_counts_the_predictions_inside_a_piece(mixed, mode):
    """Concat rows: every next-token prediction counts. Packed rows: one from token t counts when
    t + 1 is in the same piece (none into the next piece, none on padding)."""
    root, _ = mixed
    row_len = 33
    it = make_pipeline(config(root, mode=mode, shuffle_buffer=16), seq_len=row_len - 1,
                       global_batch_size=8, process_index=0, process_count=1)  # fmt: skip
    for local in take(it, 4):
        b = local.batch
        assert b.loss_mask.shape == (8, row_len - 1) and b.loss_mask.dtype == bool
        inputs, positions, segment_ids = b.model_inputs()
        np.testing.assert_array_equal(inputs, b.tokens[:, :-1])
        np.testing.assert_array_equal(b.targets, b.tokens[:, 1:])
        if mode == "concat":
            assert b.loss_mask.all() and positions is None and segment_ids is None
            continue
        np.testing.assert_array_equal(positions, b.positions[:, :-1])
        np.testing.assert_array_equal(segment_ids, b.segment_ids[:, :-1])
        for r in range(8):
            pieces = check_packed_row(b.tokens[r], b.segment_ids[r], b.positions[r], row_len)
            same_piece_next = [[True] * (len(p) - 1) + [False] for p in pieces]
            padding = [False] * (row_len - sum(map(len, pieces)))
            want = np.array(sum(same_piece_next, []) + padding)[:-1]
            np.testing.assert_array_equal(b.loss_mask[r], want)


WORKER = textwrap.dedent(
    """
    import sys, numpy as np, jax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from polyglot_jax.data.pipeline import default_data_config, make_pipeline
    from polyglot_jax.train import make_global_batch
    port, pid, root, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    c = default_data_config(); c.shards = (root,); c.mode = "packed"; c.prefetch = 0
    it = make_pipeline(c, seq_len=16, global_batch_size=16)
    local = next(it).batch
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    arrays = make_global_batch(local, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    gathered = multihost_utils.process_allgather(arrays.tokens, tiled=True)
    np.savez(out, local=local.tokens, gathered=gathered, n=jax.process_count())
    """
)


def test_two_processes_build_one_global_batch(small, tmp_path):
    root, _ = small
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(port),
                str(i),
                str(root),
                str(tmp_path / f"{i}.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    results = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    assert int(results[0]["n"]) == 2
    both = np.concatenate([r["local"] for r in results])
    for r in results:
        np.testing.assert_array_equal(r["gathered"], both)
    # The two blocks are the global batch that a single process computes.
    alone = make_pipeline(
        config(root, mode="packed"), seq_len=16, global_batch_size=16, process_count=1
    )
    np.testing.assert_array_equal(next(alone).batch.tokens, both)


def test_builtin_corpus_texts():
    texts = list(builtin_corpus_texts(nsmc_limit=0))
    assert len(texts) == len(konlpy_corpus_files()) == 11
    assert any(t.startswith("대한민국헌법") for t in texts)
    assert all(t == t.strip() and t for t in texts)
    if nsmc_path() is not None:
        with_reviews = list(builtin_corpus_texts(nsmc_limit=25))
        assert with_reviews[:11] == texts and len(with_reviews) == 36


def test_prepare_builtin_sample_once(tmp_path):
    tokens = prepare_builtin_sample(tmp_path, nsmc_limit=200, vocab_size=600)
    manifest = read_manifest(tokens)
    assert manifest["documents"] == 11 + (200 if nsmc_path() is not None else 0)
    assert load_tokenizer(tokens.parent / "tokenizer").sha256 == manifest["tokenizer_sha256"]
    stamps = {p: p.stat().st_mtime_ns for p in tokens.parent.rglob("*")}
    assert prepare_builtin_sample(tmp_path, nsmc_limit=200, vocab_size=600) == tokens
    assert {p: p.stat().st_mtime_ns for p in tokens.parent.rglob("*")} == stamps


def test_builtin_default_feeds_the_pipeline():
    """The default data config (what configs/tiny.py uses): prepared in the shared cache once."""
    it = make_pipeline(default_data_config(), seq_len=64, global_batch_size=8, process_index=0,
                       process_count=1)  # fmt: skip
    batch = next(it)
    tok = load_tokenizer(prepare_builtin_sample().parent / "tokenizer")
    assert batch.batch.tokens.shape == (8, 65) and batch.batch.tokens.max() < tok.vocab_size
    # Without the NSMC reviews beside the repo the sample is too small to fill all 4,096 ids.
    assert tok.vocab_size == 4096 if nsmc_path() else tok.vocab_size <= 4096


def _cli(*args):
    run = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_nsmc_clean_train_tokenizer_tokenize_pipeline(shared_data, tmp_path):
    with gzip.open(shared_data / "nsmc" / "reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        (tmp_path / "nsmc.jsonl").write_text("".join(itertools.islice(f, 3000)), encoding="utf-8")
    _cli("clean", f"--input={tmp_path / 'nsmc.jsonl'}", f"--output={tmp_path / 'clean'}")
    _cli("train-tokenizer", f"--input={tmp_path / 'clean'}", "--vocab_size=1000",
         f"--output={tmp_path / 'tok'}", "--num_workers=1")  # fmt: skip
    _cli("tokenize", f"--tokenizer={tmp_path / 'tok'}", f"--input={tmp_path / 'clean'}",
         f"--output={tmp_path / 'tokens'}", "--num_workers=1")  # fmt: skip
    cleaned = {t for f in list_input_files([tmp_path / "clean"]) for t in iter_texts(f)}
    manifest = read_manifest(tmp_path / "tokens")
    assert manifest["documents"] == len(cleaned) > 2000
    tok = load_tokenizer(tmp_path / "tok")
    # Rows longer than any review: every packed segment is one whole cleaned document + eos.
    it = make_pipeline(config(tmp_path / "tokens", mode="packed"), seq_len=511,
                       global_batch_size=8, process_index=0, process_count=1)  # fmt: skip
    segments = 0
    for batch in take(it, 3):
        for tokens, segs in zip(batch.batch.tokens, batch.batch.segment_ids, strict=True):
            for s in range(1, segs.max() + 1):
                seg = tokens[segs == s]
                assert seg[-1] == tok.eos_id and tok.eos_id not in seg[:-1]
                assert tok.decode(seg[:-1]) in cleaned
                segments += 1
    assert segments > 100


# ------------------------------------------------------------------ exact epochs, damaged shards


def write_unique_corpus(directory, lengths, *, first_id, block_tokens):
    """A tokenized directory whose tokens are all distinct (first_id, first_id + 1, ...): every
    emitted token says which record it came from. Returns the records as stored on disk."""
    tokens = np.arange(first_id, first_id + sum(lengths), dtype=np.uint32)
    directory.mkdir(parents=True, exist_ok=True)
    records = write_shard(directory / shard_name(0), tokens, np.array(lengths), block_tokens)
    shard = {"file": shard_name(0), "documents": len(lengths), "tokens": tokens.size}
    write_manifest(
        directory,
        {"format": FORMAT, "tokenizer_sha256": "synthetic", "eos_id": 0, "vocab_size": 1 << 30,
         "token_dtype": "uint32", "block_tokens": block_tokens, "documents": len(lengths),
         "tokens": tokens.size, "records": records, "shards": [shard | {"records": records}]},
    )  # fmt: skip
    reader = ArrayRecordReader(str(directory / shard_name(0)))
    stored = [decode_record(r)[0] for r in reader.read_all()]
    reader.close()
    return stored


class RecordsUsed:
    """Brute force: per corpus, records whose tokens were emitted, a partly emitted one by the
    fraction of its tokens emitted (so a record read but not placed counts nothing)."""

    def __init__(self, corpora):
        self.corpus, self.record, sizes = {}, {}, []
        for c, records in enumerate(corpora):
            for record in records:
                for t in record.tolist():
                    self.corpus[t], self.record[t] = c, len(sizes)
                sizes.append(record.size)
        self.sizes = np.array(sizes)
        self.counts = np.zeros(len(sizes))
        self.of = np.array([c for c, records in enumerate(corpora) for _ in records])
        self.num_corpora = len(corpora)

    def add(self, tokens):
        for t in tokens[tokens != 0].tolist():  # 0: packing's padding, never a corpus token
            self.counts[self.record[t]] += 1

    def used(self):
        fractions = self.counts / self.sizes
        return np.array([fractions[self.of == c].sum() for c in range(self.num_corpora)])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_a_window_of_one_epoch_reports_exactly_one_epoch(tmp_path, mode, shuffle):
    # 16 documents of 33 tokens, two per record: one 16 x 33 window is exactly the corpus, in
    # both modes (each document fills a row when packed).
    records = write_unique_corpus(tmp_path / "c", [33] * 16, first_id=1, block_tokens=66)
    assert len(records) == 8
    cfg = config(tmp_path / "c", mode=mode, shuffle=shuffle, shuffle_buffer=16, seed=3)
    kwargs = dict(seq_len=32, global_batch_size=8, process_index=0, process_count=1)
    it = make_pipeline(cfg, **kwargs)
    batches = take(it, 4)  # two windows
    window = np.concatenate([b.batch.tokens for b in batches[:2]])
    assert sorted(window.ravel().tolist()) == list(range(1, 16 * 33 + 1))  # one whole epoch
    epochs = [float(b.epoch) for b in batches]
    assert epochs[1] == 1.0 and epochs[3] == 2.0  # exact, not one record ahead (9/8)
    assert 0.0 < epochs[0] < 1.0 < epochs[2] < 2.0
    # Restored mid-window and at the window's end, the epochs stay exact; a state saved before
    # this fix counted the record read but not placed (consumed + 1): it restores the same.
    for skip in (1, 2):
        first = make_pipeline(cfg, **kwargs)
        take(first, skip)
        state = first.get_state()
        before_fix = dict(state, consumed=[c + 1 for c in state["consumed"]])
        for saved in (state, before_fix):
            restored = make_pipeline(cfg, **kwargs)
            restored.set_state(saved)
            assert [float(b.epoch) for b in take(restored, 4 - skip)] == epochs[skip:]


@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_epochs_at_window_ends_count_the_tokens_placed(tmp_path, mode):
    rng = np.random.default_rng(4)
    a = write_unique_corpus(
        tmp_path / "a", rng.integers(1, 150, 120).tolist(), first_id=1, block_tokens=64
    )
    b = write_unique_corpus(
        tmp_path / "b", rng.integers(1, 60, 150).tolist(), first_id=100_000, block_tokens=200
    )
    shares = np.array([len(a), len(b)])
    # One batch per window, so every batch ends a window and its epochs are exact.
    cfg = config(tmp_path / "a", tmp_path / "b", mode=mode, weights=(3.0, 1.0), shuffle_buffer=8)
    kwargs = dict(seq_len=32, global_batch_size=16, process_index=0, process_count=1)
    it = make_pipeline(cfg, **kwargs)
    # A process's block reports the same (global) epochs.
    block = make_pipeline(cfg, seq_len=32, global_batch_size=16, process_index=1, process_count=2)
    reference = RecordsUsed([a, b])
    fractional = 0
    for step in range(1, 200):
        if step == 60:  # and across a checkpoint of the iterator
            state = it.get_state()
            it = make_pipeline(cfg, **kwargs)
            it.set_state(state)
        batch = next(it)
        reference.add(batch.batch.tokens.ravel())
        want = reference.used() / shares
        np.testing.assert_allclose(batch.epochs, want, rtol=1e-12, atol=0)
        assert batch.epoch == batch.epochs.max()
        np.testing.assert_array_equal(next(block).epochs, batch.epochs)
        fractional += bool(np.any(np.abs(want * shares - np.round(want * shares)) > 1e-9))
    assert batch.epoch > 2.0
    assert fractional > 100  # most windows end inside a record


def copy_corpus(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_truncated_shard_is_named_when_the_pipeline_is_built(small, tmp_path):
    root, _ = small
    manifest = read_manifest(root)
    assert len(manifest["shards"]) > 2
    broken = copy_corpus(root, tmp_path / "tokens")
    shard = broken / shard_name(1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    docs = manifest["shards"][0]["documents"], manifest["shards"][1]["documents"]
    n = manifest["shards"][1]["records"]
    with pytest.raises(InputError) as e:
        make_pipeline(config(broken), seq_len=32, global_batch_size=8, process_index=0,
                      process_count=1)  # fmt: skip
    message = str(e.value)
    assert message.startswith(f"{shard}: truncated or damaged ArrayRecord shard")
    assert f"none of its {n} records (documents {docs[0]}-{docs[0] + docs[1] - 1} of" in message
    assert "delete it and shard-00001.json" in message
    # A shard holding fewer records than manifest.json lists: the missing ones are named.
    kept = 3
    reader = ArrayRecordReader(str(root / shard_name(1)))
    head = reader.read(list(range(kept)))
    reader.close()
    shard.unlink()
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for record in head:
        writer.write(record)
    writer.close()
    with pytest.raises(InputError, match=rf"holds {kept} records but manifest.json lists {n}, so "
                       rf"records from index {kept} on"):  # fmt: skip
        make_pipeline(config(broken), seq_len=32, global_batch_size=8, process_index=0,
                      process_count=1)  # fmt: skip


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_damaged_record_is_named_when_it_is_read(small, tmp_path, prefetch):
    root, _ = small
    broken = copy_corpus(root, tmp_path / "tokens")
    shard = broken / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[1000:1008] = b"\xff" * 8  # inside a record's chunk; the index at the end is intact
    shard.write_bytes(bytes(data))
    reader = ArrayRecordReader(str(shard))
    assert reader.ok() and reader.num_records() == read_manifest(root)["shards"][0]["records"]
    bad = []
    for i in range(reader.num_records()):  # brute force: which records can no longer be read
        try:
            reader.read([i])
        except RuntimeError:
            bad.append(i)
    assert bad
    it = make_pipeline(  # built fine: the damage is only found by reading that record
        config(broken, shuffle=False, prefetch=prefetch), seq_len=32, global_batch_size=8,
        process_index=0, process_count=1,
    )  # fmt: skip
    with pytest.raises(
        InputError, match=rf"{shard_name(0)}: record {bad[0]} of \d+ cannot be read"
    ):
        for _ in range(200):  # unshuffled: records in order, so the first damaged one is hit
            next(it)
