"""Flash attention, the public API: causal, packed-segment masking, NeoX partial RoPE fused in.

``flash_attention`` / ``flash_attention_with_lse`` check their inputs, pad the sequence, build the
call's ``Plan`` and run a ``custom_vjp`` whose forward and backward dispatch to the portable kernels
(``portable``: Triton, Mosaic TPU, interpret) or, for ``backend="mosaic_gpu"``, to the Hopper ones
(``hopper_forward``; ``hopper_backward`` for head_dim <= 128, at 256 the backward stays portable on
Triton, which takes the same residuals).

Masking: query i sees key j iff ``j <= i`` (causal) and ``segment_q[i] == segment_kv[j]`` (when segment
ids are given; any equal ids attend, 0 has no special meaning). Sequences are padded to a multiple of
the largest tile; padded keys are masked where a real query could see them and padded query rows are
computed finitely and dropped. A row that sees no key at all (possible with ``kv_segment_ids``) gets
output 0, logsumexp -inf and zero gradients, never NaN.

Layouts: arrays enter as ``[batch, seq, heads, head_dim]``; on Mosaic TPU they are transposed to
``[batch, heads, seq, head_dim]`` around the kernels (see ``portable``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.kernels import backend as backend_lib
from polyglot_jax.kernels import (
    hopper_backward,
    hopper_common,
    hopper_forward,
    portable,
    rope_tiles,
)
from polyglot_jax.kernels.plan import LOG2_E, HopperTiling, Plan, Tiling

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


# ------------------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: Plan, q, k, v, seg_q, seg_k, cos, sin):
    """(output, base-2 logsumexp [B, H, T, 1]) on padded arrays in the plan's layout."""
    return _forward(plan, q, k, v, seg_q, seg_k, cos, sin)


def _forward(plan: Plan, q, k, v, seg_q, seg_k, cos, sin):
    if plan.hopper_tiling is not None:
        return hopper_forward.forward(plan, plan.hopper_tiling, q, k, v, seg_q, seg_k, cos, sin)
    return tuple(portable.forward(plan, q, k, v, seg_q, seg_k, cos, sin))


def _attention_fwd(plan: Plan, q, k, v, seg_q, seg_k, cos, sin):
    o, lse = _forward(plan, q, k, v, seg_q, seg_k, cos, sin)
    return (o, lse), (q, k, v, seg_q, seg_k, cos, sin, o, lse)


def _attention_bwd(plan: Plan, residuals, cotangents):
    q, k, v, seg_q, seg_k, cos, sin, o, lse = residuals
    do, dlse = cotangents
    # dS = P * (dP - delta); the logsumexp output adds P * dlse (in natural-log units).
    rowdot = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if plan.layout == "bthd":
        rowdot = jnp.swapaxes(rowdot, 1, 2)
    delta = rowdot[..., None] - dlse * LOG2_E
    # Empty rows (lse -inf) get +inf so that exp2(s - lse) is 0 there instead of inf.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    args = (q, k, v, seg_q, seg_k, cos, sin, do.astype(q.dtype), lse, delta)
    if plan.hopper_tiling is not None and hopper_backward.supported(plan):
        dq, dk, dv = hopper_backward.backward(plan, plan.hopper_tiling, *args)
    else:
        dq, dk, dv = portable.backward(plan, *args)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------------ public


