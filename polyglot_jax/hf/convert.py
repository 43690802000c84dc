"""Checkpoint conversion, streaming: an orbax run directory <-> a Hugging Face GPT-NeoX directory.

`to_hf` reads the `params` of `workdir/checkpoints/<step>` one storage chunk (or one layer row of
it) at a time and writes each piece straight into its place in preallocated safetensors files;
`from_hf` reads one HF tensor at a time and writes it as one layer row of an orbax checkpoint. No
whole model is ever in memory, and no torch is needed (except to read `pytorch_model.bin`, and for
`verify_*`, which load both models to compare logits).

What goes where is `mapping.tensor_specs`: each HF tensor, our key path and (for scanned layers)
the row of the stacked [layers, ...] parameter. A piece of our array becomes a box of the HF tensor
through the axis order that the spec's `to_hf` realises (derived once by running `to_hf` on a small
index array), so checkpoints whose chunks cut tensors anywhere (any mesh) convert on one CPU.

Outputs are assembled in a hidden sibling directory and renamed into place at the end, so a failed
or interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from tqdm import tqdm

from polyglot_jax.checkpoint import first_line, unreadable_cause
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.hf import mapping
from polyglot_jax.hf.files import (
    HFWeights,
    ShardedSafetensorsWriter,
    TensorEntry,
    parse_size,
    read_hf_config,
)
from polyglot_jax.hf.model_card import check_card_inputs, write_model_card
from polyglot_jax.hf.orbax_arrays import CheckpointReader, CheckpointWriter, write_step_metadata
from polyglot_jax.model import ModelConfig
from polyglot_jax.output_dir import check_output, staged
from polyglot_jax.workdir import load_run_config, previous_step_hint, run_tokenizer, step_directory

OUTPUT_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}
PARAM_DTYPES = OUTPUT_DTYPES  # config.model.param_dtype names the same three
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_EOS_ID = 2  # the released models' <|endoftext|>
DEFAULT_BOS_ID = 0  # as in the released models' config.json


@dataclasses.dataclass(frozen=True)
class Converted:
    """What a conversion wrote: the output directory, its weight files, tensor bytes, seconds."""

    out: pathlib.Path
    files: list[pathlib.Path]
    tensor_bytes: int
    seconds: float
    step: int | None = None


# ---------------------------------------------------------------- our parameters, grouped by spec


def _stacked(spec: mapping.TensorSpec) -> bool:
    """True when the spec is one row of a scanned [layers, ...] parameter (mapping's rule)."""
    return spec.layer is not None and spec.path[0] == "layers"


def _specs_by_path(cfg: ModelConfig) -> dict[tuple[str, ...], list[mapping.TensorSpec]]:
    groups: dict[tuple[str, ...], list[mapping.TensorSpec]] = {}
    for spec in mapping.tensor_specs(cfg):
        groups.setdefault(spec.path, []).append(spec)
    return groups


def _stored_shape(group: list[mapping.TensorSpec]) -> tuple[int, ...]:
    """The shape of our parameter: one spec's shape, or [layers, ...] for a scanned stack."""
    return (len(group), *group[0].ours_shape) if _stacked(group[0]) else group[0].ours_shape


def _check_checkpoint(reader: CheckpointReader, groups: dict, where: pathlib.Path) -> None:
    """Every parameter the config implies is present with its shape, and nothing else is."""
    stored = set(reader.paths)
    extra = sorted(".".join(p) for p in stored - set(groups))
    if extra:
        raise InputError(
            f"{where}: parameter(s) {', '.join(extra[:4])} are not in the model that config.json "
            "describes (check config.model, e.g. scan_layers)"
        )
    for path, group in groups.items():
        name = ".".join(path)
        if path not in stored:
            raise InputError(f"{where}: parameter {name} is missing from the checkpoint")
        shape, want = reader.shape(path), _stored_shape(group)
        if shape != want:
            raise InputError(
                f"{where}: parameter {name} has shape {shape}, config.json implies {want}"
            )


# ---------------------------------------------------------------- our layout -> HF boxes


def _kind(hf_key: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", hf_key)


@functools.cache
def _axis_orders() -> dict[str, tuple[int, ...]]:
    """For each kind of tensor, the permutation p of our axes with to_hf(x) == x.transpose(p)
    read row-major, found by running the real `to_hf` on an index array of a small model whose
    dimensions all differ (so only the true permutation matches)."""
    probe = ModelConfig(vocab_size=11, num_layers=1, d_model=8, d_ff=10, num_heads=2, rotary_dim=2)
    orders = {}
    for spec in mapping.tensor_specs(probe):
        x = np.arange(math.prod(spec.ours_shape)).reshape(spec.ours_shape)
        hf = np.asarray(spec.to_hf(x)).reshape(-1)
        for perm in itertools.permutations(range(x.ndim)):
            if np.array_equal(x.transpose(perm).reshape(-1), hf):
                break
        else:
            raise RuntimeError(f"{spec.hf_key}: to_hf is not an axis permutation of our layout")
        view = hf.reshape([spec.ours_shape[i] for i in perm]).transpose(np.argsort(perm))
        if not np.array_equal(spec.from_hf(hf.reshape(spec.hf_shape)), view):
            raise RuntimeError(f"{spec.hf_key}: from_hf is not the inverse of to_hf")
        orders[_kind(spec.hf_key)] = perm
    return orders


def axis_order(spec: mapping.TensorSpec) -> tuple[int, ...]:
    """The permutation p of our (one-layer) axes such that the HF tensor, read row-major, is our
    array transposed by p: a box of ours lands in the same box of the HF tensor viewed with shape
    `ours_shape[p]`."""
    return _axis_orders()[_kind(spec.hf_key)]


def hf_view_shape(spec: mapping.TensorSpec) -> tuple[int, ...]:
    """The shape under which the HF tensor is our (one-layer) array with permuted axes."""
    return tuple(spec.ours_shape[i] for i in axis_order(spec))


def ours_view(spec: mapping.TensorSpec, hf_tensor: np.ndarray) -> np.ndarray:
    """`spec.from_hf(hf_tensor)` as a strided view (no copy): the copy that casts to our dtype
    then does the transposition in the same pass."""
    return hf_tensor.reshape(hf_view_shape(spec)).transpose(np.argsort(axis_order(spec)))


# ---------------------------------------------------------------- output files


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _copy_tokenizer(source: pathlib.Path, target: pathlib.Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


# The special tokens transformers knows by name (4.x and 5.x alike).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# A class name transformers 4.x resolves; every exported tokenizer is a tokenizer.json, which is
# what this class loads in both major versions.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _read_json_object(file: pathlib.Path) -> dict[str, Any]:
    """A tokenizer side file as a dict ({} when absent); InputError naming it when not an object."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{file}: not a JSON object ({type(data).__name__})")
    return data


def portable_tokenizer_files(
    config: dict[str, Any], special_map: dict[str, Any], eos_token: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`tokenizer_config.json` and `special_tokens_map.json` contents that transformers 4.x and
    5.x both load into the same tokenizer, from a tokenizer directory's own (either may be {}).

    transformers 5 saves `tokenizer_class: TokenizersBackend` (a class 4.x does not have: "does
    not exist or is not currently imported") and its extra special tokens as an
    `extra_special_tokens` list (4.x reads that key as a dict of named tokens: "'list' object has
    no attribute 'keys'"). Here the class becomes `PreTrainedTokenizerFast` (kept when it is
    another class name that both versions know), the list becomes `additional_special_tokens`
    (the name both versions read), and the 5-only `backend` key goes. A tokenizer that names no
    eos gets `eos_token` (the one `load_tokenizer` resolved, which config.json's eos_token_id is)."""
    config = dict(config)
    name = config.get("tokenizer_class")
    if not isinstance(name, str) or not name or name.endswith("Backend"):
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config.pop("backend", None)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        additional = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
    if "eos_token" not in config and "eos_token" not in special_map:
        config["eos_token"] = eos_token
    special_map = dict(special_map)
    for key in (*NAMED_SPECIAL_TOKENS, "additional_special_tokens"):
        if key not in special_map and config.get(key) not in (None, []):
            special_map[key] = config[key]
    return config, special_map


def _export_tokenizer(source: pathlib.Path, target: pathlib.Path, eos_token: str) -> None:
    """The run's tokenizer into an HF directory, loadable by transformers 4.x and 5.x: tokenizer.json
    as it is, the two side files from `portable_tokenizer_files` (a file that needs no change is
    copied byte for byte, as the released Polyglot-Ko files are)."""
    shutil.copyfile(source / "tokenizer.json", target / "tokenizer.json")
    names = ("tokenizer_config.json", "special_tokens_map.json")
    originals = [_read_json_object(source / name) for name in names]
    for name, original, wanted in zip(
        names, originals, portable_tokenizer_files(*originals, eos_token), strict=True
    ):
        if wanted == original and (source / name).is_file():
            shutil.copyfile(source / name, target / name)
        else:
            _write_json(target / name, wanted)


# ---------------------------------------------------------------- orbax -> HF


def to_hf(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "float16",
    max_shard_size: str | int = "5GB",
    tokenizer: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    license: str | None = None,
    eval_results: Sequence[str | os.PathLike] = (),
) -> Converted:
    """Writes the checkpoint of `workdir` at `step` (default: the latest) as a Hugging Face
    GPTNeoXForCausalLM directory `out`: config.json, generation_config.json, safetensors weights
    in `dtype` (sharded above `max_shard_size`), the run's tokenizer files when known (in a form
    transformers 4.x and 5.x both load: `portable_tokenizer_files`) and a model card, README.md
    (`model_card.write_model_card`: `license` defaults to apache-2.0, `eval_results` are
    `eval kobest` result files, besides any the workdir holds).

    Peak memory: a few blocks of one layer's tensor (or ~64 MB of rows): checkpoint chunks in
    orbax's default format are decompressed as a stream, other formats through a one-chunk cache
    (orbax caps chunks at 2 GiB); the safetensors files are written in place, never held whole.
    """
    start = time.perf_counter()
    workdir, out = pathlib.Path(workdir).absolute(), pathlib.Path(out).absolute()
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {tuple(OUTPUT_DTYPES)}")
    out_dtype, shard_bytes = OUTPUT_DTYPES[dtype], parse_size(max_shard_size)
    config = load_run_config(workdir)
    if "model" not in config:
        raise InputError(f"{workdir / 'config.json'} has no model section")
    cfg = ModelConfig.from_config(config.model)
    check_card_inputs(license, eval_results)
    step, step_dir = step_directory(workdir, step)
    check_output(out, [workdir], overwrite=overwrite)
    hint = previous_step_hint(step_dir.parent, step)
    try:
        reader = CheckpointReader(step_dir / "params")
        groups = _specs_by_path(cfg)
        _check_checkpoint(reader, groups, step_dir)
    except InputError as e:
        raise InputError(f"{e}{hint}") from e
    tok_dir = run_tokenizer(config, workdir, tokenizer)
    eos, pad, eos_token = DEFAULT_EOS_ID, None, None
    if tok_dir is not None:
        from polyglot_jax.data.tokenizer import load_tokenizer

        loaded = load_tokenizer(tok_dir)
        eos, pad, eos_token = loaded.eos_id, loaded.pad_id, loaded.eos_token
        # Ids past the embedding would index out of range in transformers (gaps count too).
        vocab = loaded.tokenizer.get_vocab(with_added_tokens=True)
        ids = max(loaded.vocab_size, max(vocab.values(), default=-1) + 1)
        if ids > cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_dir} has {ids} token ids, more than the model's "
                f"config.model.vocab_size={cfg.vocab_size} (in {workdir / 'config.json'})"
            )

    specs = mapping.tensor_specs(cfg)
    entries = [TensorEntry(s.hf_key, out_dtype, s.hf_shape) for s in specs]
    total = sum(e.nbytes for e in entries)
    with staged(out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, entries, shard_bytes)
        try:
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="to-hf",
                disable=None if show_progress else True,
            ) as bar:
                for path, group in groups.items():
                    blocks = reader.blocks(path, single_rows=_stacked(group[0]))
                    _copy_parameter(_read_errors_named(blocks, step_dir, hint), group, writer)
                    bar.update(sum(math.prod(s.hf_shape) for s in group) * out_dtype.itemsize)
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        hf_config = mapping.to_hf_config(
            cfg, eos_token_id=eos, bos_token_id=DEFAULT_BOS_ID, torch_dtype=dtype
        )
        hf_config["dtype"] = dtype  # transformers 5's name for torch_dtype
        _write_json(tmp / "config.json", hf_config)
        generation = {"bos_token_id": DEFAULT_BOS_ID, "eos_token_id": eos, "do_sample": False}
        if pad is not None:
            generation["pad_token_id"] = pad
        _write_json(tmp / "generation_config.json", generation)
        if tok_dir is not None:
            _export_tokenizer(tok_dir, tmp, eos_token)
        write_model_card(
            tmp,
            workdir,
            config,
            cfg,
            name=out.name,
            step=step,
            dtype=dtype,
            tokenizer=tok_dir,
            eos_id=eos,
            license=license,
            eval_results=eval_results,
        )
    files = [out / f.name for f in files]
    return Converted(out, files, total, time.perf_counter() - start, step)


