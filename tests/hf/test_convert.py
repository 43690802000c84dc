"""Checkpoint conversion orbax <-> HF, checked against transformers, safetensors and hf.mapping.

The references are independent of the streaming code: `mapping.to_hf_state_dict` /
`from_hf_state_dict` on whole in-memory trees, transformers' GPTNeoXForCausalLM, the `safetensors`
package's reader, and orbax's own restore.
"""

import json
import math
import pathlib
import re

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hf_reference import hf_logits, hf_state_dict, random_hf_model, require_torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from polyglot_jax.checkpoint import Checkpointer, restore_params
from polyglot_jax.config import base_config
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.hf import convert, mapping
from polyglot_jax.hf.files import HFWeights, ShardedSafetensorsWriter
from polyglot_jax.hf.orbax_arrays import CheckpointReader, CheckpointWriter
from polyglot_jax.model import GPTNeoX, ModelConfig, abstract_params
from polyglot_jax.partitioning import logical_shardings, make_mesh, rules_from_config
from polyglot_jax.workdir import load_run_config

torch = require_torch()

# Every dimension divides a (fsdp 2, model 4) mesh; distinct sizes catch transposition mistakes.
MODEL = dict(
    vocab_size=96,
    num_layers=2,
    d_model=64,
    d_ff=128,
    num_heads=4,
    rotary_dim=8,
    max_len=64,
    dtype="float32",
)
TOKENS = np.random.default_rng(1).integers(0, MODEL["vocab_size"], (2, 24), dtype=np.int32)


def run_config(**model):
    config = base_config()
    config.model.update({**MODEL, **model})
    return config


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Every parameter random (LayerNorms and biases too, so a misplaced one shows)."""
    rng = np.random.default_rng(seed)
    boxed = abstract_params(cfg)
    return jax.tree.map(
        lambda b: (0.2 * rng.standard_normal(b.value.shape)).astype(b.value.dtype),
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def save_run(workdir: pathlib.Path, config, steps: dict, mesh_shape: dict | None = None):
    """A run directory as the trainer leaves it: config.json and checkpoints/<step>/ (params,
    opt_state), the arrays placed on `mesh_shape` when given."""
    cfg = ModelConfig.from_config(config.model)
    ckpt = Checkpointer(workdir, keep=10, keep_period=None, async_save=False)
    for step, params in steps.items():
        if mesh_shape is not None:
            mesh = make_mesh(
                {"data": 1, **mesh_shape, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1}
            )
            shardings = logical_shardings(
                abstract_params(cfg), mesh, rules_from_config(config.mesh.rules)
            )
            params = jax.device_put(params, shardings)
        ckpt.save(step, params, optax.adamw(1e-3).init(params), None)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    return workdir


def our_logits(params, cfg: ModelConfig) -> np.ndarray:
    return np.asarray(GPTNeoX(cfg).apply({"params": params}, TOKENS), np.float64)


def load_hf(directory):
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of an HF directory via the safetensors package (single file or index)."""
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out = {}
    for name in files:
        with safe_open(str(directory / name), framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def restore(workdir, cfg: ModelConfig, step=None):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda b: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype, sharding=device),
        abstract_params(cfg),
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    target = workdir if step is None else pathlib.Path(workdir) / "checkpoints" / str(step)
    return jax.tree.map(np.asarray, restore_params(target, abstract)[0])


def assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b)
    for path, x in flat_a:
        y = flat_b[path]
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A single-device run with checkpoints at steps 0 and 5 (different params)."""
    config = run_config()
    cfg = ModelConfig.from_config(config.model)
    params = {0: random_params(cfg, 0), 5: random_params(cfg, 5)}
    workdir = save_run(tmp_path_factory.mktemp("run"), config, params)
    return workdir, cfg, params


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A random float32 transformers model saved with save_pretrained, plus a tokenizer."""
    cfg = ModelConfig(**MODEL)
    model = random_hf_model(cfg, seed=3)
    directory = tmp_path_factory.mktemp("hf_in")
    model.save_pretrained(directory)
    return directory, cfg, model


# ---------------------------------------------------------------- to-hf


