"""GPT-NeoX as Polyglot-Ko uses it, in Flax linen: the same function as HF `GPTNeoXForCausalLM`.

    h = embed_in[tokens]                                  (no position embedding: RoPE in attention)
    for each layer:  h = h + attention(ln1(h)) + mlp(ln2(h))      (parallel residual)
    logits = final_layer_norm(h) @ embed_out              (untied, no bias)

Parameter names follow HF's module names so that `hf/mapping.py` reads like a table. Every parameter
and key activation carries logical axis names (vocab, embed, heads, kv, mlp, layers, batch, length);
the config's rules map them onto mesh axes, so no mesh axis name appears here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyglot_jax.attention import ATTENTION_IMPLS, attend
from polyglot_jax.errors import ConfigError
from polyglot_jax.kv_cache import KVCache, advance, cached_attention, positions_of
from polyglot_jax.ops import gelu, normalize, project

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics; mirrors `config.model` (see configs/*.py for every field's meaning)."""

    vocab_size: (
        int  # padded size (30,080 for Polyglot-Ko: 30,003 tokens padded to a multiple of 128)
    )
    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    rotary_dim: int
    rope_base: float = 10000.0
    max_len: int = 2048
    layer_norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "d_ff", "num_heads", "max_len"):
            value = getattr(self, name)
            # bool is an int subclass: `num_layers=True` is a typo, not one layer.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.model.{name}={value!r} must be a positive int")
        if not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool):
            raise ConfigError(f"config.model.rotary_dim={self.rotary_dim!r} must be an int")
        for name in ("rope_base", "layer_norm_eps"):
            value = getattr(self, name)
            # `not value > 0` rather than `value <= 0`: NaN fails every comparison.
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"config.model.{name}={value!r} must be a positive number")
            if not math.isfinite(value):
                raise ConfigError(f"config.model.{name}={value!r} must be finite")
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(
                f"config.model.scan_layers={self.scan_layers!r} must be True or False"
            )
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"config.model.d_model={self.d_model} is not divisible by "
                f"config.model.num_heads={self.num_heads}"
            )
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"config.model.rotary_dim={self.rotary_dim} must be even and within "
                f"[0, head_dim={self.head_dim}]"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"config.model.{name}={getattr(self, name)!r} is not one of {tuple(DTYPES)}"
                )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"config.model.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}"
            )
        if self.attention_impl == "pallas_hopper":
            from polyglot_jax.kernels.hopper_common import HEAD_DIMS, ROTARY_DIMS

            if (
                self.dtype not in ("bfloat16", "float16")
                or self.head_dim not in HEAD_DIMS
                or self.rotary_dim not in ROTARY_DIMS
            ):
                raise ConfigError(
                    "config.model.attention_impl='pallas_hopper' needs dtype bfloat16/float16, "
                    f"head_dim in {HEAD_DIMS}, rotary_dim in {ROTARY_DIMS}; got {self.dtype}, "
                    f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}"
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"config.model.remat_policy={self.remat_policy!r} is not one of {tuple(REMAT_POLICIES)}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> ModelConfig:
        """From `config.model` (a ConfigDict or dict); unknown fields are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = dict(model_config)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"config.model has unknown field(s): {', '.join(unknown)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in fields
        )
        if missing:
            raise ConfigError(f"config.model is missing field(s): {', '.join(missing)}")
        return cls(**fields)


def _init(std: float):
    return nn.initializers.normal(stddev=std)


def _param(
    module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple, cfg: ModelConfig
):
    return module.param(
        name, nn.with_logical_partitioning(init, axes), shape, DTYPES[cfg.param_dtype]
    )


# GPT-NeoX's own initialisation (not HF's flat 0.02): "small_init" sqrt(2 / (5 d)) for inputs and
# "wang_init" 2 / (L sqrt(d)) for the two projections that write into the residual stream.
def _small_std(cfg: ModelConfig) -> float:
    return math.sqrt(2.0 / (5.0 * cfg.d_model))


def _wang_std(cfg: ModelConfig) -> float:
    return 2.0 / (cfg.num_layers * math.sqrt(cfg.d_model))


class LayerNorm(nn.Module):
    """LayerNorm with bias, eps from the config, computed in float32, output in the compute dtype.

    `normalized`: `normalize(x)` when the caller has it (the parallel residual normalises the same
    x for both of its LayerNorms, which differ only in scale and bias)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, normalized: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.cfg)
        bias = _param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.cfg)
        if normalized is None:
            normalized = normalize(x.astype(jnp.float32), self.cfg.layer_norm_eps)
        return (normalized * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
            DTYPES[self.cfg.dtype]
        )


