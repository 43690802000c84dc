"""Our parameters <-> a Hugging Face GPT-NeoX state dict, and our model config <-> HF `config.json`.

Numpy in, numpy out (no torch). The mapping is a table of per-tensor specs so that the converter can
stream one tensor at a time; the whole-dict functions below are loops over the same table.

Layouts (torch Linear weights are [out, in]; ours are [in, ...out]):
    gpt_neox.embed_in.weight                   [V, D]        embed_in                  [V, D]
    layers.{i}.attention.query_key_value.weight [3D, D]      attention/qkv_kernel      [D, H, 3, Dh]
    layers.{i}.attention.query_key_value.bias   [3D]         attention/qkv_bias        [H, 3, Dh]
    layers.{i}.attention.dense.weight           [D, D]       attention/dense_kernel    [H, Dh, D]
    layers.{i}.mlp.dense_h_to_4h.weight         [F, D]       mlp/up_kernel             [D, F]
    layers.{i}.mlp.dense_4h_to_h.weight         [D, F]       mlp/down_kernel           [F, D]
    embed_out.weight                            [V, D]       embed_out                 [D, V]
HF's fused QKV rows are grouped per head ([H, 3, Dh]), not [3, H, Dh]: a plain split in three is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from polyglot_jax.errors import InputError
from polyglot_jax.model import ModelConfig

# Buffers that old checkpoints carry and that hold no learned parameters.
LEGACY_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")
OUTPUT_KEYS = (
    "embed_out.weight",
    "lm_head.weight",
)  # files say embed_out; transformers 5 says lm_head in memory


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lives in our parameter tree.

    `path` is the tree path of our parameter; `layer` is the layer index for per-layer tensors (the
    row of the stacked [layers, ...] parameter when layers are scanned), else None.
    """

    hf_key: str
    path: tuple[str, ...]
    layer: int | None
    hf_shape: tuple[int, ...]
    ours_shape: tuple[int, ...]  # for one layer
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a GPTNeoXForCausalLM state dict, in HF's order."""
    d, f, v, h, dh = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads, cfg.head_dim

    def reshaped(ours: tuple[int, ...], hf_2d: tuple[int, int] | None):
        """(to_hf, from_hf) for [in..., out...] kernels stored as torch [out, in]."""
        if hf_2d is None:  # a bias / LayerNorm vector: flatten or unflatten only
            return (lambda x: np.ascontiguousarray(x.reshape(-1)), lambda x: x.reshape(ours))
        out_dim, in_dim = hf_2d
        return (
            lambda x: _transpose(x.reshape(in_dim, out_dim)),
            lambda x: _transpose(x).reshape(ours),
        )

    specs = [
        TensorSpec(
            "gpt_neox.embed_in.weight", ("embed_in",), None, (v, d), (v, d), _identity, _identity
        )
    ]

    layer_table = [
        # (hf suffix, our path within a layer, our shape, hf shape, torch [out, in] or None)
        ("input_layernorm.weight", ("input_layernorm", "scale"), (d,), (d,), None),
        ("input_layernorm.bias", ("input_layernorm", "bias"), (d,), (d,), None),
        (
            "post_attention_layernorm.weight",
            ("post_attention_layernorm", "scale"),
            (d,),
            (d,),
            None,
        ),
        ("post_attention_layernorm.bias", ("post_attention_layernorm", "bias"), (d,), (d,), None),
        (
            "attention.query_key_value.weight",
            ("attention", "qkv_kernel"),
            (d, h, 3, dh),
            (3 * d, d),
            (3 * d, d),
        ),
        ("attention.query_key_value.bias", ("attention", "qkv_bias"), (h, 3, dh), (3 * d,), None),
        ("attention.dense.weight", ("attention", "dense_kernel"), (h, dh, d), (d, d), (d, d)),
        ("attention.dense.bias", ("attention", "dense_bias"), (d,), (d,), None),
        ("mlp.dense_h_to_4h.weight", ("mlp", "up_kernel"), (d, f), (f, d), (f, d)),
        ("mlp.dense_h_to_4h.bias", ("mlp", "up_bias"), (f,), (f,), None),
        ("mlp.dense_4h_to_h.weight", ("mlp", "down_kernel"), (f, d), (d, f), (d, f)),
        ("mlp.dense_4h_to_h.bias", ("mlp", "down_bias"), (d,), (d,), None),
    ]
    for i in range(cfg.num_layers):
        for suffix, sub, ours, hf_shape, torch_2d in layer_table:
            to_hf, from_hf = reshaped(ours, torch_2d)
            path = ("layers", *sub) if cfg.scan_layers else (f"layers_{i}", *sub)
            specs.append(
                TensorSpec(f"gpt_neox.layers.{i}.{suffix}", path, i, hf_shape, ours, to_hf, from_hf)
            )

    specs += [
        TensorSpec(
            "gpt_neox.final_layer_norm.weight",
            ("final_layer_norm", "scale"),
            None,
            (d,),
            (d,),
            _identity,
            _identity,
        ),
        TensorSpec(
            "gpt_neox.final_layer_norm.bias",
            ("final_layer_norm", "bias"),
            None,
            (d,),
            (d,),
            _identity,
            _identity,
        ),
        TensorSpec(
            "embed_out.weight", ("embed_out",), None, (v, d), (d, v), _transpose, _transpose
        ),
    ]
    return specs