def _read_errors_named(blocks: Iterator[Any], step_dir: pathlib.Path, hint: str) -> Iterator[Any]:
    """`blocks`, with a damaged file (truncated, garbled) as one InputError naming the step."""
    try:
        yield from blocks
    except Exception as e:  # noqa: BLE001 - only what says a file cannot be read is renamed
        cause = unreadable_cause(e)
        if cause is None:
            raise
        raise InputError(f"checkpoint {step_dir} cannot be read ({first_line(cause)}){hint}") from e


def _copy_parameter(
    blocks: Iterator[tuple[Any, np.ndarray]],
    group: list[mapping.TensorSpec],
    writer: ShardedSafetensorsWriter,
) -> None:
    """Moves one of our parameters (all its layers, as `(index, block)` from the checkpoint) into
    the HF tensors it holds; the next block is decompressed in a background thread while this one
    is written."""
    stacked = _stacked(group[0])
    by_layer = {s.layer: s for s in group}
    for index, block in prefetched(blocks):
        if stacked:
            spec, box, piece = by_layer[index[0].start], index[1:], block[0]
        else:
            spec, box, piece = group[0], index, block
        perm = axis_order(spec)
        writer.write_box(
            spec.hf_key, hf_view_shape(spec), tuple(box[i] for i in perm), piece.transpose(perm)
        )


