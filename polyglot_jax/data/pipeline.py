"""grain input pipeline: tokenized shards -> shuffled records -> sequences -> global batches.

    it = make_pipeline(config.data, seq_len=2048, global_batch_size=1024)
    local = next(it)               # a LocalBatch (batch.py): numpy, this process's block of rows
    batch = train.make_global_batch(local.batch, NamedSharding(mesh, P(("data", "fsdp"))))

`next(it)` gives a `LocalBatch`: `.batch`, a `Batch` of `tokens` (int32 [local_batch,
seq_len + 1]) and, in packed mode, `segment_ids` and `positions` (int32, same shape); `.epoch`
(float64 scalar: epochs completed + fraction of the current one, for the corpus furthest through
its data) and `.epochs` (float64 [num_corpora], each corpus's own). `local_batch =
global_batch_size // process_count`.

**The global batch of step s is a function of the data, the settings and s alone**, never of the
number of processes: every process builds the same windows of rows from all records, and yields
block `process_index` of `process_count` equal blocks of rows of each global batch (the trainer
picks the block its devices hold; 1 of 1 is the whole batch). The iterator state is global too, so
a run resumes on any number of processes and every trajectory is the same on every layout. Each
process reads every record: at pretraining rates that is a few MB per step (2M tokens of a
1024 x 2048 batch, 8 MB as int32), far below what a host reads or decodes, and it is what lets
packing place documents over the whole window.

An epoch is counted in records: a record counts once all its tokens are in rows, a partly used
one by the fraction of its tokens that are (the one a window stops in), a record read but not
placed not at all. The value is exact at each window's end (a window of one epoch's data reports
exactly 1.0, in both modes) and interpolated over the window's rows in between; every process
reports the same value.

Stages:
1. Records of each tokenized directory (`records.py`: blocks of whole documents) are a grain
   `MapDataset` over ArrayRecord; with a `Holdout` each record keeps only the document pieces of
   its side (below); `shuffle` permutes them with a seed per corpus, differently in every epoch
   (`repeat`).
2. Corpora are mixed record by record with `MapDataset.mix`; config weights are shares of
   *tokens*, turned into record proportions with each corpus's mean record size.
3. Rows of `seq_len + 1` tokens are built a window of `shuffle_buffer` rows at a time (rounded up
   to a multiple of the global batch) and, with `shuffle`, emitted in a seeded random order:
   - 'concat': contiguous, disjoint chunks of the token stream (documents joined by their eos).
     GPT-NeoX, which trained Polyglot-Ko, overlaps consecutive rows by one token (row i is stream
     tokens [i*seq_len, (i+1)*seq_len]); here row i is [i*(seq_len+1), (i+1)*(seq_len+1)), so
     the stream advances seq_len + 1 per row and each row's first token is context only;
   - 'packed': whole documents placed first-fit into the window's rows (`packing.py`), with
     segment ids and positions per document piece.
   The loss mask of the rows is `batch.loss_mask` (no loss across a piece start or on padding).
4. Global batches of consecutive rows, of which this process keeps its block; a thread prepares
   `prefetch` batches ahead.

Held-out documents (`config.eval.holdout_fraction`): `holdout.py` decides, record by record,
which document pieces a side keeps, before rows are built.

The iterator is a `grain.DatasetIterator`: `get_state()` is a small JSON dict (where the current
window starts in the record stream, and how many of its rows were emitted), so
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` work inside an orbax checkpoint and
a restored iterator produces exactly the next batch. The state is the same on every process and
fits any process count; it belongs to the same data and settings (`set_state` raises ConfigError
otherwise). States saved before it was global (version 1) resume when one process saved them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from polyglot_jax.data.batch import Batch, LocalBatch
from polyglot_jax.data.holdout import Holdout
from polyglot_jax.data.packing import FirstFitPacker
from polyglot_jax.data.record_stream import (
    BUILTIN,
    Corpus,
    no_documents_error,
    record_stream,
    record_weights,
    tokenized_directories,
)
from polyglot_jax.data.records import (
    decode_record,
    read_manifest,
)
from polyglot_jax.errors import ConfigError

MODES = ("concat", "packed")
_STATE_VERSION = 2  # 2: global (1 also named a process index and count)


def default_data_config() -> ml_collections.ConfigDict:
    """The keys `make_pipeline` reads, with their defaults."""
    config = ml_collections.ConfigDict()
    # Tokenized directories (each with manifest.json); "builtin" = the built-in Korean sample.
    config.shards = (BUILTIN,)
    # Share of tokens drawn from each directory (any positive scale); () = proportional to size.
    config.weights = ()
    config.mode = "concat"  # "concat" | "packed"
    config.shuffle = True  # records globally, every epoch anew, and rows within a window
    config.shuffle_buffer = 1024  # rows per window (shuffled together; the bins of packing)
    config.seed = 0
    config.prefetch = 2  # batches prepared ahead in a background thread (0 = none)
    config.cache_dir = ""  # where "builtin" is prepared ("" = sample.default_cache_dir())
    # The tokenizer of the shards, for export and generation (the pipeline itself reads ids only);
    # "" = the one recorded in the first directory's manifest.json.
    config.tokenizer = ""
    return config


@dataclasses.dataclass(frozen=True)
class _Position:
    """A point in the record stream: record index, token offset in it, and per corpus the records
    (of its repeated share) wholly before it, for epochs. Older saved states also counted the
    record at the point once it was read; `_WindowBuilder.build` corrects that."""

    record: int
    offset: int
    consumed: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Window:
    rows: Batch  # all of the window's rows, numpy
    order: np.ndarray  # emission order of the rows
    start: _Position
    end: _Position
    # Records used per corpus (a partly used one by its fraction of tokens) at start and end.
    start_used: np.ndarray
    end_used: np.ndarray


class _WindowBuilder:
    """Builds the rows of one window from the record stream, deterministically from its start."""

    def __init__(
        self,
        records,
        *,
        mode,
        rows,
        row_len,
        shuffle,
        seed,
        corpora,
        shares=None,
        holdout=None,
        directories=(),
    ):
        self.records = records
        self.mode = mode
        self.rows = rows
        self.row_len = row_len
        self.shuffle = shuffle
        self.seed = seed
        self.num_corpora = corpora
        self.shares, self.holdout, self.directories = shares, holdout, directories
        # Per corpus, the first and last index (in its repeated share) of the empty records read
        # since the last non-empty one, within one window's build.
        self._empty_run: dict[int, tuple[int, int]] = {}

    def _read(self, index: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(corpus, index in its repeated share, tokens, document starts) of record `index`."""
        corpus, in_share, data = self.records[index]
        tokens, starts = decode_record(data)
        if self.holdout is not None:  # records can be emptied: fail rather than read forever
            if tokens.size:
                self._empty_run.clear()
            else:
                first = self._empty_run.get(corpus, (in_share, in_share))[0]
                self._empty_run[corpus] = (first, in_share)
                # 2 * share consecutive indices of a corpus hold one whole epoch of it.
                if len(self._empty_run) == self.num_corpora and all(
                    last - first + 1 >= 2 * self.shares[c]
                    for c, (first, last) in self._empty_run.items()
                ):
                    raise no_documents_error(self.holdout, self.directories)
        return corpus, in_share, tokens, starts

    def _used(self, consumed: list[int], partial: tuple[int, float] | None) -> np.ndarray:
        used = np.asarray(consumed, np.float64)
        if partial is not None:
            used[partial[0]] += partial[1]
        return used

    def build(self, start: _Position, window_index: int) -> _Window:
        self._empty_run.clear()
        first = self._read(start.record)
        corpus, in_share, tokens, _ = first
        consumed = list(start.consumed)
        # A corpus's records are numbered consecutively in the stream, so exactly `in_share` of
        # them precede this one (this also corrects states that counted it when it was read).
        consumed[corpus] = in_share
        start_used = self._used(consumed, (corpus, start.offset / max(tokens.size, 1)))
        if self.mode == "concat":
            rows, end, partial = self._concat(start, first, consumed)
        else:
            rows, end, partial = self._packed(start, first, consumed)
        if self.shuffle:
            # (The 0 stood for the process index when each process built its own windows: kept,
            # so that runs and states from then are the same rows now.)
            rng = np.random.default_rng([self.seed, 0, window_index])
            order = rng.permutation(self.rows)
        else:
            order = np.arange(self.rows)
        end_used = self._used(consumed, partial)
        return _Window(rows, order, start, end, start_used, end_used)

    def _concat(self, start: _Position, item, consumed: list[int]):
        """Rows, the end position, and (corpus, fraction used) of the record it is inside."""
        need = self.rows * self.row_len
        parts, have = [], 0
        record, offset = start.record, start.offset
        while True:
            corpus, in_share, tokens, _ = item or self._read(record)
            item = None
            take = min(tokens.size - offset, need - have)
            parts.append(tokens[offset : offset + take])
            have += take
            if offset + take < tokens.size:
                offset += take
                partial = (corpus, offset / tokens.size)
                break
            consumed[corpus] = in_share + 1
            record, offset = record + 1, 0
            if have == need:
                partial = None  # the next record is not read
                break
        tokens = np.concatenate(parts).astype(np.int32).reshape(self.rows, self.row_len)
        return Batch(tokens), _Position(record, offset, tuple(consumed)), partial

    def _packed(self, start: _Position, item, consumed: list[int]):
        """Like `_concat`; the window ends inside the record whose next piece fits nowhere."""
        packer = FirstFitPacker(self.rows, self.row_len)
        record, offset = start.record, start.offset
        while True:
            corpus, in_share, tokens, starts = item or self._read(record)
            item = None
            stop = packer.add(tokens, starts, offset)
            if stop is not None:
                end = _Position(record, stop, tuple(consumed))
                return packer.batch(), end, (corpus, stop / tokens.size)
            consumed[corpus] = in_share + 1  # every token of the record is placed
            record, offset = record + 1, 0


