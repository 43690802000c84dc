"""Next-token cross entropy from the final hidden states, without whole-batch float32 logits.

The vocabulary projection (the model's `lm_head`) and the log-softmax run over chunks of sequence
positions in a scan, so only [batch, chunk, vocab] float32 logits exist at once. Chunks run along
the sequence so the (sharded) batch axis stays parallel.

Differentiated, each chunk's gradient is computed while its logits exist (a custom VJP): the
logits' gradient, softmax - one-hot (plus the z-loss term), goes straight into the two matmuls of
the projection's backward, and what the backward keeps is the hidden states' gradient and the
summed kernel gradient. So the step runs the projection's three matmuls once each; recomputing
the logits in the backward (`jax.checkpoint`, as before) added a fourth, 8.9% of configs/small.py's
model FLOPs. The summed kernel gradient is accumulated per data-parallel shard (one partial sum
per shard, reduced once after the last chunk) rather than all-reduced for every chunk.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from polyglot_jax.partitioning import mesh_axes


def chunked_cross_entropy(
    hidden: jax.Array,
    embed_out: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk: int,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums of the loss terms over the real tokens of a batch.

    Args:
      hidden: [batch, seq, d_model] final-LayerNorm output (compute dtype).
      embed_out: [d_model, vocab] output projection (`model.lm_head_kernel(params)`); the
        logits are computed in hidden's dtype, accumulated in float32.
      targets: int [batch, seq] next tokens.
      mask: [batch, seq], 1 where the target counts (not padding, not across a document start).
      chunk: sequence positions per chunk ([batch, chunk, vocab] float32 logits at a time).
      z_loss: coefficient of log(Z)^2 (PaLM's auxiliary loss); 0 disables it.
    Returns:
      (sum of cross entropy, z_loss * sum of log(Z)^2, number of real tokens), float32 scalars.
      Differentiable in hidden and embed_out (not in the mask).
    """
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    m = mask.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def by_chunk(x):  # [batch, n*chunk, ...] -> [n, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    ce_sum, z_sum = _cross_entropy_sums(
        float(z_loss),
        _partial_sum_shards(b),
        by_chunk(hidden),
        embed_out,
        by_chunk(targets).astype(jnp.int32),
        jax.lax.stop_gradient(by_chunk(m)),
    )
    return ce_sum, z_sum, jnp.sum(m)


def _rows(x: jax.Array) -> jax.Array:
    """[batch, chunk, ...] -> [batch * chunk, ...]: one row axis for the projection's matmuls
    (see `ops.project` for why XLA:CPU wants it)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _log_z(logits: jax.Array):
    """log(sum(exp(logits))) over the vocabulary as `jax.nn.logsumexp` computes it, with the
    shifted exponentials and their sums that the gradient reuses."""
    amax = jnp.max(logits, axis=-1, keepdims=True)
    amax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(amax), amax, 0.0))
    e = jnp.exp(logits - amax)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return (jnp.log(s) + amax)[:, 0], e, s


def _chunk_terms(h_c, w, t_c, m_c):
    """One chunk's logits, log Z and loss sums (rows: [rows, d] hidden, [rows] targets/mask;
    w: the kernel in the compute dtype)."""
    logits = jnp.einsum("re,ev->rv", h_c, w, preferred_element_type=jnp.float32)
    log_z, e, s = _log_z(logits)
    target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
    return (
        logits,
        log_z,
        e,
        s,
        jnp.sum((log_z - target_logit) * m_c),
        jnp.sum(jnp.square(log_z) * m_c),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cross_entropy_sums(z_loss, shards, h, w, t, m):
    """(sum of cross entropy, z_loss x sum of log(Z)^2) over chunks h [n, batch, chunk, d]: the
    loss value alone (nothing for a backward is computed)."""

    def one_chunk(carry, xs):
        h_c, t_c, m_c = (_rows(x) for x in xs)
        *_, ce, zl = _chunk_terms(h_c, w.astype(h_c.dtype), t_c, m_c)
        return (carry[0] + ce, carry[1] + zl), None

    (ce, zl), _ = jax.lax.scan(one_chunk, (jnp.float32(0), jnp.float32(0)), (h, t, m))
    return ce, z_loss * zl


def _cross_entropy_fwd(z_loss, shards, h, w, t, m):
    """The sums, and per chunk the gradients of both with respect to the chunk's hidden states
    (kept, [n, batch, chunk, d]) and to the kernel (summed over chunks, per shard). Without the
    z-loss its sum is the constant 0, and only the cross entropy's gradients are formed."""
    n, b, c, d = h.shape
    vocab = w.shape[1]
    wc = w.astype(h.dtype)
    with_z = z_loss != 0.0
    terms = 2 if with_z else 1  # gradients of (ce,) or (ce, log Z^2)

    def one_chunk(carry, xs):
        ce_sum, z_sum, dw = carry
        h_c, t_c, m_c = (_rows(x) for x in xs)
        _, log_z, e, s, ce, zl = _chunk_terms(h_c, wc, t_c, m_c)
        onehot = jnp.arange(vocab, dtype=jnp.int32)[None, :] == t_c[:, None]
        # d ce / d logits = (softmax - onehot) * m, the softmax as the autodiff of logsumexp
        # forms it (exp(logits - max) * (m / sum)); d z_loss log Z^2 / d logits =
        # z_loss * 2 log Z * softmax * m.
        p_m = e * (m_c[:, None] / s)
        dlogits = [jnp.where(onehot, p_m - m_c[:, None], p_m)]
        if with_z:
            dlogits.append(p_m * (2.0 * z_loss * log_z)[:, None])
        dh = [
            jnp.einsum("rv,ev->re", g, wc, preferred_element_type=jnp.float32).astype(h.dtype)
            for g in dlogits
        ]
        dw = [acc + _kernel_grad(h_c, g, shards) for acc, g in zip(dw, dlogits, strict=True)]
        dh = [g.reshape(b, c, d) for g in dh]
        return (ce_sum + ce, z_sum + zl, dw), dh

    zero_dw = [_constrain_partial(jnp.zeros((shards, d, vocab), jnp.float32))] * terms
    (ce, zl, dw), dh = jax.lax.scan(one_chunk, (jnp.float32(0), jnp.float32(0), zero_dw), (h, t, m))
    dw = [jnp.sum(g, axis=0).astype(w.dtype) for g in dw]  # the one cross-shard reduction
    return (ce, z_loss * zl), (dh, dw)


