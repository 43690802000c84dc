"""Config files (`configs/*.py`, ml-collections): the shared base, loading by path, validation.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`; `--config=configs/x.py:arg`
passes `arg` (a variant), and `--config.a.b=v` overrides any field (ml_collections `config_flags`).
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from polyglot_jax.data.pipeline import default_data_config
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig
from polyglot_jax.partitioning import check_divisibility, resolve_mesh_shape


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every config, with the defaults that the size configs then specialise."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = (
        30080  # 30,003 tokenizer ids padded to a multiple of 128 (HF config: 30080)
    )
    c.model.num_layers = 24  # transformer blocks
    c.model.d_model = 2048  # hidden size
    c.model.d_ff = 8192  # MLP inner size (4 x d_model)
    c.model.num_heads = 16  # attention heads; head_dim = d_model / num_heads
    c.model.rotary_dim = (
        64  # RoPE on the first 64 dims of each head (rotary_pct 0.5 at head_dim 128)
    )
    c.model.rope_base = 10000.0  # RoPE base (HF rotary_emb_base)
    c.model.max_len = 2048  # context length trained on (HF max_position_embeddings)
    c.model.layer_norm_eps = 1e-5  # HF layer_norm_eps (Flax's default 1e-6 would differ)
    c.model.param_dtype = "float32"  # master weights
    c.model.dtype = "bfloat16"  # compute dtype of matmuls and activations
    # xla (reference) | cudnn | pallas (our kernels) | pallas_hopper (H100: Mosaic GPU kernels)
    c.model.attention_impl = "xla"
    c.model.scan_layers = True  # one compiled block scanned over layers: fast compiles at any depth
    c.model.remat_policy = (
        "none"  # none | full | dots | dots_no_batch: what the backward recomputes
    )

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 1024  # global batch in sequences (all microbatches together)
    c.train.seq_len = 2048  # tokens per sequence (each example holds seq_len + 1 for the shift)
    c.train.grad_accum = 1  # microbatches per step, scanned; batch_size must divide evenly
    c.train.seed = 0  # parameter init; the data order has its own seed (config.data.seed)
    c.train.lr = 2e-4  # peak learning rate (GPT-NeoX-style value; the report gives none)
    c.train.warmup_steps = 100  # linear warmup from 0
    c.train.decay = "cosine"  # cosine | linear: from lr after warmup to lr * min_lr_ratio at steps
    c.train.min_lr_ratio = 0.1  # the floor, as a fraction of lr
    c.train.b1 = 0.9  # AdamW
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.weight_decay = 0.01  # on weight matrices only (not biases, not LayerNorm)
    c.train.clip_norm = 1.0  # global gradient-norm clipping; 0 disables it
    c.train.z_loss = 0.0  # coefficient of log(Z)^2; 0 disables it
    c.train.loss_chunk = 512  # sequence positions per chunk of the vocab projection + softmax
    c.train.nan_policy = "halt"  # halt | skip: what a non-finite loss or gradient norm does
    c.train.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    c.train.checkpoint_every = 1000  # steps between (async) checkpoints; the last step always saves
    c.train.keep_checkpoints = 3  # the newest K checkpoints are kept...
    c.train.keep_every = 0  # ...plus every M-th step for good (0: none)
    c.train.async_checkpoints = True  # write checkpoints in the background
    c.train.init_from = ""  # workdir/checkpoint whose params seed a new run (continued pretraining)
    c.train.peak_flops_per_device = 0.0  # for MFU; 0: look the device kind up in flops.py
    c.train.profile_steps = (0, 0)  # (first step, count): jax.profiler trace into workdir/profile
    c.train.spike_threshold = 0.5  # warn when the loss rises 50% above its running average...
    c.train.drop_threshold = 0.2  # ...or falls 20% below it
    c.train.spike_halflife = 50  # steps; the running average's half-life

    # Tokenized shards and how batches are built; every key is documented in data/pipeline.py.
    c.data = default_data_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data parallelism within a node/slice; -1 takes the devices left over
    c.mesh.fsdp = 1  # parameters, gradients and optimizer state sharded (ZeRO-3 style)
    c.mesh.model = 1  # tensor parallelism over heads, d_ff and vocab
    c.mesh.dcn_data = 1  # the same three axes across nodes/slices (slow network): total = ici x dcn
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_model = 1
    # Logical axis -> mesh axes, first match wins and a mesh axis is used once per array (flax rules).
    # `batch` comes first so activations take fsdp for batch and leave `embed` unsharded, while
    # parameters (which have no batch axis) shard `embed` over fsdp.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "model"),
        ("heads", "model"),
        ("mlp", "model"),
        ("embed", "fsdp"),
        ("kv", None),
        ("length", None),
        ("layers", None),
    )
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py` or `path/to/config.py:arg` (what `--config=` takes)."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise InputError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_polyglot_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InputError(f"config file {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def validate(
    config: ml_collections.ConfigDict, num_devices: int
) -> tuple[ModelConfig, dict[str, int]]:
    """Checks everything that can be checked before compiling; one ConfigError naming the field.

    Returns the model config and the resolved mesh shape
    (`{'data', 'fsdp', 'model', 'dcn_data', 'dcn_fsdp', 'dcn_model'}`).
    """
    if "model" not in config or "mesh" not in config:
        raise ConfigError("config needs the sections config.model and config.mesh")
    model_cfg = ModelConfig.from_config(config.model)
    mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
    check_divisibility(model_cfg, mesh_shape)
    return model_cfg, mesh_shape