class _SequenceIterator(grain.DatasetIterator):
    def __init__(self, dataset: SequenceDataset):
        super().__init__()
        self._ds = dataset
        self._builder = dataset.builder()
        self._start = _Position(0, 0, (0,) * len(dataset.shares))
        self._window_index = 0
        self._row = 0
        self._window: _Window | None = None

    def __next__(self) -> LocalBatch:
        ds = self._ds
        if self._window is None:
            self._window = self._builder.build(self._start, self._window_index)
        window = self._window
        rows = window.order[self._row : self._row + ds.global_batch]
        block = rows[ds.process_index * ds.local_batch : (ds.process_index + 1) * ds.local_batch]
        batch = jax.tree.map(lambda v: v[block], window.rows)
        self._row += ds.global_batch
        # Rows leave a window in shuffled order, so within one the progress is interpolated;
        # at its end it is the exact count (not a + (b - a), which can miss b by an ulp).
        if self._row == ds.window_rows:
            used = window.end_used
        else:
            frac = self._row / ds.window_rows
            used = window.start_used + frac * (window.end_used - window.start_used)
        epochs = used / np.asarray(ds.shares, np.float64)
        if self._row == ds.window_rows:
            self._start, self._window_index, self._row = window.end, self._window_index + 1, 0
            self._window = None
        return LocalBatch(batch, np.float64(epochs.max()), epochs)

    def get_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._ds.fingerprint,
            "window": self._window_index,
            "record": self._start.record,
            "offset": self._start.offset,
            "consumed": list(self._start.consumed),
            "row": self._row,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        ds = self._ds
        if state.get("version") == 1 and state.get("process_count") != 1:
            raise ConfigError(
                f"data iterator state was saved by process {state.get('process_index')} of "
                f"{state.get('process_count')} before the global batch was the same on every "
                "layout; it cannot resume this pipeline (resume on that many processes with the "
                "release that saved it, or start the data over with a new --workdir)"
            )
        if (
            state.get("version") not in (1, _STATE_VERSION)
            or state.get("fingerprint") != ds.fingerprint
        ):
            raise ConfigError(
                "data iterator state was saved with other data or config.data/seq_len/batch "
                "settings; it cannot resume this pipeline"
            )
        self._start = _Position(
            int(state["record"]), int(state["offset"]), tuple(int(c) for c in state["consumed"])
        )
        self._window_index = int(state["window"])
        self._row = int(state["row"])
        self._window = None