def _cross_entropy_bwd(z_loss, shards, residuals, cotangents):
    """Both gradients are linear in the sums' cotangents: scale what the forward computed."""
    dh, dw = residuals
    terms = cotangents[: len(dh)]  # without the z-loss, its (constant) sum has no gradient
    h_bar = sum(g * ct.astype(g.dtype) for g, ct in zip(dh, terms, strict=True))
    w_bar = sum(g * ct.astype(g.dtype) for g, ct in zip(dw, terms, strict=True))
    return h_bar, w_bar, None, None


_cross_entropy_sums.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _kernel_grad(h_c: jax.Array, dlogits: jax.Array, shards: int) -> jax.Array:
    """[shards, d, vocab] float32: h_c^T @ dlogits summed over each shard's rows only.

    Rows are the batch-major [batch * chunk] rows; with `shards` > 1 the batch is split into that
    many contiguous blocks (the data-parallel shards), each summed on its own device, so that no
    collective runs per chunk."""
    rows, d = h_c.shape
    hs = h_c.reshape(shards, rows // shards, d)
    gs = dlogits.reshape(shards, rows // shards, -1)
    return _constrain_partial(
        jnp.einsum("srd,srv->sdv", hs, gs.astype(jnp.promote_types(hs.dtype, gs.dtype)),
                   preferred_element_type=jnp.float32)
    )  # fmt: skip


def _data_axes() -> tuple[str, ...]:
    """Mesh axes that shard the batch but not the output projection (under the logical rules):
    over those, every device holds the whole kernel gradient anyway, so partial sums cost no
    extra memory. fsdp, which also shards the kernel, is left to XLA (a reduce-scatter per chunk
    keeps the gradient sharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    kernel = {a for axes in mesh_axes(("embed", "vocab")) for a in axes}
    return tuple(a for a in mesh_axes(("batch",))[0] if a not in kernel and mesh.shape[a] > 1)


def _partial_sum_shards(batch: int) -> int:
    shards = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in _data_axes())
    return shards if shards > 1 and batch % shards == 0 else 1


def _constrain_partial(x: jax.Array) -> jax.Array:
    """Lays the [shards, d, vocab] partial sums out one per data-parallel shard."""
    axes = _data_axes()
    if x.shape[0] == 1 or not axes:
        return x
    spec = PartitionSpec(axes, *nn.logical_to_mesh_axes(("embed", "vocab")))
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(jax.sharding.get_abstract_mesh(), spec)
    )
