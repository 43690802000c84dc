"""The stream of records a pipeline reads: each corpus's tokenized shards (`records.py`), all of
them on every process, shuffled with a seed per corpus and epoch, the held-out documents of
`config.eval` filtered out (or kept, for evaluation; `holdout.py`), corpora mixed record by record
in proportions derived from their token weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from polyglot_jax.data.holdout import Holdout, HoldoutSource
from polyglot_jax.data.records import (
    check_shards,
    shard_files,
    unreadable_record_error,
)
from polyglot_jax.errors import ConfigError, InputError

BUILTIN = "builtin"  # a `shards` entry naming the built-in Korean sample (data/sample.py)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One tokenized directory of a pipeline."""

    directory: str
    manifest: dict
    share: int  # records it gives each epoch (all of its records)


def tokenized_directories(data_config: ml_collections.ConfigDict) -> list[str]:
    """The tokenized directories that `config.data.shards` names ('builtin' prepared on first use)."""
    shards = data_config.get("shards", ())
    if isinstance(shards, str):
        shards = (shards,)
    if not shards:
        raise ConfigError("config.data.shards is empty: name tokenized directories or 'builtin'")
    directories = []
    for entry in shards:
        if entry == BUILTIN:
            from polyglot_jax.data.sample import prepare_builtin_sample

            entry = str(prepare_builtin_sample(data_config.get("cache_dir") or None))
        directories.append(str(entry))
    return directories


def record_weights(corpora: Sequence[Corpus], weights: Sequence[float]) -> list[float]:
    """Record proportions for `MapDataset.mix` from token shares (or sizes when empty)."""
    if not weights:
        return [float(c.manifest["records"]) for c in corpora]
    if len(weights) != len(corpora):
        raise ConfigError(
            f"config.data.weights has {len(weights)} entries for {len(corpora)} shards directories"
        )
    if any(not w > 0 for w in weights):
        raise ConfigError(f"config.data.weights must all be positive, got {tuple(weights)}")
    return [
        w * c.manifest["records"] / c.manifest["tokens"]
        for w, c in zip(weights, corpora, strict=True)
    ]


def _corpus_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class _Tag:
    """(corpus, index in its repeated share, record bytes): the index gives the epoch."""

    def __init__(self, corpus: int):
        self.corpus = corpus

    def __call__(self, index: int, record: bytes) -> tuple[int, int, bytes]:
        return self.corpus, index, record


class _ShardSource:
    """The records of one tokenized directory (grain's ArrayRecord source), with errors that name
    the shard: a damaged shard is found when the pipeline is built (counts that disagree with
    manifest.json) or, for damage inside a record, when that record is read."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        try:
            self.source = grain.sources.ArrayRecordDataSource(shard_files(directory, manifest))
            count = len(self.source)
        except Exception as e:  # array_record's RuntimeError names neither file nor record
            check_shards(directory, manifest)
            raise InputError(f"{directory}: the shards cannot be opened ({e})") from e
        if count != manifest["records"]:
            check_shards(directory, manifest)  # names the shard whose count differs
            raise InputError(
                f"{directory}: the shards hold {count} records, manifest.json lists "
                f"{manifest['records']}"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self.source[index]
        except Exception as e:
            raise unreadable_record_error(self.directory, self.manifest, index, e) from e


def record_stream(
    corpora: Sequence[Corpus],
    record_weights: Sequence[float],
    *,
    seed: int,
    shuffle: bool,
    holdout: Holdout | None = None,
) -> grain.MapDataset:
    """Infinite `MapDataset` of (corpus, index_in_share, record bytes), mixed by `record_weights`;
    with `holdout`, only the documents of its side."""
    parts = []
    for c, corpus in enumerate(corpora):
        source = _ShardSource(corpus.directory, corpus.manifest)
        if holdout is not None:
            source = HoldoutSource(source, holdout)
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=_corpus_seed(seed, c))
        parts.append(ds.repeat().map_with_index(_Tag(c)))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, list(record_weights))


def no_documents_error(holdout: Holdout, directories: Sequence[str]) -> ConfigError:
    return ConfigError(
        f"config.eval.holdout_fraction={holdout.fraction!r} (holdout_seed={holdout.seed}) leaves "
        f"no {holdout.side} documents in {', '.join(directories)}"
    )