class SequenceDataset(grain.IterDataset):
    """Rows of `row_len` tokens in global batches of `global_batch`, from a `record_stream`;
    yields block `process_index` (of `process_count` blocks of `local_batch` rows) of each."""

    def __init__(
        self,
        records: grain.MapDataset,
        *,
        shares: Sequence[int],
        mode: str,
        row_len: int,
        global_batch: int,
        window_rows: int,
        shuffle: bool,
        seed: int,
        process_index: int,
        process_count: int,
        fingerprint: str,
        holdout: Holdout | None = None,
        directories: Sequence[str] = (),
    ):
        super().__init__(records)
        self.records = records
        self.shares = tuple(shares)
        self.mode = mode
        self.row_len = row_len
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.window_rows = window_rows
        self.shuffle = shuffle
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.fingerprint = fingerprint
        self.holdout = holdout
        self.directories = tuple(directories)

    def builder(self) -> _WindowBuilder:
        return _WindowBuilder(
            self.records,
            mode=self.mode,
            rows=self.window_rows,
            row_len=self.row_len,
            shuffle=self.shuffle,
            seed=self.seed,
            corpora=len(self.shares),
            shares=self.shares,
            holdout=self.holdout,
            directories=self.directories,
        )

    def __iter__(self) -> _SequenceIterator:
        return _SequenceIterator(self)

    def __str__(self) -> str:
        return f"SequenceDataset(mode={self.mode}, row_len={self.row_len})"


