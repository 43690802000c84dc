"""Config files (`configs/*.py`, ml-collections): the shared base, loading by path, validation.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`; `--config=configs/x.py:arg`
passes `arg` (a variant), and `--config.a.b=v` overrides any field (ml_collections `config_flags`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import numbers
import pathlib
import traceback
from typing import Any

import ml_collections
from absl import logging

from polyglot_jax.data.pipeline import default_data_config
from polyglot_jax.distributed import distributed_settings
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig, abstract_params
from polyglot_jax.optimizer import DECAYS
from polyglot_jax.partitioning import (
    axis_size,
    check_divisibility,
    resolve_mesh_shape,
    rules_from_config,
)

# jax.random.key keeps 32 bits of the seed without x64: 2**32 would silently equal 0.
SEED_LIMIT = 2**32


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
    # Resume a workdir although the data, batch, optimizer or schedule settings changed (a warning
    # lists them; changed data starts from its beginning). Model shapes can never change.
    c.train.allow_config_change = False
    c.train.peak_flops_per_device = 0.0  # for MFU; 0: look the device kind up in flops.py
    c.train.profile_steps = (0, 0)  # (first step, count): jax.profiler trace into workdir/profile
    # XLA's persistent compilation cache: a rerun or resume of the same config compiles nothing.
    # "" = $JAX_COMPILATION_CACHE_DIR when set, else WORKDIR/xla_cache; "off" = none.
    c.train.compilation_cache_dir = ""
    c.train.spike_threshold = 0.5  # warn when the loss rises 50% above its running average...
    c.train.drop_threshold = 0.2  # ...or falls 20% below it
    c.train.spike_halflife = 50  # steps: the average's half-life; this many calm ones end a warning

    # Tokenized shards and how batches are built; every key is documented in data/pipeline.py.
    c.data = default_data_config()

    # Validation loss on held-out data (eval_loss, eval_perplexity in metrics.jsonl / TensorBoard).
    c.eval = ml_collections.ConfigDict()
    # Steps between evaluations (after steps N, 2N, ... and the last; never at step 0); 0 = off.
    c.eval.eval_every = 0
    # Global batches of batch_size held-out rows per evaluation: the first ones of the held-out
    # stream (stored order, no shuffle), built once and reused, so every evaluation sees the same.
    c.eval.eval_batches = 10
    # Held-out data, either (not both): tokenized directories of their own (like data.shards)...
    c.eval.data = ()
    # ...or this share of config.data's documents, held out of training by a seeded hash of each
    # document's content (data/pipeline.py gives the rule). Changes the training data whenever > 0,
    # also with eval_every = 0; 0 = none held out.
    c.eval.holdout_fraction = 0.0
    c.eval.holdout_seed = 0  # the hash's seed: another seed, another split (not the data order)
    # The broken-generation monitor (eval/monitor.py): every N steps (and the last), greedy
    # continuations of fixed prompts; repetition metrics (gen_*) and the texts (gen_samples) go to
    # metrics.jsonl and TensorBoard, with a warning when they look broken. 0 = off.
    c.eval.generation_every = 0
    c.eval.generation_prompts = ("대한민국의 수도는", "옛날 옛적에 한 마을에", "오늘 날씨가")
    c.eval.generation_max_new_tokens = 64  # per prompt; prompt + this must fit config.model.max_len

    # Multi-process runs (distributed.py, watchdog.py); one process ignores these.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialization_timeout_s = 300  # start-up waits this long for every process
    # A peer silent this long is lost: every other process exits (code 3) naming it, within this
    # plus a few seconds. JAX's own heartbeat is set to twice this, as the backstop.
    c.distributed.heartbeat_timeout_s = 60
    # No step finished on a process this long (after its first; checkpoints and evaluations
    # between steps count): it exits naming the slowest processes (a peer alive but stuck). 0: off.
    c.distributed.step_timeout_s = 1800

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
    """Loads `path/to/config.py` or `path/to/config.py:arg` (what `--config=` takes).

    Anything wrong with the file is one InputError `path:line: Type: message`."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        module_spec = importlib.util.spec_from_file_location(f"_polyglot_config_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise InputError(f"config file {path} defines no get_config()")
        config = module.get_config(arg) if arg else module.get_config()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file raises becomes one line naming it
        raise InputError(describe_load_error(e, path, arg or None)) from e
    check_loaded(config, path)
    return config