def get_param(params: Mapping[str, Any], spec: TensorSpec) -> np.ndarray:
    """Our array for one spec (one layer's row when layers are scanned)."""
    node: Any = params
    for name in spec.path:
        node = node[name]
    arr = np.asarray(node)
    if spec.layer is not None and spec.path[0] == "layers":
        arr = arr[spec.layer]
    return arr


def to_hf_state_dict(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our (unboxed) params -> HF GPTNeoXForCausalLM state dict of numpy arrays (same dtype)."""
    return {spec.hf_key: spec.to_hf(get_param(params, spec)) for spec in tensor_specs(cfg)}


def normalize_hf_keys(keys: Iterator[str] | list[str]) -> dict[str, str]:
    """Maps the canonical key (`embed_out.weight`) -> the key as stored, dropping legacy buffers."""
    found = {}
    for key in keys:
        if key.endswith(LEGACY_SUFFIXES):
            continue
        found["embed_out.weight" if key in OUTPUT_KEYS else key] = key
    return found


def from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """HF state dict (numpy arrays or anything `np.asarray` takes) -> our nested params.

    Raises InputError naming the key for a missing tensor or a shape mismatch (with both shapes),
    and for tensors that this architecture does not have.
    """
    stored = normalize_hf_keys(list(state_dict))
    specs = tensor_specs(cfg)
    unexpected = sorted(set(stored) - {s.hf_key for s in specs})
    if unexpected:
        raise InputError(f"unexpected tensor(s) for GPT-NeoX: {', '.join(unexpected[:5])}")
    params: dict[str, Any] = {}
    stacks: dict[tuple[str, ...], list[np.ndarray]] = {}
    for spec in specs:
        if spec.hf_key not in stored:
            raise InputError(f"missing tensor {spec.hf_key} (expected shape {spec.hf_shape})")
        arr = np.asarray(state_dict[stored[spec.hf_key]])
        if tuple(arr.shape) != spec.hf_shape:
            raise InputError(
                f"tensor {stored[spec.hf_key]} has shape {tuple(arr.shape)}, expected {spec.hf_shape}"
            )
        ours = spec.from_hf(arr)
        if spec.layer is not None and spec.path[0] == "layers":
            stacks.setdefault(spec.path, []).append(ours)
        else:
            _set(params, spec.path, ours)
    for path, rows in stacks.items():
        _set(params, path, np.stack(rows))
    return params


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def to_hf_config(
    cfg: ModelConfig, *, eos_token_id: int = 2, bos_token_id: int = 0, torch_dtype: str = "float16"
) -> dict[str, Any]:
    """HF `config.json` contents for GPTNeoXForCausalLM (the field names the released models use)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu",
        "rotary_pct": cfg.rotary_dim / cfg.head_dim,
        "rotary_emb_base": cfg.rope_base,
        "max_position_embeddings": cfg.max_len,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": torch_dtype,
    }


_MISSING = object()