def make_dataset(
    data_config: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    holdout: Holdout | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain `IterDataset` (see the module docstring); `make_pipeline` iterates it.

    `seed` defaults to `data_config.seed`; `process_index` / `process_count` (which block of rows
    of every global batch this iterator yields: block i of n equal blocks) default to
    `jax.process_index()` / `jax.process_count()` (the trainer passes the block its devices hold);
    the batches themselves do not depend on them. `holdout`
    (None: every document) keeps one side of a hold-out (`holdout_for(config.eval, side)`)."""
    mode = data_config.get("mode", "concat")
    if mode not in MODES:
        raise ConfigError(f"config.data.mode={mode!r}; choose one of {MODES}")
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be positive")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(
            f"global batch size {global_batch_size} is not a positive multiple of the "
            f"{process_count} blocks of rows asked for"
        )
    seed = data_config.get("seed", 0) if seed is None else seed
    shuffle = bool(data_config.get("shuffle", True))
    buffer = int(data_config.get("shuffle_buffer", 1024))
    window_rows = -(-max(buffer, global_batch_size) // global_batch_size) * global_batch_size

    corpora = []
    directories = tokenized_directories(data_config)
    for directory in directories:
        manifest = read_manifest(directory)
        if manifest["records"] == 0:
            raise ConfigError(f"{directory}: holds no records")
        corpora.append(Corpus(directory, manifest, manifest["records"]))
    hashes = {c.manifest.get("tokenizer_sha256") for c in corpora}
    if len(hashes) > 1:
        raise ConfigError("config.data.shards were tokenized with different tokenizers")
    weights = record_weights(corpora, tuple(data_config.get("weights", ())))
    records = record_stream(
        corpora,
        weights,
        seed=seed,
        shuffle=shuffle,
        holdout=holdout,
    )
    identity = {
        "corpora": [
            [c.manifest["tokens"], c.manifest["records"], c.manifest.get("tokenizer_sha256")]
            for c in corpora
        ],
        "weights": weights,
        "mode": mode,
        "row_len": seq_len + 1,
        # (Named when it was per process; 1-process states from then keep their fingerprint.)
        "local_batch": global_batch_size,
        "window_rows": window_rows,
        "shuffle": shuffle,
        "seed": seed,
    }
    if holdout is not None:  # (absent otherwise: states saved before hold-outs existed still fit)
        identity["holdout"] = dataclasses.asdict(holdout)
    fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return SequenceDataset(
        records,
        shares=[c.share for c in corpora],
        mode=mode,
        row_len=seq_len + 1,
        global_batch=global_batch_size,
        window_rows=window_rows,
        shuffle=shuffle,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        fingerprint=fingerprint,
        holdout=holdout,
        directories=directories,
    )


def make_pipeline(
    data_config: ml_collections.ConfigDict,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    holdout: Holdout | None = None,
) -> grain.DatasetIterator:
    """This process's batch iterator (checkpointable; see the module docstring for the batches).

    Reads `data_config` keys: shards, weights, mode, shuffle, shuffle_buffer, seed, prefetch,
    cache_dir (defaults: `default_data_config()`); `holdout` as in `make_dataset`."""
    dataset = make_dataset(
        data_config,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        holdout=holdout,
    )
    prefetch = int(data_config.get("prefetch", 2))
    if prefetch > 0:
        dataset = grain.experimental.ThreadPrefetchIterDataset(
            dataset, prefetch_buffer_size=prefetch
        )
    return iter(dataset)