class Attention(nn.Module):
    """Fused QKV (laid out per head as [heads, 3, head_dim], like HF), partial RoPE, causal attention."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None, layer: int = 0):
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        h, dh, d = cfg.num_heads, cfg.head_dim, cfg.d_model
        qkv_w = _param(
            self,
            "qkv_kernel",
            _init(_small_std(cfg)),
            (d, h, 3, dh),
            ("embed", "heads", None, "kv"),
            cfg,
        )
        qkv_b = _param(
            self, "qkv_bias", nn.initializers.zeros, (h, 3, dh), ("heads", None, "kv"), cfg
        )
        qkv = project(x, "re,ehcd->rhcd", qkv_w.astype(dtype)) + qkv_b.astype(dtype)
        q, k, v = (
            nn.with_logical_constraint(qkv[:, :, :, i], ("batch", "length", "heads", "kv"))
            for i in range(3)
        )
        rope = {
            "rotary_dim": cfg.rotary_dim,
            "rope_base": cfg.rope_base,
            "impl": cfg.attention_impl,
        }
        if cache is None:
            out = attend(q, k, v, positions=positions, segment_ids=segment_ids, **rope)
        else:
            out, cache = cached_attention(q, k, v, cache, layer, **rope)
        out_w = _param(
            self, "dense_kernel", _init(_wang_std(cfg)), (h, dh, d), ("heads", "kv", "embed"), cfg
        )
        out_b = _param(self, "dense_bias", nn.initializers.zeros, (d,), ("embed",), cfg)
        if cache is not None:
            # One decode row: XLA:CPU would transpose the whole kernel to [kv, heads, embed]
            # on every step to contract (heads, kv); flattened, it is read in place.
            out, out_w = out.reshape(*out.shape[:2], h * dh), out_w.reshape(h * dh, d)
            return project(out, "rf,fe->re", out_w.astype(dtype)) + out_b.astype(dtype), cache
        return project(out, "rhd,hde->re", out_w.astype(dtype)) + out_b.astype(dtype), cache


class MLP(nn.Module):
    """dense_h_to_4h -> exact (erf) GELU -> dense_4h_to_h, with biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        w1 = _param(
            self,
            "up_kernel",
            _init(_small_std(cfg)),
            (cfg.d_model, cfg.d_ff),
            ("embed", "mlp"),
            cfg,
        )
        b1 = _param(self, "up_bias", nn.initializers.zeros, (cfg.d_ff,), ("mlp",), cfg)
        w2 = _param(
            self,
            "down_kernel",
            _init(_wang_std(cfg)),
            (cfg.d_ff, cfg.d_model),
            ("mlp", "embed"),
            cfg,
        )
        b2 = _param(self, "down_bias", nn.initializers.zeros, (cfg.d_model,), ("embed",), cfg)
        y = project(x, "re,ef->rf", w1.astype(dtype)) + b1.astype(dtype)
        y = nn.with_logical_constraint(gelu(y), ("batch", "length", "mlp"))
        return project(y, "rf,fe->re", w2.astype(dtype)) + b2.astype(dtype)