def prefetched(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """`items`, produced in a background thread up to `depth` ahead (decompression, reads and
    numpy copies release the GIL, so producing and consuming use two cores)."""
    done = object()
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            slots.put(e)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.1)
        thread.join()


# ---------------------------------------------------------------- HF -> orbax


def check_hf_tensors(
    weights: HFWeights, specs: list[mapping.TensorSpec], hf_dir: pathlib.Path
) -> dict[str, str]:
    """Canonical key -> stored key, after checking names and shapes (before anything is written)."""
    outputs = [k for k in weights.keys() if k in mapping.OUTPUT_KEYS]
    if len(outputs) > 1:  # both name the output projection: which one to take is a guess
        raise InputError(f"{hf_dir}: holds both {' and '.join(outputs)}; keep one of them")
    stored = mapping.normalize_hf_keys(weights.keys())
    unexpected = sorted(set(stored) - {s.hf_key for s in specs})
    if unexpected:
        raise InputError(
            f"{hf_dir}: tensor(s) {', '.join(unexpected[:4])} do not belong to the GPTNeoX model "
            "that config.json describes"
        )
    for spec in specs:
        if spec.hf_key not in stored:
            raise InputError(
                f"{hf_dir}: missing tensor {spec.hf_key} (expected shape {spec.hf_shape})"
            )
        shape = weights.shape(stored[spec.hf_key])
        if shape != spec.hf_shape:
            raise InputError(
                f"{hf_dir}: tensor {stored[spec.hf_key]} has shape {shape}, config.json implies "
                f"{spec.hf_shape}"
            )
    return stored


