"""Validation loss during training (`config.eval`): the held-out split, the logged eval loss, and
that evaluating changes nothing about training.

The expectations are built here without the code under test: the hold-out rule is written out
from data/pipeline.py's docstring in plain Python over records read with array_record, the
held-out rows are concatenated / first-fit packed by hand, and the loss is a float64 numpy
cross-entropy of the model's logits under checkpointed parameters.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from test_train_reference import _expected_mask, _tb_scalars
from train_fixtures import tiny_config, tiny_shards

import polyglot_jax.train as trainer
from polyglot_jax import workdir as wd
from polyglot_jax.checkpoint import restore_params
from polyglot_jax.config import validate_run
from polyglot_jax.data.eval_data import make_eval_dataset
from polyglot_jax.data.holdout import document_hashes, held_out, holdout_for
from polyglot_jax.data.pipeline import make_pipeline
from polyglot_jax.data.records import decode_record, read_manifest
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import GPTNeoX
from polyglot_jax.partitioning import make_mesh, rules_from_config

# Seed 5 holds out some documents that span several records (and keeps others), with the sample
# with NSMC reviews and without (a fresh checkout has only konlpy's 11 documents).
FRACTION, SEED = 0.1, 5
STEPS, EVERY, EVAL_BATCHES = 4, 2, 4  # 4 x 16 rows: the first packed window


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """The runs here compile the same steps: JAX's persistent compilation cache (in a directory of
    this module's, switched off again after it) compiles them once. Only a speed-up: without the
    private `reset_cache` the runs just compile again."""
    try:
        from jax._src.compilation_cache import reset_cache
    except ImportError:
        yield
        return
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {key: getattr(jax.config, key) for key in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(keys[1], 0.5)
    reset_cache()  # the cache is looked up once per process: look again
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    reset_cache()


def _config(shards, **overrides):
    """Packed rows (so the eval loss has boundaries and padding to leave out), evaluation after
    steps 2 and 4, checkpoints at the same steps."""
    settings = {
        "data__mode": "packed",
        "train__steps": STEPS,
        "train__checkpoint_every": EVERY,
        "eval__eval_every": EVERY,
        "eval__eval_batches": EVAL_BATCHES,
        "eval__holdout_fraction": FRACTION,
        "eval__holdout_seed": SEED,
        **overrides,
    }
    return tiny_config(shards, **settings)


# --- the documented rule and row building, written out ----------------------------------------

MASK64 = (1 << 64) - 1
MULT = 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _is_held_out(first_piece, fraction: float, seed: int) -> bool:
    h, power = 0, 1
    for t in first_piece:
        h = (h + (int(t) + 1) * power) & MASK64
        power = (power * MULT) & MASK64
    return (_mix64(h ^ _mix64(seed)) >> 11) / 2**53 < fraction


def _corpus(directory: pathlib.Path, fraction: float = FRACTION, seed: int = SEED):
    """(pieces, documents, held): every record's document pieces in stored order as
    (document number, tokens), each document's whole tokens, and which documents are held out."""
    manifest = read_manifest(directory)
    pieces, documents = [], {}
    doc = -1
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(directory / shard["file"]))
        for data in reader.read_all():
            tokens, starts = decode_record(data)
            starts = set(starts.tolist())
            cuts = sorted({0, *starts, tokens.size})
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                if a in starts:
                    doc += 1  # a document starts; a piece before the first start continues
                pieces.append((doc, tokens[a:b]))
                documents.setdefault(doc, []).append(tokens[a:b])
        reader.close()
    documents = {d: np.concatenate(p) for d, p in documents.items()}
    first_piece = {}
    for d, piece in pieces:
        first_piece.setdefault(d, piece)
    held = {d: _is_held_out(p, fraction, seed) for d, p in first_piece.items()}
    return pieces, documents, held


def _concat_rows(pieces, row_len: int) -> np.ndarray:
    """Every whole row of the pieces' stream: disjoint chunks of row_len tokens."""
    stream = np.concatenate([p for _, p in pieces]).astype(np.int32)
    rows = stream.size // row_len
    return stream[: rows * row_len].reshape(rows, row_len)


