"""Next-token cross entropy from the final hidden states, without whole-batch float32 logits.

The vocabulary projection (the model's `lm_head`) and the log-softmax run over chunks of sequence
positions inside a rematerialised scan, so only [batch, chunk, vocab] float32 logits exist at once,
in the forward and in the backward. Chunks run along the sequence so the (sharded) batch axis
stays parallel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polyglot_jax.model import lm_head


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
      embed_out: [d_model, vocab] output projection (`model.lm_head_kernel(params)`).
      targets: int [batch, seq] next tokens.
      mask: [batch, seq], 1 where the target counts (not padding, not across a document start).
      chunk: sequence positions per chunk ([batch, chunk, vocab] float32 logits at a time).
      z_loss: coefficient of log(Z)^2 (PaLM's auxiliary loss); 0 disables it.
    Returns:
      (sum of cross entropy, z_loss * sum of log(Z)^2, number of real tokens), float32 scalars.
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
    w = embed_out.astype(hidden.dtype)

    @jax.checkpoint
    def one_chunk(carry, xs):
        h_c, t_c, m_c = xs  # [batch, chunk, d], [batch, chunk], [batch, chunk]
        logits = lm_head(h_c, w, preferred_element_type=jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        ce, zl = carry
        return (
            ce + jnp.sum((log_z - target_logit) * m_c),
            zl + jnp.sum(jnp.square(log_z) * m_c),
        ), None

    def by_chunk(x):  # [batch, n*chunk, ...] -> [n, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    xs = (by_chunk(hidden), by_chunk(targets), by_chunk(m))
    (ce_sum, z_sum), _ = jax.lax.scan(one_chunk, (jnp.float32(0), jnp.float32(0)), xs)
    return ce_sum, z_loss * z_sum, jnp.sum(m)
