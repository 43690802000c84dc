"""The held-out rows of `config.eval` as a dataset: built like the training rows but in stored
order (no shuffle), from `config.eval.data` or from the documents `config.eval.holdout_fraction`
holds out of the training data (`holdout.py`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from polyglot_jax.data.holdout import Holdout, holdout_for
from polyglot_jax.data.pipeline import SequenceDataset, make_dataset, tokenized_directories
from polyglot_jax.data.records import read_manifest
from polyglot_jax.errors import ConfigError


def eval_data_config(
    data_config: ml_collections.ConfigDict, eval_config: Any
) -> tuple[ml_collections.ConfigDict, Holdout | None]:
    """The data settings of the held-out rows and their `Holdout` (None for `config.eval.data`).

    The held-out rows are built like the training rows (`mode`, `shuffle_buffer`: the packing
    bins) but in stored order: no record or row shuffle, so they are fixed by the data alone.
    With `config.eval.data` they are those directories' documents (mixed by size); otherwise the
    documents `config.eval.holdout_fraction` holds out of `config.data.shards` (same weights)."""
    config = ml_collections.ConfigDict(data_config.to_dict())
    config.shuffle = False
    config.prefetch = 0
    shards = eval_config.get("data") or ()
    if isinstance(shards, str):
        shards = (shards,)
    if shards:
        config.shards = tuple(shards)
        config.weights = ()
        return config, None
    return config, holdout_for(eval_config, "eval")


def make_eval_dataset(
    data_config: ml_collections.ConfigDict,
    eval_config: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> SequenceDataset:
    """The held-out rows (`eval_data_config`) as a dataset: `iter()` starts it from its beginning,
    so every evaluation can read the same batches. Their tokenizer must be the training data's."""
    config, holdout = eval_data_config(data_config, eval_config)
    if holdout is None and config.shards:
        train_hashes = {
            read_manifest(d).get("tokenizer_sha256") for d in tokenized_directories(data_config)
        }
        for directory in tokenized_directories(config):
            if read_manifest(directory).get("tokenizer_sha256") not in train_hashes:
                raise ConfigError(
                    f"config.eval.data {directory} was tokenized with another tokenizer than "
                    "config.data.shards"
                )
    return make_dataset(
        config,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        holdout=holdout,
    )
