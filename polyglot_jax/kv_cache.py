"""The key/value cache of incremental decoding: a left-padded batch of prompts is prefilled, then
every step appends one token per row.

    k, v   layers x [batch, heads, max_len, head_dim] in the compute dtype, keys after RoPE
    start  int32 [batch]  the first real (non-pad) column of each row
    index  int32 []       columns [0, index) are filled

The cache is held as one buffer per layer: with a single stacked array, XLA:CPU copied the whole
cache several times per step (one layer's update aliasing another's read); per-layer buffers are
updated in place. Heads come before columns so that a decode step's two attention products are
plain batched matrix-vector dots over (batch, heads) that read the cache as it lies: with columns
first, XLA:CPU either transposed the cache every step or ran the products as slow reductions
(0.97 against 0.12 ms per layer at batch 1, 160 columns, 12 x 64 heads).

Rows are left padded so that every row writes the same column at each step (one in-place
dynamic_update_slice for the whole batch). The token in column j of row b sits at position
j - start[b], so RoPE sees each row's true positions whatever the padding. The logical axes
(`CACHE_AXES`) let the config's rules shard heads over `model` and rows over the data axes.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from polyglot_jax.attention import attend
from polyglot_jax.rope import apply_rope

CACHE_AXES = ("batch", "heads", "length", "kv")  # of each layer's k and v


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    start: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(
    num_layers: int, start: jax.Array, max_len: int, num_heads: int, head_dim: int, dtype
) -> KVCache:
    """An empty cache for `len(start)` rows whose prompts begin at columns `start` (int32 [batch])."""
    shape = (start.shape[0], num_heads, max_len, head_dim)

    def zeros():
        return tuple(
            nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)
            for _ in range(num_layers)
        )

    return KVCache(k=zeros(), v=zeros(), start=start.astype(jnp.int32), index=jnp.int32(0))


def positions_of(cache: KVCache, length: int) -> jax.Array:
    """int32 [batch, length]: the positions of the next `length` columns (0 on left padding)."""
    columns = cache.index + jnp.arange(length, dtype=jnp.int32)
    return jnp.maximum(columns[None, :] - cache.start[:, None], 0)


def advance(cache: KVCache, length: int) -> KVCache:
    """The cache after every layer has written `length` more columns."""
    return cache.replace(index=cache.index + length)


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, k_new: jax.Array, v_new: jax.Array
) -> jax.Array:
    """One query per row against the cached keys and its own new key.

    q, k_new, v_new [batch, 1, heads, head_dim] (q and k_new rotated); k/v [batch, heads, max_len,
    head_dim], the cache before this step's write; valid bool [batch, max_len]. The new column is
    attended to from k_new/v_new rather than read back from the updated cache: then the update
    is the cache's only consumer after the reads and stays in place (reading it back, XLA:CPU
    copied every layer's buffers on every step). Float32 accumulation, like `xla_attention`;
    returns [batch, 1, heads, head_dim] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    cached = jnp.einsum("bqhd,bhsd->bhqs", q, k, preferred_element_type=f32) * scale
    cached = jnp.where(valid[:, None, None, :], cached, jnp.finfo(f32).min)
    own = jnp.einsum("bqhd,bqhd->bhq", q, k_new, preferred_element_type=f32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqs,bhsd->bqhd", probs[..., :-1], v, preferred_element_type=f32)
    out = out + jnp.einsum("bhq,bqhd->bqhd", probs[..., -1], v_new, preferred_element_type=f32)
    return out.astype(q.dtype)


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    layer: int,
    *,
    rotary_dim: int,
    rope_base: float,
    impl: str,
) -> tuple[jax.Array, KVCache]:
    """Attention for the `T` new columns at `cache.index`, writing their keys and values.

    q, k, v: [batch, T, heads, head_dim], un-rotated. T > 1 is the prefill of an empty cache: the
    prompt attends to itself with the configured implementation (left padding masked as segment
    0; cudnn cannot mask segments, so it prefills with xla). T == 1 is a decode step over the
    cache. Returns ([batch, T, heads, head_dim] in q's dtype, the cache with layer `layer` written).
    """
    length = q.shape[1]
    pos = positions_of(cache, length)
    k_rot = apply_rope(k, pos, rotary_dim, rope_base)
    at = (0, 0, cache.index, 0)

    def write(buffers, new):
        new = jnp.swapaxes(new, 1, 2).astype(buffers[layer].dtype)  # [batch, heads, T, head_dim]
        row = jax.lax.dynamic_update_slice(buffers[layer], new, at)
        return (*buffers[:layer], row, *buffers[layer + 1 :])

    def written(c: KVCache) -> KVCache:
        return c.replace(k=write(c.k, k_rot), v=write(c.v, v))

    columns = jnp.arange(cache.max_len, dtype=jnp.int32)
    if length > 1:
        cache = written(cache)
        segment_ids = (columns[None, :length] >= cache.start[:, None]).astype(jnp.int32)
        out = attend(
            q,
            k,
            v,
            positions=pos,
            segment_ids=segment_ids,
            rotary_dim=rotary_dim,
            rope_base=rope_base,
            impl="xla" if impl == "cudnn" else impl,
        )
        return out, cache
    valid = (columns[None, :] >= cache.start[:, None]) & (columns[None, :] < cache.index)
    q_rot = apply_rope(q, pos, rotary_dim, rope_base)
    out = decode_attention(q_rot, cache.k[layer], cache.v[layer], valid, k_rot, v)
    return out, written(cache)
