"""Parameters for decoding, from a run's checkpoint or a Hugging Face directory: cast to the chosen
dtype, layers unstacked (`layers_0`, ... as with `scan_layers=False`, so that each decode step reads
a layer's weights where they are instead of copying a row out of a stacked array), and placed
straight into their shardings on the mesh. No whole model is ever on the host: a checkpoint is
restored by orbax into its shardings, a HF directory is read one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from polyglot_jax.errors import ConfigError
from polyglot_jax.model import DTYPES, ModelConfig, abstract_params
from polyglot_jax.partitioning import logical_shardings


def decode_config(cfg: ModelConfig, dtype: str | None) -> ModelConfig:
    """The model config generation runs: `dtype` (default: cfg's compute dtype) for compute and
    parameters alike, unscanned layers, no rematerialisation."""
    dtype = cfg.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
    return dataclasses.replace(
        cfg, dtype=dtype, param_dtype=dtype, scan_layers=False, remat_policy="none"
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh | None, rules: Sequence[tuple[str, Any]]) -> Any:
    """Where each parameter of `cfg` lives: by the logical rules on `mesh`, or on the first device."""
    boxed = abstract_params(cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(
            lambda _: device, nn.meta.unbox(boxed), is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    return logical_shardings(boxed, mesh, tuple(rules))


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """`{"layers": tree of [layers, ...]}` -> `{"layers_0": tree, ...}` (no copy beyond the rows)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def decode_params(params: Any, run_cfg: ModelConfig, cfg: ModelConfig, shardings: Any) -> Any:
    """A restored tree of `run_cfg` in `cfg`'s layout, dtype and shardings, one parameter at a time
    (each stacked parameter is dropped once its rows are out, so the peak is one parameter more)."""
    dtype = DTYPES[cfg.param_dtype]
    params = dict(params)
    out: dict[str, Any] = {}
    stacked = params.pop("layers", None) if run_cfg.scan_layers else None
    for name, tree in params.items():
        out[name] = jax.jit(
            lambda t: jax.tree.map(lambda x: x.astype(dtype), t), out_shardings=shardings[name]
        )(tree)
    if stacked is not None:
        layers = [f"layers_{i}" for i in range(cfg.num_layers)]
        flat, treedef = jax.tree.flatten(stacked)
        del stacked
        rows: list[list[Any]] = [[] for _ in layers]
        targets = [jax.tree.leaves(shardings[name]) for name in layers]
        for j in range(len(flat)):
            leaf, flat[j] = flat[j], None
            split = jax.jit(
                lambda x: tuple(x[i].astype(dtype) for i in range(len(layers))),
                out_shardings=tuple(t[j] for t in targets),
            )(leaf)
            del leaf
            for i, row in enumerate(split):
                rows[i].append(row)
        for i, name in enumerate(layers):
            out[name] = jax.tree.unflatten(treedef, rows[i])
    return out


def load_from_workdir(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = (),
) -> tuple[ModelConfig, Any, pathlib.Path | None]:
    """(decode config, params, tokenizer dir or None) of a run's checkpoint (latest by default);
    `dtype` defaults to the run's compute dtype."""
    from polyglot_jax.checkpoint import load_params
    from polyglot_jax.workdir import load_run_config, run_tokenizer

    config = load_run_config(workdir)
    run_cfg = ModelConfig.from_config(config.model)
    cfg = decode_config(run_cfg, dtype)
    params = load_params(workdir, step, run_cfg, param_shardings(run_cfg, mesh, rules))
    params = decode_params(params, run_cfg, cfg, param_shardings(cfg, mesh, rules))
    return cfg, params, run_tokenizer(config, pathlib.Path(workdir))


def hf_dtype(hf_config: dict[str, Any]) -> str:
    """The dtype a HF directory stores: config.json's `torch_dtype` (`dtype` in transformers 5)."""
    named = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(named, str) and named in DTYPES:
        return named
    return "float32"  # no (usable) field: transformers loads float32 too


def load_from_hf(
    hf_dir: str | pathlib.Path,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = (),
    progress: bool = False,
) -> tuple[ModelConfig, Any, pathlib.Path | None]:
    """(decode config, params, tokenizer dir or None) of a Hugging Face GPT-NeoX directory; `dtype`
    defaults to the checkpoint's. Each tensor is read, cast and put in place on its own."""
    from polyglot_jax.hf import mapping
    from polyglot_jax.hf.convert import check_hf_tensors, ours_view
    from polyglot_jax.hf.files import HFWeights, read_hf_config

    hf_dir = pathlib.Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    base = ModelConfig(**mapping.from_hf_config(hf_config), dtype="float32")
    cfg = decode_config(base, dtype or hf_dtype(hf_config))
    np_dtype = np.dtype(DTYPES[cfg.param_dtype])
    weights = HFWeights(hf_dir)
    try:
        specs = mapping.tensor_specs(cfg)
        stored = check_hf_tensors(weights, specs, hf_dir)
        shardings = param_shardings(cfg, mesh, rules)
        params: dict[str, Any] = {}
        for spec in tqdm(specs, desc="load", unit="tensor", disable=not progress):
            view = ours_view(spec, weights.get(stored[spec.hf_key])).astype(np_dtype)
            sharding = _get(shardings, spec.path)
            array = jax.make_array_from_callback(view.shape, sharding, lambda i, v=view: v[i])
            _set(params, spec.path, array)
            del view
    finally:
        weights.close()
    tokenizer = hf_dir if (hf_dir / "tokenizer.json").is_file() else None
    return cfg, params, tokenizer


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_tokenizer_dir(path: pathlib.Path | None):
    """The tokenizer (`data.tokenizer.LoadedTokenizer`) of a directory, or None when none is known."""
    if path is None:
        return None
    from polyglot_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(path)