def _field(hf: Mapping[str, Any], key: str, source: str, default: Any = _MISSING) -> Any:
    if key in hf:
        return hf[key]
    if default is _MISSING:
        raise InputError(f"{source} is missing the field {key!r}")
    return default


def _positive_int(hf: Mapping[str, Any], key: str, source: str, default: Any = _MISSING) -> int:
    value = _field(hf, key, source, default)
    # bool is an int in Python; `true` for a size is a broken file, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{source}: {key}={value!r} must be a positive integer")
    return value


def _real(value: Any, name: str, source: str, high: float | None = None) -> float:
    """A finite number > 0 (and <= `high` when given), else InputError naming `name`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0 and (high is None or value <= high)
    if not ok:
        bound = f"within (0, {high:g}]" if high is not None else "> 0"
        raise InputError(f"{source}: {name}={value!r} must be a finite number {bound}")
    return float(value)


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """HF `config.json` contents -> `config.model` fields (architecture only; numerics keep our defaults).

    Accepts the old names (`rotary_pct`, `rotary_emb_base`) and transformers 5's `rope_parameters`.
    Raises InputError naming `source` and the field for anything malformed (wrong type, zero) or
    that our model does not compute the same way.
    """
    if not isinstance(hf, Mapping):
        raise InputError(f"{source}: not a JSON object ({type(hf).__name__})")
    arch = hf.get("architectures") or ["GPTNeoXForCausalLM"]
    if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
        raise InputError(f"{source}: architectures={arch!r} must be a list of class names")
    if hf.get("model_type", "gpt_neox") != "gpt_neox" or "GPTNeoXForCausalLM" not in arch:
        raise InputError(
            f"{source} describes {arch[0]} (model_type {hf.get('model_type')!r}), not GPTNeoXForCausalLM"
        )
    checks = {"use_parallel_residual": True, "tie_word_embeddings": False, "attention_bias": True}
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise InputError(f"{source} has {key}={hf[key]!r}; only {want!r} is supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise InputError(
            f"{source} has hidden_act={hf['hidden_act']!r}; only 'gelu' (exact) is supported"
        )
    rope = hf.get("rope_parameters")
    rope = {} if rope is None else rope
    if not isinstance(rope, Mapping):
        raise InputError(f"{source}: rope_parameters={rope!r} must be a JSON object")
    if rope.get("rope_type", "default") != "default":
        raise InputError(
            f"{source} has rope_type={rope['rope_type']!r}; only 'default' is supported"
        )
    d = _positive_int(hf, "hidden_size", source)
    heads = _positive_int(hf, "num_attention_heads", source)
    if d % heads:
        raise InputError(
            f"{source}: hidden_size={d} is not divisible by num_attention_heads={heads}"
        )
    # transformers 5 nests the RoPE fields in rope_parameters; older files keep them at the top.
    if "partial_rotary_factor" in rope:
        pct_name, pct = "rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"]
    else:
        pct_name, pct = "rotary_pct", hf.get("rotary_pct", 0.25)
    pct = _real(pct, pct_name, source, high=1.0)
    rotary_dim = int((d // heads) * pct)  # HF truncates the same way
    if rotary_dim % 2:
        raise InputError(
            f"{source}: {pct_name}={pct:g} gives an odd rotary dimension {rotary_dim} "
            f"(head_dim {d // heads}); rotate-half RoPE needs an even one"
        )
    if "rope_theta" in rope:
        base = _real(rope["rope_theta"], "rope_parameters.rope_theta", source)
    else:
        base = _real(hf.get("rotary_emb_base", 10000.0), "rotary_emb_base", source)
    return {
        "vocab_size": _positive_int(hf, "vocab_size", source),
        "num_layers": _positive_int(hf, "num_hidden_layers", source),
        "d_model": d,
        "d_ff": _positive_int(hf, "intermediate_size", source),
        "num_heads": heads,
        "rotary_dim": rotary_dim,
        "rope_base": base,
        "max_len": _positive_int(hf, "max_position_embeddings", source, 2048),
        "layer_norm_eps": _real(hf.get("layer_norm_eps", 1e-5), "layer_norm_eps", source),
    }
