"""Causal self-attention cores, picked by `config.model.attention_impl`.

All take q, k, v *before* RoPE, because the Pallas kernel rotates inside its tiles; the other
implementations rotate first with the jnp reference in `rope.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from polyglot_jax.errors import ConfigError
from polyglot_jax.rope import apply_rope

# pallas_hopper: the Pallas kernels for Hopper (Mosaic GPU); H100 only (GPU interpret
# mode on CPU, for tests).
ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "pallas_hopper")


def check_attention_backend(impl: str, device: jax.Device | None = None) -> None:
    """ConfigError unless `device` (default: this process's first device) can run `impl`:
    cudnn needs an NVIDIA (CUDA) GPU, pallas_hopper an sm_90 (Hopper) GPU for its wgmma/TMA
    kernels. The run entry points call this with the real device; the kernels themselves do not
    check, so that tests can run pallas_hopper in Pallas' GPU interpret mode on CPU."""
    if impl not in ("cudnn", "pallas_hopper"):
        return
    device = jax.devices()[0] if device is None else device
    cuda = device.platform == "gpu" and "cuda" in str(device.client.platform_version).lower()
    capability = str(getattr(device, "compute_capability", "")) if cuda else ""
    found = f"this run's backend is {device.platform} ({device.device_kind}"
    found += f", sm_{capability.replace('.', '')})" if capability else ")"
    if impl == "cudnn" and not cuda:
        raise ConfigError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU; {found}")
    if impl == "pallas_hopper" and capability.split(".")[0] != "9":
        raise ConfigError(
            f"config.model.attention_impl='pallas_hopper' needs an sm_90 (Hopper) GPU; {found}"
        )


def causal_mask(segment_ids: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
    """bool [batch or 1, 1, q_len, kv_len]: key j is visible to query i iff j <= i (and same segment).

    `segment_ids` int32 [batch, seq], or [batch, seq, 2] (segment, branch) for prefix trees: a
    segment's branch-0 tokens are a trunk that every branch sees, and a branch sees only itself
    beside it (evaluation lays one context once with all its continuations after it).
    """
    mask = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool), k=kv_len - q_len)[None, None]
    if segment_ids is not None and segment_ids.ndim == 3:
        branch = segment_ids[..., 1]
        segment_ids = segment_ids[..., 0]
        seen = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = mask & seen[:, None]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def xla_attention(q, k, v, segment_ids=None):
    """Reference attention. q, k, v: [batch, seq, heads, head_dim]; returns the same shape in q's dtype.

    Scores, softmax and the value sum accumulate in float32 (HF also takes the softmax in float32).
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = causal_mask(segment_ids, q.shape[1], k.shape[1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(
        q.dtype
    )


def pallas_attention(
    q, k, v, positions, segment_ids, rotary_dim: int, rope_base: float, backend: str | None = None
):
    """The fused Pallas kernel (RoPE inside), run per shard of batch and heads; ``backend`` as in
    ``flash_attention`` (``"mosaic_gpu"``: the Hopper kernels, in GPU interpret mode on CPU).

    A Pallas call cannot be partitioned automatically, so under a mesh it runs in `shard_map`
    with the specs the logical rules give q/k/v; the sequence axis must stay whole on each device.
    """
    from polyglot_jax.kernels import flash_attention

    def kernel(q, k, v, positions, segment_ids):
        return flash_attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            positions=positions,
            rotary_dim=rotary_dim,
            rope_base=rope_base,
            **backend_args,
        )

    backend_args = {} if backend is None else {"backend": backend}
    if backend == "mosaic_gpu":  # Pallas' GPU interpret mode on CPU (tests)
        backend_args["interpret"] = jax.default_backend() == "cpu"

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, positions, segment_ids)
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    if qkv_spec[1] is not None:
        raise ConfigError("attention_impl='pallas*' needs the sequence (length) axis unsharded")
    row_spec = PartitionSpec(qkv_spec[0], None)
    seg_spec = None if segment_ids is None else row_spec
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, row_spec, seg_spec),
        out_specs=qkv_spec,
        # The Pallas CPU interpreter cannot state how its outputs vary over the mesh.
        check_vma=jax.default_backend() != "cpu",
    )(q, k, v, positions, segment_ids)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    rotary_dim: int,
    rope_base: float,
    impl: str,
) -> jax.Array:
    """Causal attention with partial RoPE.

    Args:
      q, k, v: [batch, seq, heads, head_dim], un-rotated.
      positions: int32 [batch, seq].
      segment_ids: int32 [batch, seq] or None; tokens attend only within their segment
        ([batch, seq, 2] (segment, branch): prefix trees, `xla` only; see `causal_mask`).
      impl: one of ATTENTION_IMPLS.
    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"config.model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
    if segment_ids is not None and segment_ids.ndim == 3 and impl != "xla":
        raise ConfigError(f"attention_impl={impl!r} cannot mask prefix trees; use 'xla'")
    if impl in ("pallas", "pallas_hopper"):
        backend = "mosaic_gpu" if impl == "pallas_hopper" else None
        return pallas_attention(q, k, v, positions, segment_ids, rotary_dim, rope_base, backend)
    q = apply_rope(q, positions, rotary_dim, rope_base)
    k = apply_rope(k, positions, rotary_dim, rope_base)
    if impl == "cudnn":
        if segment_ids is not None:
            raise ConfigError(
                "config.model.attention_impl='cudnn' cannot mask packed segments; "
                "use 'pallas' or 'xla' with packed data"
            )
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return xla_attention(q, k, v, segment_ids)