def _check_inputs(q, k, v, segment_ids, kv_segment_ids, positions, rotary_dim: int) -> None:
    if q.ndim != 4:
        raise InputError(f"q must be [batch, seq, heads, head_dim], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise InputError(f"q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
    if q.shape[3] == 0:
        raise InputError(f"head_dim must be positive, got q shape {q.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"q, k, v need one dtype of bfloat16/float16/float32, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    b, t, _, d = q.shape
    for name, ids in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if ids is not None and (ids.shape != (b, t) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise InputError(
                f"{name} must be integer [batch, seq] = {(b, t)}, got {ids.dtype}{list(ids.shape)}"
            )
    if kv_segment_ids is not None and segment_ids is None:
        raise InputError("kv_segment_ids given without segment_ids")
    if rotary_dim < 0 or rotary_dim > d or rotary_dim % 2:
        raise ConfigError(f"rotary_dim={rotary_dim} must be even and within head_dim={d}")
    if (
        positions is not None
        and rotary_dim
        and (
            positions.shape not in ((b, t), (1, t))
            or not jnp.issubdtype(positions.dtype, jnp.integer)
        )
    ):
        raise InputError(
            f"positions must be integer [batch, seq] = {(b, t)}, got "
            f"{positions.dtype}{list(positions.shape)}"
        )


def _check_tiling(tiling: Tiling, backend: str, head_dim: int, rotary_dim: int) -> None:
    for size in tiling.blocks():
        if not backend_lib.is_power_of_two(size):
            raise ConfigError(f"block sizes must be powers of two, got {tiling}")
    if tiling.layout not in (None, "bthd", "bhtd"):
        raise ConfigError(f"Tiling.layout={tiling.layout!r} is not 'bthd' or 'bhtd'")
    if backend == "triton":
        # Triton dots need every operand dim a power of two and at least 16.
        small = [s for s in tiling.blocks() if s < 16]
        chunks = rope_tiles.head_chunks(head_dim, rotary_dim)
        if (
            small
            or not backend_lib.is_power_of_two(head_dim)
            or any(size < 16 for _, size in chunks)
            or (rotary_dim and not backend_lib.is_power_of_two(rotary_dim // 2))
        ):
            raise ConfigError(
                f"the Triton lowering needs blocks >= 16 and head-dim chunks that are powers of two "
                f">= 16; got head_dim={head_dim}, rotary_dim={rotary_dim}, chunks={chunks}, {tiling}"
            )


def flash_attention_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    kv_segment_ids: jax.Array | None = None,
    tiling: Tiling | None = None,
    backend: str | None = None,
    poison_outputs: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention output and its row logsumexp; both differentiable. See ``flash_attention``.

    Returns (out [batch, seq, heads, head_dim] in q's dtype, lse float32 [batch, heads, seq], natural
    log of the softmax denominator of the scaled scores; -inf for a row that sees no key).
    """
    _check_inputs(q, k, v, segment_ids, kv_segment_ids, positions, rotary_dim)
    b, t, h, d = q.shape
    if q.size == 0:  # no batch row, token or head: nothing to launch (a zero-size grid fails)
        return jnp.zeros_like(q), jnp.zeros((b, h, t), jnp.float32)
    lowering = backend_lib.resolve_backend(interpret, backend)
    hopper_tiling, hopper_interpret = None, False
    if lowering == "mosaic_gpu":
        # Any portable kernel left (head_dim 256's backward) runs on Triton, or interpret on CPU.
        hopper_interpret = bool(interpret)  # like backend="triton": native unless asked
        lowering = "interpret" if hopper_interpret else "triton"
        hopper_tiling = HopperTiling.default(d)
        hopper_common.check(hopper_tiling, q.dtype, d, rotary_dim)
    tiling = tiling or Tiling.default(d, lowering, backend_lib.compute_capability(lowering))
    _check_tiling(tiling, lowering, d, rotary_dim)
    tiling = tiling.fit(t)
    layout = tiling.layout or ("bhtd" if lowering == "mosaic_tpu" else "bthd")
    if hopper_tiling is not None:
        layout = "bthd"
    multiple = max(tiling.blocks() + (hopper_tiling.blocks() if hopper_tiling else ()))
    padded = -(-t // multiple) * multiple
    pad = padded - t

    def pad_seq(x, mode="constant"):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, mode=mode) if pad else x

    seg_q = seg_k = cos = sin = None
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        # Padding repeats the last id: padded rows stay finite; padded keys are masked separately.
        seg_q = pad_seq(segment_ids.astype(jnp.int32), "edge")
        seg_k = pad_seq(kv_ids.astype(jnp.int32), "edge")
    if rotary_dim:
        pos = jnp.arange(t, dtype=jnp.int32)[None] if positions is None else positions
        cos, sin = rope_tiles.rope_tables(
            pad_seq(pos.astype(jnp.int32), "edge"), rotary_dim, rope_base
        )
    q, k, v = (pad_seq(x) for x in (q, k, v))
    if layout == "bhtd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    plan = Plan(
        batch=b,
        heads=h,
        head_dim=d,
        seq_len=t,
        padded_len=padded,
        causal=bool(causal),
        sm_scale=float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale),
        rotary_dim=rotary_dim,
        chunks=rope_tiles.head_chunks(d, rotary_dim),
        segmented=segment_ids is not None,
        tables_batched=cos is not None and cos.shape[0] > 1,
        tiling=tiling,
        backend=lowering,
        layout=layout,
        poison=poison_outputs,
        hopper_tiling=hopper_tiling,
        hopper_interpret=hopper_interpret,
    )
    out, lse2 = _attention(plan, q, k, v, seg_q, seg_k, cos, sin)
    if layout == "bhtd":
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :t], lse2[:, :, :t, 0] / LOG2_E


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    rotary_dim: int = 0,
    rope_base: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    kv_segment_ids: jax.Array | None = None,
    tiling: Tiling | None = None,
    backend: str | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
    """Fused attention with optional RoPE, as Pallas kernels; differentiable (custom VJP).

    q, k, v: [batch, seq, heads, head_dim], one of bfloat16/float16/float32, any seq length; q and k
    un-rotated. segment_ids: int [batch, seq]; query i sees key j only if the ids are equal (and j <= i
    when causal). kv_segment_ids: the keys' ids if they differ from the queries' (rows that match no key
    give 0). positions: int [batch, seq] (default 0..seq-1), used only when rotary_dim > 0: the first
    rotary_dim dims of q and k are rotated NeoX-style (rotate-half) at these positions with ``rope_base``.
    sm_scale: default 1/sqrt(head_dim). interpret: None = interpret mode on CPU only. tiling: block sizes
    and Triton launch parameters (default ``Tiling.default``). backend: force a lowering
    ("triton", "mosaic_tpu", "interpret"), e.g. to lower for GPU from a CPU host; "mosaic_gpu" runs the
    Hopper kernels (``hopper_forward``, ``hopper_backward``: bfloat16/float16, head_dim 64/128/256,
    rotary_dim 0/32/64; with interpret=True in Pallas' GPU interpret mode).
    poison_outputs: start every kernel output as NaN (a debugging aid that makes unwritten tiles
    visible).

    Returns [batch, seq, heads, head_dim] in q's dtype (float32 accumulation inside).
    """
    out, _ = flash_attention_with_lse(
        q,
        k,
        v,
        segment_ids=segment_ids,
        positions=positions,
        rotary_dim=rotary_dim,
        rope_base=rope_base,
        causal=causal,
        sm_scale=sm_scale,
        interpret=interpret,
        kv_segment_ids=kv_segment_ids,
        tiling=tiling,
        backend=backend,
        poison_outputs=poison_outputs,
    )
    return out