def test_to_hf_float32_matches_reference_and_transformers(run, tmp_path):
    workdir, cfg, params = run
    out = tmp_path / "hf"
    result = convert.to_hf(workdir, out, dtype="float32", show_progress=False)
    assert result.step == 5 and result.files == [out / "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    reference = mapping.to_hf_state_dict(params[5], cfg)
    written = read_safetensors(out)
    assert written.keys() == reference.keys()
    for key, value in reference.items():
        assert written[key].dtype == np.float32 and np.array_equal(written[key], value), key
    diff = np.max(np.abs(hf_logits(load_hf(out), TOKENS) - our_logits(params[5], cfg)))
    assert diff <= 1e-4
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["do_sample"] is False


def test_to_hf_picks_the_requested_step(run, tmp_path):
    workdir, cfg, params = run
    convert.to_hf(workdir, tmp_path / "hf", step=0, dtype="float32", show_progress=False)
    written = read_safetensors(tmp_path / "hf")
    for key, value in mapping.to_hf_state_dict(params[0], cfg).items():
        assert np.array_equal(written[key], value), key


def test_to_hf_from_a_sharded_mesh_into_small_shards(tmp_path):
    """Saved on a (fsdp 2, model 4) mesh, so storage chunks cut every tensor; bfloat16 output
    split into many files by a small max_shard_size."""
    config = run_config()
    cfg = ModelConfig.from_config(config.model)
    params = random_params(cfg, 7)
    workdir = save_run(tmp_path / "run", config, {0: params}, {"fsdp": 2, "model": 4})
    reader = CheckpointReader(workdir / "checkpoints" / "0" / "params")
    path = ("layers", "mlp", "up_kernel")
    assert math.prod(reader.chunk_shape(path)) < math.prod(reader.shape(path))  # really partial

    out = tmp_path / "hf"
    result = convert.to_hf(
        workdir, out, dtype="bfloat16", max_shard_size="40KB", show_progress=False
    )
    assert len(result.files) > 3 and (out / "model.safetensors.index.json").is_file()
    for f in result.files:  # each shard within the limit unless one tensor alone is larger
        with safe_open(str(f), framework="np") as handle:
            sizes = [handle.get_tensor(k).nbytes for k in handle.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    written = read_safetensors(out)
    for key, value in mapping.to_hf_state_dict(params, cfg).items():
        assert written[key].dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(written[key], value.astype(ml_dtypes.bfloat16)), key
    model = load_hf(out)
    rounded = jax.tree.map(lambda p: p.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert np.max(np.abs(hf_logits(model, TOKENS) - our_logits(rounded, cfg))) <= 1e-4


@pytest.mark.parametrize(
    "use_ocdbt, use_zarr3, mesh_shape",
    [(True, True, None), (True, True, {"fsdp": 2, "model": 4}), (False, False, None)],
)
def test_to_hf_reads_other_orbax_layouts(tmp_path, use_ocdbt, use_zarr3, mesh_shape):
    """zarr3 (read through tensorstore's chunk cache, in pieces that cut tensors when saved on a
    mesh) and one directory per array (no OCDBT)."""
    config = run_config()
    cfg = ModelConfig.from_config(config.model)
    params = random_params(cfg, 11)
    saved = params
    if mesh_shape is not None:
        mesh = make_mesh({"data": 1, **mesh_shape, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1})
        rules = rules_from_config(config.mesh.rules)
        saved = jax.device_put(params, logical_shardings(abstract_params(cfg), mesh, rules))
    workdir = tmp_path / "run"
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(workdir / "checkpoints" / "0" / "params", args=ocp.args.PyTreeSave(saved))
    (workdir / "config.json").write_text(config.to_json_best_effort())
    if mesh_shape is not None:  # pieces of tensors, written into boxes of the safetensors files
        reader = CheckpointReader(workdir / "checkpoints" / "0" / "params")
        path = ("layers", "attention", "qkv_kernel")
        assert math.prod(reader.chunk_shape(path)) < math.prod(reader.shape(path))
    convert.to_hf(workdir, tmp_path / "hf", dtype="float32", show_progress=False)
    written = read_safetensors(tmp_path / "hf")
    for key, value in mapping.to_hf_state_dict(params, cfg).items():
        assert np.array_equal(written[key], value), key


def test_the_tokenizer_travels_with_the_weights(tmp_path, shared_data):
    """to-hf copies the run's tokenizer (config.data.tokenizer); from-hf keeps the HF directory's
    under OUT/tokenizer, where the next to-hf finds it."""
    tokenizer = shared_data / "polyglot-ko-mbbpe-2022"
    # A model whose vocab holds the tokenizer's 30,003 ids (to-hf refuses a smaller one).
    wide = run_config(vocab_size=30080)
    named = tmp_path / "named"
    named.mkdir()
    save_run(named, wide, {0: random_params(ModelConfig.from_config(wide.model), 0)})
    config = json.loads((named / "config.json").read_text())
    config["data"]["tokenizer"] = str(tokenizer)
    (named / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hf"
    convert.to_hf(named, out, show_progress=False)
    for name in convert.TOKENIZER_FILES:
        assert (out / name).read_bytes() == (tokenizer / name).read_bytes()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|endoftext|>") == 2
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["torch_dtype"] == "float16"
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0

    convert.from_hf(out, tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    convert.to_hf(tmp_path / "run", tmp_path / "hf2", show_progress=False)
    assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (
        tokenizer / "tokenizer.json"
    ).read_bytes()


def test_unscanned_layers_convert_both_ways(tmp_path):
    config = run_config(scan_layers=False)
    cfg = ModelConfig.from_config(config.model)
    params = random_params(cfg, 13)
    assert "layers_1" in params
    workdir = save_run(tmp_path / "run", config, {0: params})
    convert.to_hf(workdir, tmp_path / "hf", dtype="float32", show_progress=False)
    written = read_safetensors(tmp_path / "hf")
    for key, value in mapping.to_hf_state_dict(params, cfg).items():
        assert np.array_equal(written[key], value), key
    convert.from_hf(tmp_path / "hf", tmp_path / "back", config=config, show_progress=False)
    assert_trees_equal(restore(tmp_path / "back", cfg), params)


# ---------------------------------------------------------------- from-hf


def test_from_hf_logits_equal_transformers(hf_model_dir, tmp_path):
    directory, cfg, model = hf_model_dir
    out = tmp_path / "run"
    convert.from_hf(directory, out, show_progress=False)
    params = restore(out, cfg)
    sd = hf_state_dict(model)
    sd["embed_out.weight"] = sd.pop("lm_head.weight")
    assert_trees_equal(params, mapping.from_hf_state_dict(sd, cfg))
    diff = np.max(np.abs(our_logits(params, cfg) - hf_logits(model, TOKENS)))
    assert diff <= 1e-4
    config = load_run_config(out)
    assert ModelConfig.from_config(config.model) == ModelConfig.from_config(
        run_config(dtype="bfloat16").model
    )  # the architecture from HF, the numerics from the base config


def test_from_hf_reads_pytorch_bin_with_legacy_buffers(hf_model_dir, tmp_path):
    _, cfg, model = hf_model_dir
    directory = tmp_path / "bin"
    directory.mkdir()
    state = {k: v.clone().half() for k, v in model.state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")
    state["gpt_neox.layers.0.attention.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    state["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(mapping.to_hf_config(cfg)))
    convert.from_hf(directory, tmp_path / "run", show_progress=False)
    expected = mapping.from_hf_state_dict({k: v.float().numpy() for k, v in state.items()}, cfg)
    assert_trees_equal(restore(tmp_path / "run", cfg), expected)


def test_from_hf_output_is_what_the_trainer_restores_on_a_mesh(hf_model_dir, tmp_path):
    """`train` seeds a run from `init_from` with restore_params onto its sharded abstract tree."""
    from polyglot_jax.train import build_step

    directory, cfg, _ = hf_model_dir
    out = tmp_path / "run"
    convert.from_hf(directory, out, config=run_config(), show_progress=False)
    config = load_run_config(out)
    config.mesh.fsdp, config.mesh.model = 2, 4
    mesh_shape = {"data": 1, "fsdp": 2, "model": 4, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1}
    mesh, rules = make_mesh(mesh_shape), rules_from_config(config.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fns = build_step(config, cfg, mesh, rules)
        params, _ = restore_params(out, fns.abstract_params)
    qkv = params["layers"]["attention"]["qkv_kernel"]
    assert isinstance(qkv.sharding, NamedSharding) and qkv.sharding.spec != PartitionSpec()
    assert_trees_equal(jax.tree.map(np.asarray, params), restore(out, cfg))


# ---------------------------------------------------------------- round trips


def test_to_hf_then_from_hf_is_bit_identical(run, tmp_path):
    workdir, cfg, params = run
    convert.to_hf(workdir, tmp_path / "hf", dtype="float32", show_progress=False)
    convert.from_hf(tmp_path / "hf", tmp_path / "back", config=run_config(), show_progress=False)
    assert_trees_equal(restore(tmp_path / "back", cfg), params[5])


def test_float16_hf_through_orbax_and_back_is_bit_identical(hf_model_dir, tmp_path):
    directory, cfg, model = hf_model_dir
    half = tmp_path / "half"
    model.half().save_pretrained(half)
    model.float()
    convert.from_hf(half, tmp_path / "run", show_progress=False)
    convert.to_hf(tmp_path / "run", tmp_path / "again", dtype="float16", show_progress=False)
    original, again = read_safetensors(half), read_safetensors(tmp_path / "again")
    assert again.keys() == original.keys()
    for key, value in original.items():
        assert again[key].dtype == np.float16 and np.array_equal(again[key], value), key


# ---------------------------------------------------------------- bad input


def test_to_hf_bad_inputs(run, tmp_path):
    workdir, _, _ = run
    with pytest.raises(InputError, match=r"no checkpoint for step 7 .*available: 0, 5"):
        convert.to_hf(workdir, tmp_path / "a", step=7, show_progress=False)
    with pytest.raises(InputError, match="config.json does not exist"):
        convert.to_hf(tmp_path, tmp_path / "b", show_progress=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        convert.to_hf(workdir, full, show_progress=False)
    assert (full / "keep.txt").read_text() == "mine"
    convert.to_hf(workdir, full, overwrite=True, show_progress=False)
    assert not (full / "keep.txt").exists() and (full / "model.safetensors").is_file()
    with pytest.raises(InputError, match="would replace the input"):
        convert.to_hf(workdir, workdir.parent, overwrite=True, show_progress=False)


def test_to_hf_checkpoint_that_does_not_match_its_config(run, tmp_path):
    workdir, _, _ = run
    other = tmp_path / "run"
    other.mkdir()
    (other / "checkpoints").symlink_to(workdir / "checkpoints")
    (other / "config.json").write_text(run_config(d_ff=192).to_json_best_effort())
    with pytest.raises(InputError, match=r"layers.mlp.up_kernel has shape \(2, 64, 128\)"):
        convert.to_hf(other, tmp_path / "hf", show_progress=False)
    (other / "config.json").write_text(run_config(scan_layers=False).to_json_best_effort())
    with pytest.raises(InputError, match="not in the model that config.json describes"):
        convert.to_hf(other, tmp_path / "hf", show_progress=False)


def _hf_copy(source: pathlib.Path, target: pathlib.Path, drop=(), config_changes=None):
    target.mkdir()
    tensors = read_safetensors(source)
    save_file(
        {k: v for k, v in tensors.items() if k not in drop}, str(target / "model.safetensors")
    )
    config = {**json.loads((source / "config.json").read_text()), **(config_changes or {})}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_from_hf_bad_inputs(hf_model_dir, tmp_path):
    directory, _, _ = hf_model_dir
    llama = _hf_copy(directory, tmp_path / "llama", config_changes={"model_type": "llama"})
    with pytest.raises(InputError, match="not GPTNeoXForCausalLM"):
        convert.from_hf(llama, tmp_path / "o1", show_progress=False)
    key = "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"
    missing = _hf_copy(directory, tmp_path / "missing", drop=(key,))
    with pytest.raises(InputError, match=f"missing tensor {key}"):
        convert.from_hf(missing, tmp_path / "o2", show_progress=False)
    wider = _hf_copy(directory, tmp_path / "wider", config_changes={"intermediate_size": 192})
    with pytest.raises(InputError, match=r"dense_h_to_4h.weight has shape \(128, 64\), config"):
        convert.from_hf(wider, tmp_path / "o3", show_progress=False)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(InputError, match="no model.safetensors"):
        convert.from_hf(no_weights, tmp_path / "o4", show_progress=False)
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


def test_a_failed_conversion_leaves_no_output(run, hf_model_dir, tmp_path, monkeypatch):
    workdir, _, _ = run
    calls = []

    def fail_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = ShardedSafetensorsWriter.write_box
    monkeypatch.setattr(ShardedSafetensorsWriter, "write_box", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        convert.to_hf(workdir, tmp_path / "hf", show_progress=False)
    monkeypatch.undo()

    calls.clear()
    original = CheckpointWriter.write
    monkeypatch.setattr(CheckpointWriter, "write", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        convert.from_hf(hf_model_dir[0], tmp_path / "run", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no hidden leftovers


def test_a_truncated_checkpoint_chunk_is_reported(tmp_path):
    config = run_config()
    params = random_params(ModelConfig.from_config(config.model), 17)
    workdir = tmp_path / "run"
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(
            workdir / "checkpoints" / "0" / "params", args=ocp.args.PyTreeSave(params)
        )
    (workdir / "config.json").write_text(config.to_json_best_effort())
    chunk = workdir / "checkpoints" / "0" / "params" / "layers.mlp.up_kernel" / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(InputError, match=r"layers.mlp.up_kernel/0.0.0 .*(truncated|corrupt)"):
        convert.to_hf(workdir, tmp_path / "hf", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _word_tokenizer(directory: pathlib.Path, vocab: dict[str, int]) -> pathlib.Path:
    """A tokenizer.json with exactly `vocab` (plus `<|endoftext|>` at id 1: load_tokenizer needs an eos)."""
    from tokenizers import Tokenizer, models

    directory.mkdir()
    vocab = {"<pad>": 0, "<|endoftext|>": 1, **vocab}
    Tokenizer(models.WordLevel(vocab, unk_token="<pad>")).save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize(
    "vocab, ids",
    [
        ({f"w{i}": i for i in range(2, 97)}, 97),  # one id more than the model's 96
        ({f"w{i}": i for i in range(2, 30003)}, 30003),  # the released tokenizer's count
        ({"far": 200}, 201),  # three tokens, but id 200 does not fit either
    ],
)
def test_to_hf_refuses_a_tokenizer_larger_than_the_vocab(run, tmp_path, vocab, ids):
    workdir, _, _ = run
    tokenizer = _word_tokenizer(tmp_path / "tok", vocab)
    out = tmp_path / "hf"
    message = (
        rf"tokenizer {re.escape(str(tokenizer))} has {ids} token ids, more than the model's "
        r"config\.model\.vocab_size=96"
    )
    with pytest.raises(ConfigError, match=message):
        convert.to_hf(workdir, out, tokenizer=str(tokenizer), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # nothing written


def test_to_hf_takes_a_tokenizer_that_fills_the_vocab(run, tmp_path):
    workdir, _, _ = run
    tokenizer = _word_tokenizer(tmp_path / "tok", {f"w{i}": i for i in range(2, 96)})
    convert.to_hf(workdir, tmp_path / "hf", tokenizer=str(tokenizer), show_progress=False)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (
        tokenizer / "tokenizer.json"
    ).read_bytes()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 0}, r"num_attention_heads=0 must be a positive integer"),
        ({"hidden_size": "64"}, r"hidden_size='64' must be a positive integer"),
        ({"num_hidden_layers": None}, r"num_hidden_layers=None must be a positive integer"),
        ({"vocab_size": True}, r"vocab_size=True must be a positive integer"),
        ({"rope_parameters": [10000]}, r"rope_parameters=\[10000\] must be a JSON object"),
        (
            {"rope_parameters": {"partial_rotary_factor": 0.0}},
            r"rope_parameters\.partial_rotary_factor=0\.0 must be a finite number within \(0, 1\]",
        ),
    ],
)
def test_from_hf_malformed_config_json_names_file_and_field(
    hf_model_dir, tmp_path, changes, message
):
    directory, _, _ = hf_model_dir
    bad = _hf_copy(directory, tmp_path / "bad", config_changes=changes)
    with pytest.raises(InputError, match=re.escape(str(bad / "config.json")) + ": " + message):
        convert.from_hf(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '"config"', "null"])
def test_from_hf_config_json_that_is_not_an_object(hf_model_dir, tmp_path, text):
    directory, _, _ = hf_model_dir
    bad = _hf_copy(directory, tmp_path / "bad")
    (bad / "config.json").write_text(text)
    with pytest.raises(InputError, match=r"config\.json: not a JSON object"):
        convert.from_hf(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_from_hf_refuses_two_output_projections(hf_model_dir, tmp_path):
    directory, _, _ = hf_model_dir
    bad = _hf_copy(directory, tmp_path / "bad")
    tensors = read_safetensors(bad)
    tensors["lm_head.weight"] = tensors["embed_out.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(InputError, match="holds both embed_out.weight and lm_head.weight"):
        convert.from_hf(bad, tmp_path / "out", show_progress=False)


def _sharded_copy(source: pathlib.Path, target: pathlib.Path, index) -> pathlib.Path:
    """`source`'s tensors in one shard file with the given index (a weight_map or anything)."""
    _hf_copy(source, target)
    (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    return target


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (["model-00001-of-00001.safetensors"], r"weight_map must be a non-empty JSON object"),
        ({}, r"weight_map must be a non-empty JSON object"),
        ("model-00001-of-00001.safetensors", r"weight_map must be a non-empty JSON object"),
        ({"embed_out.weight": "../x.safetensors"}, r"'\.\./x\.safetensors' names a file outside"),
        ({"embed_out.weight": "a/../../x.safetensors"}, r"names a file outside"),
        ({"embed_out.weight": "/etc/x.safetensors"}, r"'/etc/x\.safetensors' names a file outside"),
        ({"embed_out.weight": 5}, r"weight_map\['embed_out\.weight'\]=5 is not a file name"),
        ({"embed_out.weight": "model-00002-of-00002.safetensors"}, r"which does not exist"),
    ],
)
def test_a_bad_weight_index_is_named(hf_model_dir, tmp_path, weight_map, message):
    directory, _, _ = hf_model_dir
    bad = _sharded_copy(directory, tmp_path / "bad", {"weight_map": weight_map})
    index = re.escape(str(bad / "model.safetensors.index.json"))
    with pytest.raises(InputError, match=f"{index}.*{message}"):
        HFWeights(bad)
    with pytest.raises(InputError, match=message):
        convert.from_hf(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("index", [[], {"metadata": {}}, "weights"])
def test_an_index_without_a_weight_map(hf_model_dir, tmp_path, index):
    directory, _, _ = hf_model_dir
    bad = _sharded_copy(directory, tmp_path / "bad", index)
    with pytest.raises(
        InputError, match=r"index\.json: not a weight index \(no weight_map field\)"
    ):
        HFWeights(bad)


def test_a_good_weight_index_still_reads(hf_model_dir, tmp_path):
    directory, _, _ = hf_model_dir
    keys = list(read_safetensors(directory))
    good = _sharded_copy(
        directory,
        tmp_path / "good",
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}},
    )
    assert sorted(HFWeights(good).keys()) == sorted(keys)
    convert.from_hf(good, tmp_path / "out", show_progress=False)


def _save_sharded_bin(model, directory: pathlib.Path, shards: int) -> None:
    """HF's sharded pickle layout (transformers 5 writes only safetensors): pytorch_model-0000i-of-
    0000n.bin files plus pytorch_model.bin.index.json with its weight_map."""
    directory.mkdir()
    model.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    weight_map = {k: names[i % shards] for i, k in enumerate(state)}
    for name in names:
        torch.save({k: v for k, v in state.items() if weight_map[k] == name}, directory / name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_hf_of_sharded_checkpoints_equals_transformers(hf_model_dir, tmp_path, safe):
    """Several shards and an index: safetensors as save_pretrained writes them, or .bin pickles."""
    _, cfg, model = hf_model_dir
    directory = tmp_path / "sharded"
    if safe:
        model.save_pretrained(directory, max_shard_size="40KB")
    else:
        _save_sharded_bin(model, directory, shards=4)
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    shards = set(json.loads((directory / index).read_text())["weight_map"].values())
    assert len(shards) >= 3 and all((directory / s).is_file() for s in shards), shards
    assert not list(directory.glob("model.safetensors")) and not list(
        directory.glob("pytorch_model.bin")
    )
    convert.from_hf(directory, tmp_path / "run", show_progress=False)
    ours = our_logits(restore(tmp_path / "run", cfg), cfg)
    assert np.max(np.abs(ours - hf_logits(load_hf(directory), TOKENS))) <= 1e-4
    assert np.max(np.abs(ours - hf_logits(model, TOKENS))) <= 1e-4


_NO_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _NoTorch())
for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
    del sys.modules[name]
from polyglot_jax.cli import main
main(["polyglot-jax", *sys.argv[1:]])
assert "torch" not in sys.modules
"""


def test_to_hf_needs_no_torch(run, tmp_path):
    import subprocess
    import sys

    workdir, cfg, params = run
    out = tmp_path / "hf"
    args = ["convert", "to-hf", f"--workdir={workdir}", f"--out={out}", "--dtype=float32"]
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[2], timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The blocker works: the same bootstrap cannot import torch.
    probe = _NO_TORCH.split("from polyglot_jax")[0] + "import torch\n"
    blocked = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert blocked.returncode == 1 and "blocked by the test" in blocked.stderr
    diff = np.max(np.abs(our_logits(params[5], cfg) - hf_logits(load_hf(out), TOKENS)))
    assert diff <= 1e-4
