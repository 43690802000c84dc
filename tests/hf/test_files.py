"""The files of an HF directory: the streaming safetensors writer against the `safetensors` package,
its shard plan, sizes, and config.json checks."""

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from polyglot_jax.errors import InputError
from polyglot_jax.hf.files import (
    HFWeights,
    ShardedSafetensorsWriter,
    TensorEntry,
    parse_size,
    plan_shards,
    read_hf_config,
    shard_file_names,
)
from polyglot_jax.hf.mapping import to_hf_config
from polyglot_jax.model import ModelConfig


def test_streaming_writer_matches_the_safetensors_reader(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.standard_normal((3,)).astype(ml_dtypes.bfloat16),
        "c": rng.standard_normal((4, 6)).astype(np.float16),
    }
    entries = [TensorEntry(k, v.dtype, v.shape) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=10**6)
    writer.write_box("c", (6, 4), (slice(0, 6), slice(2, 4)), tensors["c"][2:4].T)
    writer.write("a", tensors["a"])
    writer.write_box("c", (6, 4), (slice(0, 6), slice(0, 2)), tensors["c"][0:2].T)
    with pytest.raises(RuntimeError, match="b: 0 of 3"):
        writer.close()
    writer = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=10**6)
    for key, value in tensors.items():
        writer.write(key, value)
    assert writer.close() == [tmp_path / "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        for key, value in tensors.items():
            got = f.get_tensor(key)
            assert got.dtype == value.dtype and np.array_equal(got, value), key
    written_by_safetensors = tmp_path / "ref"
    written_by_safetensors.mkdir()
    save_file(tensors, str(written_by_safetensors / "model.safetensors"))
    weights = HFWeights(written_by_safetensors)
    for key, value in tensors.items():
        got = weights.get(key)
        assert weights.shape(key) == value.shape and got.dtype == value.dtype
        assert np.array_equal(got, value), key


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000
    assert parse_size("1000") == 1000
    for bad in ("5 parsecs", "-1GB", "0"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_shards_are_consecutive_and_a_large_tensor_fills_one_alone():
    def entries(*sizes):
        return [TensorEntry(f"t{i}", np.dtype(np.uint8), (n,)) for i, n in enumerate(sizes)]

    def plan(*sizes, limit=10):
        return [[e.key for e in shard] for shard in plan_shards(entries(*sizes), limit)]

    assert plan(4, 6, 1) == [["t0", "t1"], ["t2"]]
    assert plan(3, 12, 2, 9) == [["t0"], ["t1"], ["t2"], ["t3"]]
    assert plan(3, 3) == [["t0", "t1"]]
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_read_hf_config_names_the_file_and_the_field(tmp_path):
    cfg = ModelConfig(vocab_size=96, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8)
    with pytest.raises(InputError, match="config.json does not exist: not a Hugging Face model"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    assert read_hf_config(tmp_path)["hidden_size"] == 32
    (tmp_path / "config.json").write_text(json.dumps({**to_hf_config(cfg), "hidden_size": 0}))
    file = re.escape(str(tmp_path / "config.json"))
    with pytest.raises(InputError, match=f"{file}: hidden_size=0 must be a positive integer"):
        read_hf_config(tmp_path)