def get_config_line(path: str) -> int:
    """The line of `def get_config` in a config file (1 when it cannot be found)."""
    try:
        tree = ast.parse(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return 1
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_config":
            return node.lineno
    return 1


def check_loaded(config: Any, path: str) -> None:
    """What `get_config()` returned must be a ConfigDict; InputError `path:line: ...` otherwise."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(
            f"{path}:{get_config_line(path)}: get_config() returned "
            f"{'None' if config is None else type(config).__name__}, not an ml_collections.ConfigDict"
        )


def describe_load_error(exc: BaseException, path: str, variant: str | None = None) -> str:
    """`path:line: Type: message` for an exception raised while loading the config file `path`.

    The line is that of the innermost frame in the file (the original error, not the wrappers that
    ml_collections and absl put around TypeError/ValueError), the syntax error's line, or else the
    `def get_config` line (e.g. a `:variant` passed to a get_config() that takes no argument)."""
    target = pathlib.Path(path).resolve()

    def in_file(name: str | None) -> bool:
        return bool(name) and pathlib.Path(name).resolve() == target

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):  # the original error first
        if isinstance(e, SyntaxError) and in_file(e.filename):
            return f"{path}:{e.lineno}: {type(e).__name__}: {e.msg}"
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if in_file(f.filename)]
        if lines:
            return f"{path}:{lines[-1]}: {type(e).__name__}: {_first_line(e)}"
    original = chain[-1]
    message = f"{path}:{get_config_line(path)}: {type(original).__name__}: {_first_line(original)}"
    if variant is not None and isinstance(original, TypeError):
        message += f" (the variant {variant!r} was passed to get_config)"
    return message


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


def _check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real within the given bounds, else ConfigError naming `config.train.<name>`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        where = f"within {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        where = f"{'>' if low_open else '>='} {low:g}"
    else:
        where = f"{'<' if high_open else '<='} {high:g}"
    raise ConfigError(f"config.train.{name}={value!r} must be a finite number {where}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_train(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh_shape: dict[str, int]
) -> None:
    """The train section, alone and against the model and the mesh; one ConfigError naming the field.

    A warmup longer than the run is not an error: the schedule clips it to `steps` (with a warning),
    so that a short run of any config (`--config.train.steps=5`) just works."""
    if "train" not in config:
        raise ConfigError("config needs the section config.train")
    t = config.train
    positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every")
    for name in (*positive, "loss_chunk", "keep_checkpoints"):
        if not _is_int(t[name]) or t[name] <= 0:
            raise ConfigError(f"config.train.{name}={t[name]!r} must be a positive int")
    for name in ("warmup_steps", "keep_every", "spike_halflife"):
        if not _is_int(t[name]) or t[name] < 0:
            raise ConfigError(f"config.train.{name}={t[name]!r} must be an int >= 0")
    if not _is_int(t.seed) or not 0 <= t.seed < SEED_LIMIT:
        raise ConfigError(f"config.train.seed={t.seed!r} must be an int within [0, 2**32)")
    _check_number("lr", t.lr, 0.0)
    _check_number("b1", t.b1, 0.0, 1.0, high_open=True)
    _check_number("b2", t.b2, 0.0, 1.0, high_open=True)
    _check_number("eps", t.eps, 0.0, low_open=True)
    for name in ("weight_decay", "clip_norm", "z_loss", "peak_flops_per_device"):
        _check_number(name, t[name], 0.0)
    _check_number("min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
    _check_number("spike_threshold", t.spike_threshold, 0.0)
    _check_number("drop_threshold", t.drop_threshold, 0.0, 1.0)
    if t.decay not in DECAYS:
        raise ConfigError(f"config.train.decay={t.decay!r} is not one of {DECAYS}")
    if t.nan_policy not in ("halt", "skip"):
        raise ConfigError(
            f"config.train.nan_policy={t.nan_policy!r} is not one of ('halt', 'skip')"
        )
    if not isinstance(t.get("compilation_cache_dir", ""), str):
        raise ConfigError(
            f"config.train.compilation_cache_dir={t.compilation_cache_dir!r} must be a path, '' "
            "(the default place) or 'off'"
        )
    profile = tuple(t.profile_steps) if isinstance(t.profile_steps, list | tuple) else None
    if profile is None or len(profile) != 2 or not all(_is_int(x) and x >= 0 for x in profile):
        raise ConfigError(
            f"config.train.profile_steps={t.profile_steps!r} must be (first step, count), "
            "two ints >= 0"
        )
    if t.seq_len > model_cfg.max_len:
        raise ConfigError(
            f"config.train.seq_len={t.seq_len} exceeds config.model.max_len={model_cfg.max_len}"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} is not divisible by grad_accum={t.grad_accum}"
        )
    batch_devices = axis_size(mesh_shape, "data") * axis_size(mesh_shape, "fsdp")
    micro = t.batch_size // t.grad_accum
    if micro % batch_devices:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} / grad_accum={t.grad_accum} = {micro} sequences per "
            f"microbatch is not divisible by the data x fsdp mesh axes (size {batch_devices})"
        )
    if t.warmup_steps > t.steps:
        logging.warning(
            "config.train.warmup_steps=%d is longer than the run (steps=%d): the learning rate "
            "warms up over all %d steps and never decays",
            t.warmup_steps,
            t.steps,
            t.steps,
        )


def check_data(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, *, missing_ok: bool = False
) -> None:
    """The data section, without preparing anything: one ConfigError/InputError naming the field.

    Every tokenized directory's manifest must be readable and its ids must fit the model's
    vocabulary; the built-in sample is checked by the vocabulary it will be tokenized with.
    `missing_ok` skips directories that do not exist here (`info` on a machine without the data).
    """
    from polyglot_jax.data.pipeline import MODES
    from polyglot_jax.data.record_stream import BUILTIN
    from polyglot_jax.data.records import read_manifest
    from polyglot_jax.data.sample import SAMPLE_VOCAB_SIZE

    d = config.data
    if d.get("mode", "concat") not in MODES:
        raise ConfigError(f"config.data.mode={d.mode!r}; choose one of {MODES}")
    for name in ("shuffle_buffer", "prefetch"):
        value = d.get(name, 1)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < (name == "shuffle_buffer")
        ):
            raise ConfigError(
                f"config.data.{name}={value!r} must be an int >= {int(name == 'shuffle_buffer')}"
            )
    shards = (d.shards,) if isinstance(d.get("shards"), str) else tuple(d.get("shards", ()))
    if not shards:
        raise ConfigError("config.data.shards is empty: name tokenized directories or 'builtin'")
    weights = tuple(d.get("weights", ()))
    if weights and len(weights) != len(shards):
        raise ConfigError(
            f"config.data.weights has {len(weights)} entries for {len(shards)} shards directories"
        )
    for entry in shards:
        if entry == BUILTIN:
            ids, where = SAMPLE_VOCAB_SIZE, "the built-in sample's tokenizer"
        elif missing_ok and not pathlib.Path(entry).exists():
            continue
        else:
            ids, where = read_manifest(entry)["vocab_size"], f"the tokenizer that made {entry}"
        if ids > model_cfg.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the {ids} token "
                f"ids of {where}"
            )


def check_eval(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, *, missing_ok: bool = False
) -> None:
    """The eval section (absent: no evaluation): one ConfigError naming the field.

    Held-out directories are checked like `check_data`'s (`missing_ok` likewise) and must not be
    training directories."""
    from polyglot_jax.data.record_stream import BUILTIN
    from polyglot_jax.data.records import read_manifest

    e = config.get("eval")
    if e is None:
        return
    every, batches = e.get("eval_every", 0), e.get("eval_batches", 1)
    if not _is_int(every) or every < 0:
        raise ConfigError(f"config.eval.eval_every={every!r} must be an int >= 0 (0: off)")
    if not _is_int(batches) or batches <= 0:
        raise ConfigError(f"config.eval.eval_batches={batches!r} must be a positive int")
    gen_every = e.get("generation_every", 0)
    if not _is_int(gen_every) or gen_every < 0:
        raise ConfigError(
            f"config.eval.generation_every={gen_every!r} must be an int >= 0 (0: off)"
        )
    gen_new = e.get("generation_max_new_tokens", 64)
    if not _is_int(gen_new) or not 0 < gen_new < model_cfg.max_len:
        raise ConfigError(
            f"config.eval.generation_max_new_tokens={gen_new!r} must be an int within "
            f"[1, config.model.max_len={model_cfg.max_len})"
        )
    prompts = e.get("generation_prompts", ())
    if gen_every and (
        not isinstance(prompts, list | tuple)
        or not prompts
        or not all(isinstance(p, str) and p for p in prompts)
    ):
        raise ConfigError(
            f"config.eval.generation_prompts={prompts!r} must be non-empty texts (a tuple)"
        )
    fraction = e.get("holdout_fraction", 0.0)
    ok = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
    if not (ok and math.isfinite(fraction) and 0 <= fraction < 1):
        raise ConfigError(
            f"config.eval.holdout_fraction={fraction!r} must be a number within [0, 1)"
        )
    seed = e.get("holdout_seed", 0)
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"config.eval.holdout_seed={seed!r} must be an int within [0, 2**32)")
    data = e.get("data") or ()
    data = (data,) if isinstance(data, str) else data
    if not isinstance(data, list | tuple) or not all(isinstance(d, str) and d for d in data):
        raise ConfigError(f"config.eval.data={e.get('data')!r} must name tokenized directories")
    if data and fraction:
        raise ConfigError(
            f"config.eval.data={tuple(data)!r} and config.eval.holdout_fraction={fraction!r} "
            "both give held-out data: set one of them"
        )
    if every and not data and not fraction:
        raise ConfigError(
            f"config.eval.eval_every={every} needs held-out data: set config.eval.data (tokenized "
            "directories) or config.eval.holdout_fraction (a share of config.data's documents)"
        )
    shards = config.data.get("shards", ())
    shards = (shards,) if isinstance(shards, str) else tuple(shards)
    trained = {s if s == BUILTIN else pathlib.Path(s).resolve() for s in shards}
    for entry in data:
        if (entry if entry == BUILTIN else pathlib.Path(entry).resolve()) in trained:
            raise ConfigError(
                f"config.eval.data={entry!r} is training data (config.data.shards); hold part of "
                "it out with config.eval.holdout_fraction instead"
            )
        if entry == BUILTIN or (missing_ok and not pathlib.Path(entry).exists()):
            continue  # (make_eval_dataset compares its tokenizer with the training data's)
        ids = read_manifest(entry)["vocab_size"]
        if ids > model_cfg.vocab_size:
            raise ConfigError(
                f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the {ids} token "
                f"ids of the tokenizer that made config.eval.data {entry}"
            )


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
    rules = rules_from_config(config.mesh.get("rules", ()))
    fields = {  # the config field behind each logical axis, in the order they are reported
        "heads": ("config.model.num_heads", model_cfg.num_heads),
        "vocab": ("config.model.vocab_size", model_cfg.vocab_size),
        "mlp": ("config.model.d_ff", model_cfg.d_ff),
        "embed": ("config.model.d_model", model_cfg.d_model),
        "kv": ("head_dim (config.model.d_model / num_heads)", model_cfg.head_dim),
        "layers": ("config.model.num_layers", model_cfg.num_layers),
    }
    check_divisibility(abstract_params(model_cfg), mesh_shape, rules, fields)
    return model_cfg, mesh_shape


@dataclasses.dataclass(frozen=True)
class Run:
    """A config checked as a whole: the model and the resolved mesh a run starts from."""

    model: ModelConfig
    mesh_shape: dict[str, int]


def validate_run(
    config: ml_collections.ConfigDict, num_devices: int, *, this_machine: bool = True
) -> Run:
    """Every check, in one place: model, mesh and rules (`validate`), the train, data, eval and
    distributed sections, and, with `this_machine`, the attention kernel against this backend and every data directory
    (`info` passes False: a config may describe another machine). One error naming the field."""
    from polyglot_jax.attention import check_attention_backend

    model_cfg, mesh_shape = validate(config, num_devices)
    check_train(config, model_cfg, mesh_shape)
    check_data(config, model_cfg, missing_ok=not this_machine)
    check_eval(config, model_cfg, missing_ok=not this_machine)
    distributed_settings(config)
    if this_machine:
        check_attention_backend(model_cfg.attention_impl)
    return Run(model_cfg, mesh_shape)