def _packed_rows(pieces, row_len: int, window_rows: int) -> dict[str, np.ndarray]:
    """Every whole window, first fit: each piece cut into row_len chunks; a chunk goes into the
    first row with room; the window ends at the first chunk that fits nowhere, which starts the
    next window. (The last window, which the stream ends in, is left out.)"""
    chunks = [p[i : i + row_len] for _, p in pieces for i in range(0, p.size, row_len)]
    out = {k: [] for k in ("tokens", "segment_ids", "positions")}
    k = 0
    while True:
        tokens = np.zeros((window_rows, row_len), np.int32)
        segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        used, count = [0] * window_rows, [0] * window_rows
        while k < len(chunks):
            n = chunks[k].size
            row = next((r for r in range(window_rows) if row_len - used[r] >= n), None)
            if row is None:
                break
            at = used[row]
            count[row] += 1
            tokens[row, at : at + n] = chunks[k]
            segments[row, at : at + n] = count[row]
            positions[row, at : at + n] = np.arange(n)
            used[row] += n
            k += 1
        if k == len(chunks):
            return {key: np.concatenate(value) for key, value in out.items()}
        for key, value in zip(out, (tokens, segments, positions), strict=True):
            out[key].append(value)


def _expected_rows(pieces, config) -> dict[str, np.ndarray]:
    """The rows of these pieces in stored order, built as config.data.mode says."""
    t = config.train
    if config.data.mode == "concat":
        return {"tokens": _concat_rows(pieces, t.seq_len + 1)}
    window = -(-max(config.data.shuffle_buffer, t.batch_size) // t.batch_size) * t.batch_size
    return _packed_rows(pieces, t.seq_len + 1, window)


def _read_rows(iterator, rows: int) -> dict[str, np.ndarray]:
    """The first `rows` rows of a pipeline's batches."""
    batches = []
    while sum(b.tokens.shape[0] for b in batches) < rows:
        batches.append(next(iterator).batch)
    fields = (
        ("tokens",) if batches[0].segment_ids is None else ("tokens", "segment_ids", "positions")
    )
    return {k: np.concatenate([getattr(b, k) for b in batches])[:rows] for k in fields}


def _ngrams(rows, n: int = 8) -> set[tuple[int, ...]]:
    grams = set()
    for row in rows:
        row = [int(t) for t in row]
        grams.update(tuple(row[i : i + n]) for i in range(len(row) - n + 1))
    return grams


# --- training runs ----------------------------------------------------------------------------


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


class _Crash(Exception):
    pass


def _run(config, workdir: pathlib.Path, crash_at: int | None = None) -> dict:
    """Trains, capturing the training batches and the held-out rows the trainer reads; with
    `crash_at`, the run dies as that step begins (as a killed process would, after the steps
    before it and their checkpoints)."""
    seen = {"train": [], "eval": []}
    real_step, real_eval = trainer._train_step, trainer._eval_batches

    def train_step(fns, state, local):
        if crash_at is not None and len(seen["train"]) + 1 == crash_at:
            raise _Crash
        seen["train"].append(jax.tree.map(np.copy, local.batch))
        return real_step(fns, state, local)

    def eval_batches(iterator, count):
        batches = real_eval(iterator, count)
        seen["eval"].append(batches)
        return batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_train_step", train_step)
        mp.setattr(trainer, "_eval_batches", eval_batches)
        if crash_at is None:
            trainer.train(config, workdir)
        else:
            with pytest.raises(_Crash):
                trainer.train(config, workdir)
    return seen


@pytest.fixture(scope="module")
def run_on(shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("on")
    seen = _run(_config(shards), workdir)
    return workdir, seen, _records(workdir)


@pytest.fixture(scope="module")
def run_off(shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("off")
    _run(_config(shards, eval__eval_every=0, train__checkpoint_every=100), workdir)
    return _records(workdir)


@pytest.fixture(scope="module")
def run_resumed(shards, tmp_path_factory):
    """The run of `run_on`, killed as step 3 begins (after the evaluation and checkpoint of step
    2), then the same command again."""
    workdir = tmp_path_factory.mktemp("resumed")
    first = _run(_config(shards), workdir, crash_at=EVERY + 1)
    assert wd.finished_steps(workdir / "checkpoints") == [EVERY]
    second = _run(_config(shards), workdir)
    return _records(workdir), first, second


# (1) the logged eval loss, recomputed -----------------------------------------------------------


def test_eval_loss_equals_a_numpy_reference_on_the_held_out_rows(shards, run_on):
    workdir, seen, records = run_on
    config = _config(shards)
    t = config.train
    # The rows: the held-out documents in stored order, first-fit packed (one 64-row window).
    pieces, _, held = _corpus(shards)
    want = _expected_rows([p for p in pieces if held[p[0]]], config)
    rows = {k: v[: EVAL_BATCHES * t.batch_size] for k, v in want.items()}
    assert len(seen["eval"]) == 1  # read once, reused by the second evaluation
    got = seen["eval"][0]
    for key in rows:
        np.testing.assert_array_equal(
            np.concatenate([getattr(b, key) for b in got]), rows[key], err_msg=key
        )
    mask = _expected_mask(rows)
    # Boundaries and padding that must not count (a mask ignored would move the mean far more
    # than the tolerance); how many depends on the sample (NSMC reviews are there or not).
    assert (~mask).sum() >= 10

    run = validate_run(config, jax.device_count())
    mesh, rules = make_mesh(run.mesh_shape), rules_from_config(config.mesh.rules)
    with jax.set_mesh(mesh):
        abstract = trainer.build_step(config, run.model, mesh, rules).abstract_params
        params = {
            s: jax.device_get(restore_params(workdir / "checkpoints" / str(s), abstract)[0])
            for s in (2, 4)
        }
    model = GPTNeoX(run.model)
    tokens = rows["tokens"]
    logged = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(logged) == [2, 4]
    forward = jax.jit(lambda p: model.apply({"params": p}, *inputs))
    inputs = tokens[:, :-1], rows["positions"][:, :-1], rows["segment_ids"][:, :-1]
    for step, p in params.items():
        z = np.asarray(forward(p), np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
        loss = float((nll * mask).sum() / mask.sum())
        r = logged[step]
        assert r["eval_loss"] == pytest.approx(loss, rel=1e-5), step
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
        assert r["eval_tokens"] == mask.sum()
    assert logged[4]["eval_loss"] < logged[2]["eval_loss"]  # it learns


def test_eval_records_keep_the_training_fields_and_reach_tensorboard(run_on, run_off):
    workdir, _, records = run_on
    train_keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "epoch"}
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(train_keys <= set(r) for r in records)
    assert [("eval_loss" in r) for r in records] == [False, True, False, True]
    assert not any("eval_loss" in r for r in run_off)
    # The evaluation's time (the first one reads the rows and compiles) is not training time.
    assert records[1]["eval_time_s"] > records[1]["step_time_s"]
    scalars = _tb_scalars(workdir / "tb")
    for key, tag in (("eval_loss", "eval/loss"), ("eval_perplexity", "eval/perplexity")):
        want = {r["step"]: float(np.float32(r[key])) for r in records if key in r}
        assert scalars[tag] == pytest.approx(want, rel=1e-6)
    assert "train/loss" in scalars


# (2) no held-out document in training ----------------------------------------------------------


@pytest.fixture(scope="module")
def split(shards):
    pieces, documents, held = _corpus(shards)
    eval_docs = [documents[d] for d in documents if held[d]]
    train_docs = [documents[d] for d in documents if not held[d]]
    eval_only = _ngrams(eval_docs) - _ngrams(train_docs)
    assert 0 < len(eval_docs) < len(documents)
    # Both sides have a document that continues into the next record: the rule for the piece a
    # record starts with (the previous records decide it) is exercised.
    spans = {}
    for d, _ in pieces:
        spans[d] = spans.get(d, 0) + 1
    assert {held[d] for d in spans if spans[d] > 1} == {True, False}
    # Enough held-out documents have text of their own for the content checks to mean something.
    assert sum(bool(_ngrams([d]) & eval_only) for d in eval_docs) > 0.9 * len(eval_docs)
    return pieces, documents, held, eval_only, _ngrams(train_docs)


def test_the_rule_holds_out_the_fraction():
    """The pipeline's vectorised rule is the written-out one, and takes the fraction."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 20_000)
    tokens = rng.integers(0, 30_000, int(lengths.sum())).astype(np.uint16)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    held = held_out(document_hashes(tokens, bounds), FRACTION, SEED)
    assert abs(held.mean() - FRACTION) < 0.01
    for k in range(0, 20_000, 97):
        assert held[k] == _is_held_out(tokens[bounds[k] : bounds[k + 1]], FRACTION, SEED)


def test_trainer_batches_hold_no_held_out_document(run_on, split):
    _, seen, _ = run_on
    eval_only = split[3]
    assert len(seen["train"]) == STEPS
    assert not _ngrams(np.concatenate([b.tokens for b in seen["train"]])) & eval_only


@pytest.mark.parametrize("mode", ["concat", "packed"])
def test_a_whole_training_epoch_holds_no_held_out_document(shards, split, mode):
    _, _, _, eval_only, train_grams = split
    config = _config(shards, data__mode=mode)
    it = make_pipeline(
        config.data,
        seq_len=config.train.seq_len,
        global_batch_size=config.train.batch_size,
        process_index=0,
        process_count=1,
        holdout=holdout_for(config.eval, "train"),
    )
    rows, epoch = [], 0.0
    while epoch < 1.0:
        local = next(it)
        rows.append(local.batch.tokens)
        epoch = local.epoch
    grams = _ngrams(np.concatenate(rows))
    assert not grams & eval_only
    # ...and it read the training side (8-grams across row boundaries are in no row)
    assert len(grams & train_grams) > 0.75 * len(train_grams)


@pytest.mark.parametrize("mode", ["concat", "packed"])
@pytest.mark.parametrize("side", ["train", "eval"])
def test_each_side_reads_exactly_its_documents(shards, split, side, mode):
    """Unshuffled (shuffling only reorders records and rows), the training rows are exactly the
    documents not held out, and the eval rows exactly the held-out ones, in stored order, over
    (all but the last row or window of) an epoch."""
    pieces, _, held, _, _ = split
    config = _config(shards, data__mode=mode, data__shuffle=False)
    t = config.train
    sizes = {"seq_len": t.seq_len, "global_batch_size": t.batch_size}
    if side == "train":
        holdout = holdout_for(config.eval, "train")
        it = make_pipeline(config.data, **sizes, process_count=1, holdout=holdout)
    else:
        it = iter(make_eval_dataset(config.data, config.eval, **sizes, process_count=1))
    want = _expected_rows([p for p in pieces if held[p[0]] == (side == "eval")], config)
    got = _read_rows(it, want["tokens"].shape[0])
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_eval_data_directories_give_their_documents_in_order(shards, tmp_path):
    copy = tmp_path / "eval_tokens"
    shutil.copytree(shards, copy)
    config = _config(shards, data__mode="concat", eval__holdout_fraction=0.0)
    config.eval.data = (str(copy),)
    validate_run(config, jax.device_count())
    t = config.train
    dataset = make_eval_dataset(
        config.data, config.eval, seq_len=t.seq_len, global_batch_size=t.batch_size
    )
    pieces, _, _ = _corpus(copy)
    want = _expected_rows(pieces, config)["tokens"]
    np.testing.assert_array_equal(_read_rows(iter(dataset), want.shape[0])["tokens"], want)


def test_a_hold_out_with_no_documents_is_one_error(shards):
    config = _config(shards, eval__holdout_fraction=1e-12)
    dataset = make_eval_dataset(
        config.data, config.eval, seq_len=32, global_batch_size=16, process_count=1
    )
    with pytest.raises(ConfigError, match="leaves no eval documents"):
        next(iter(dataset))


# (3) and (4): evaluation changes nothing about training -------------------------------------------


def _training(records):
    return [(r["step"], r["loss"], r["grad_norm"], r["epoch"]) for r in records]


def test_training_losses_with_eval_equal_those_without(run_on, run_off):
    _, _, records = run_on
    assert _training(records) == _training(run_off)  # bit for bit


def test_resume_with_eval_is_bit_exact(run_on, run_resumed):
    _, _, straight = run_on
    resumed, first, second = run_resumed
    assert _training(resumed) == _training(straight)
    evals = lambda rs: [(r["step"], r["eval_loss"]) for r in rs if "eval_loss" in r]  # noqa: E731
    assert evals(resumed) == evals(straight)
    assert len(first["train"]) == EVERY and len(first["eval"]) == 1
    assert len(second["train"]) == STEPS - EVERY and len(second["eval"]) == 1


# (5) the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval__holdout_fraction": 1.0}, r"config.eval.holdout_fraction=1.0 must be .* \[0, 1\)"),
        ({"eval__holdout_fraction": -0.01}, r"config.eval.holdout_fraction=-0.01 must be"),
        ({"eval__holdout_fraction": math.nan}, r"config.eval.holdout_fraction=nan must be"),
        ({"eval__eval_every": -1}, r"config.eval.eval_every=-1 must be an int >= 0"),
        ({"eval__eval_batches": 0}, r"config.eval.eval_batches=0 must be a positive int"),
        ({"eval__holdout_seed": -1}, r"config.eval.holdout_seed=-1 must be an int"),
        ({"eval__holdout_fraction": 0.0}, r"config.eval.eval_every=2 needs held-out data"),
        ({"eval__data": ("builtin",)}, r"config.eval.data=.* and .*holdout_fraction=0.1 both"),
        (
            {"data__shards": ("builtin",), "eval__data": ("builtin",), "eval__holdout_fraction": 0},
            r"config.eval.data='builtin' is training data",
        ),
    ],
)
def test_bad_eval_settings_are_one_error_naming_the_field(shards, overrides, message):
    config = _config(shards, **overrides)
    with pytest.raises(ConfigError, match=message) as error:
        validate_run(config, jax.device_count())
    assert "\n" not in str(error.value)


def test_eval_data_must_be_tokenized_directories(shards, tmp_path):
    config = _config(shards, eval__holdout_fraction=0.0, eval__data=(str(shards),))
    with pytest.raises(ConfigError, match="is training data"):
        validate_run(config, jax.device_count())
    config.eval.data = (str(tmp_path),)
    with pytest.raises(InputError, match="no manifest.json"):
        validate_run(config, jax.device_count())


def test_eval_off_is_the_default(shards):
    config = tiny_config(shards)
    assert config.eval.eval_every == 0 and config.eval.holdout_fraction == 0.0
    validate_run(config, jax.device_count())
    assert holdout_for(config.eval, "train") is None


def test_resume_rules_for_the_eval_section(shards):
    old = wd.flat_config(_config(shards))
    free = wd.resume_changes(old, wd.flat_config(_config(shards, eval__eval_every=5)))
    assert set(free.free) == {"eval.eval_every"} and not free.guarded
    for field, value in (("holdout_fraction", 0.2), ("holdout_seed", 8)):
        changed = wd.resume_changes(
            old, wd.flat_config(_config(shards, **{f"eval__{field}": value}))
        )
        assert set(changed.guarded) == {f"eval.{field}"} and changed.data_changed


def test_iterator_state_is_refused_by_another_hold_out(shards):
    def pipeline(fraction):
        config = _config(shards, eval__holdout_fraction=fraction)
        return make_pipeline(
            config.data,
            seq_len=32,
            global_batch_size=16,
            process_count=1,
            holdout=holdout_for(config.eval, "train"),
        )

    it = pipeline(FRACTION)
    next(it)
    state = it.get_state()
    pipeline(FRACTION).set_state(state)
    with pytest.raises(ConfigError, match="other data or config.data"):
        pipeline(0.2).set_state(state)