def run_config_for(
    hf_config: dict[str, Any], config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """`config` (default: the base config) with the model architecture of an HF config.json."""
    from polyglot_jax.config import base_config

    config = (config if config is not None else base_config()).copy_and_resolve_references()
    if "model" not in config:
        raise ConfigError("the config has no model section")
    for key, value in mapping.from_hf_config(hf_config).items():
        config.model[key] = value
    return config


def from_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: ml_collections.ConfigDict | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Converted:
    """Writes a Hugging Face GPT-NeoX directory as a run directory `out`: `config.json` (the
    architecture from the HF config, everything else from `config` or the base config),
    `checkpoints/0/params` (an orbax checkpoint in `config.model.param_dtype`) and, when the HF
    directory has one, its tokenizer under `out/tokenizer`. A new run continues from it with
    `--config.train.init_from=OUT`.

    Peak memory: one HF tensor plus three blocks (one layer row, or ~64 MB of rows).
    Stored uncompressed.
    """
    start = time.perf_counter()
    hf_dir, out = pathlib.Path(hf_dir).absolute(), pathlib.Path(out).absolute()
    if not hf_dir.is_dir():
        raise InputError(f"Hugging Face directory {hf_dir} does not exist")
    config = run_config_for(read_hf_config(hf_dir), config)
    cfg = ModelConfig.from_config(config.model)
    param_dtype = PARAM_DTYPES[cfg.param_dtype]
    check_output(out, [hf_dir], overwrite=overwrite)
    weights = HFWeights(hf_dir)
    specs = mapping.tensor_specs(cfg)
    stored = check_hf_tensors(weights, specs, hf_dir)
    groups = _specs_by_path(cfg)
    arrays = {path: (_stored_shape(g), param_dtype) for path, g in groups.items()}
    stacked = {path for path, g in groups.items() if _stacked(g[0])}
    total = sum(math.prod(s.hf_shape) * param_dtype.itemsize for s in specs)
    with staged(out) as tmp:
        step_dir = tmp / "checkpoints" / "0"
        writer = CheckpointWriter(step_dir / "params", arrays, row_chunked=stacked)
        blocks = _our_blocks(weights, stored, specs, writer, param_dtype)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="from-hf",
            disable=None if show_progress else True,
        ) as bar:
            for path, index, block in prefetched(blocks):
                writer.write(path, index, block, owned=True)  # each block is a fresh array
                bar.update(block.nbytes)
        weights.close()
        writer.finish()
        write_step_metadata(step_dir)
        if (hf_dir / "tokenizer.json").is_file():
            _copy_tokenizer(hf_dir, tmp / "tokenizer")
            if "data" in config and "tokenizer" in config.data:
                config.data.tokenizer = str(out / "tokenizer")
        (tmp / "config.json").write_text(
            config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        )
    files = [out / "checkpoints" / "0" / "params"]
    return Converted(out, files, total, time.perf_counter() - start, 0)


def _our_blocks(
    weights: HFWeights,
    stored: dict[str, str],
    specs: list[mapping.TensorSpec],
    writer: CheckpointWriter,
    dtype: np.dtype,
) -> Iterator[tuple[tuple[str, ...], tuple[slice, ...], np.ndarray]]:
    """(our key path, index, data in `dtype`) for every HF tensor: a layer row of a stacked
    parameter, or whole storage chunks (runs of rows) of an unstacked one. Memory: one HF tensor
    plus one block."""
    for spec in specs:
        view = ours_view(spec, weights.get(stored[spec.hf_key]))
        if _stacked(spec):
            block = np.empty((1, *view.shape), dtype)
            np.copyto(block[0], view, casting="same_kind")
            rest = tuple(slice(None) for _ in view.shape)
            yield spec.path, (slice(spec.layer, spec.layer + 1), *rest), block
            continue
        rows = writer.chunk_shape(spec.path)[0]  # our parameters all have an axis 0
        for start in range(0, len(view), rows):
            part = view[start : start + rows]
            block = np.empty(part.shape, dtype)
            np.copyto(block, part, casting="same_kind")
            rest = tuple(slice(None) for _ in view.shape[1:])
            yield spec.path, (slice(start, start + len(part)), *rest), block
        del view