class Block(nn.Module):
    """One parallel-residual layer: x + attention(ln1(x)) + mlp(ln2(x)).

    Signature fits `nn.scan`: (carry, *broadcast) -> (carry, None); when decoding, the second
    output is the KV cache with this layer's columns written.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None, layer: int = 0):
        normalized = normalize(x.astype(jnp.float32), self.cfg.layer_norm_eps)  # shared
        attn, cache = Attention(self.cfg, name="attention")(
            LayerNorm(self.cfg, name="input_layernorm")(x, normalized),
            positions,
            segment_ids,
            cache,
            layer,
        )
        ln2 = LayerNorm(self.cfg, name="post_attention_layernorm")(x, normalized)
        mlp = MLP(self.cfg, name="mlp")(ln2)
        x = x + attn + mlp
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class GPTNeoX(nn.Module):
    """The causal LM.

    __call__(tokens int32 [batch, seq], positions=None, segment_ids=None) -> logits [batch, seq, vocab]
    in the compute dtype; with `return_hidden=True` the final-LayerNorm output [batch, seq, d_model]
    instead (the loss applies `lm_head` to it in chunks, without full logits).

    Decoding: with `cache` (a `kv_cache.KVCache`; needs `scan_layers=False`, see
    `generate.unstack_layers`) the tokens fill the next columns of the cache (a whole left-padded
    prompt into an empty cache, or one token per row), positions come from the cache, and the
    result is (logits or hidden, the advanced cache).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        return_hidden: bool = False,
        cache: KVCache | None = None,
    ):
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        if cache is not None:
            if cfg.scan_layers:
                raise ConfigError("decoding with a KV cache needs config.model.scan_layers=False")
            positions = positions_of(cache, tokens.shape[1])
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embed = _param(
            self,
            "embed_in",
            _init(_small_std(cfg)),
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            cfg,
        )
        # Gathered as FSDP gathers kernels (sharded rows: SPMD replicates the cotangent, data x fsdp)
        embed = nn.with_logical_constraint(embed, ("vocab", None))
        x = jnp.take(embed, tokens, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        block = Block
        if cfg.remat_policy != "none" and cache is None:
            block = nn.remat(
                Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = layers(cfg, name="layers")(x, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, cache = block(cfg, name=f"layers_{i}")(x, positions, segment_ids, cache, i)

        x = LayerNorm(cfg, name="final_layer_norm")(x)
        if cache is not None:
            cache = advance(cache, tokens.shape[1])
            return (x if return_hidden else self._logits(x)), cache
        if return_hidden:
            return x
        return self._logits(x)

    def _logits(self, x):
        cfg = self.cfg
        out = _param(
            self,
            "embed_out",
            _init(_small_std(cfg)),
            (cfg.d_model, cfg.vocab_size),
            ("embed", "vocab"),
            cfg,
        )
        return nn.with_logical_constraint(lm_head(x, out), ("batch", "length", "vocab"))


def lm_head(hidden: jax.Array, kernel: jax.Array, preferred_element_type=None) -> jax.Array:
    """The output projection: logits [batch, seq, vocab] = hidden [batch, seq, d_model] @ kernel
    [d_model, vocab] (untied, no bias), in hidden's (compute) dtype, or accumulated in and
    returned as `preferred_element_type` (the loss asks for float32)."""
    return project(
        hidden,
        "re,ev->rv",
        kernel.astype(hidden.dtype),
        preferred_element_type=preferred_element_type,
    )


def lm_head_kernel(params: Mapping[str, Any]) -> jax.Array:
    """The kernel `lm_head` takes, from a parameter tree (HF's `embed_out`)."""
    return params["embed_out"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
    """Fresh parameters, boxed with their logical axis names.

    Initialised through the xla attention path: parameters do not depend on the attention
    implementation, and a [1, 1] dummy batch cannot be split over a mesh as the kernel path would.
    """
    model = GPTNeoX(dataclasses.replace(cfg, attention_impl="xla"))
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(cfg: ModelConfig) -> Any:
    """Parameter shapes/dtypes (boxed with logical axis names) via `jax.eval_shape`: no allocation."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(cfg: ModelConfig) -> int:
    """Exact number of parameters, without allocating them."""
    boxed = jax.tree.leaves(abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return sum(math.prod(x.value.shape) for x in boxed)
