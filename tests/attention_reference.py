"""Attention in float64 numpy, the reference every attention kernel test compares against.

NeoX RoPE (float32 angles, as the model computes them), masked softmax attention and its gradients by
the closed-form softmax backward (itself checked against central finite differences in
kernels/test_flash_attention.py), plus ``run_case``: one random case through
``flash_attention_with_lse`` (outputs poisoned beforehand) compared with the reference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from polyglot_jax.kernels import Tiling, flash_attention_with_lse

# ------------------------------------------------------------------------------- float64 reference


def rope_angles(positions, rotary_dim, base=10000.0):
    """float32 angles exactly as the model computes them, returned as float64 [..., rot/2]."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)
    return (positions.astype(np.float32)[..., None] * inv_freq).astype(np.float64)


def rotate(x, angles, rotary_dim, inverse=False):
    """NeoX rotate-half on the first rotary_dim dims of x [B, T, H, D]; angles [B|1, T, rot/2]."""
    if not rotary_dim:
        return x
    half = rotary_dim // 2
    c, s = np.cos(angles)[:, :, None, :], np.sin(angles)[:, :, None, :]
    if inverse:
        s = -s
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., rotary_dim:]], axis=-1)


class Reference:
    """Attention in float64 with its closed-form backward; fully masked rows give 0 and lse -inf."""

    def __init__(self, q, k, v, *, q_ids, kv_ids, positions, rotary_dim, causal, scale):
        b, t, h, d = q.shape
        self.angles = rope_angles(positions, rotary_dim) if rotary_dim else None
        self.rotary_dim, self.scale = rotary_dim, scale
        self.qr = rotate(q, self.angles, rotary_dim)
        self.kr = rotate(k, self.angles, rotary_dim)
        self.v = v
        mask = np.ones((b, 1, t, t), bool)
        if causal:
            mask &= np.tril(np.ones((t, t), bool))
        if q_ids is not None:
            mask &= q_ids[:, None, :, None] == kv_ids[:, None, None, :]
        self.mask = mask
        s = np.einsum("bqhd,bkhd->bhqk", self.qr, self.kr) * scale
        s = np.where(mask, s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(mask, np.exp(s - m), 0.0)
        denom = e.sum(-1, keepdims=True)
        self.p = e / np.where(denom > 0, denom, 1.0)
        with np.errstate(divide="ignore"):
            self.lse = (np.log(denom) + m)[..., 0]  # [B, H, T]; -inf where no key is visible
        self.out = np.einsum("bhqk,bkhd->bqhd", self.p, v)

    def grads(self, dout, dlse):
        """(dq, dk, dv) of sum(out * dout) + sum(lse * dlse) (dlse zero on rows with lse -inf)."""
        p = self.p
        dv = np.einsum("bhqk,bqhd->bkhd", p, dout)
        dp = np.einsum("bqhd,bkhd->bhqk", dout, self.v)
        delta = (p * dp).sum(-1, keepdims=True)
        ds = p * (dp - delta + dlse[..., None])
        dqr = np.einsum("bhqk,bkhd->bqhd", ds, self.kr) * self.scale
        dkr = np.einsum("bhqk,bqhd->bkhd", ds, self.qr) * self.scale
        dq = rotate(dqr, self.angles, self.rotary_dim, inverse=True)
        dk = rotate(dkr, self.angles, self.rotary_dim, inverse=True)
        return dq, dk, dv


# ---------------------------------------------------------------------------------------- helpers


def packed_segments(rng, b, t, n_docs):
    """Sorted segment ids with n_docs documents per row (ids include 0 and arbitrary values), and
    positions that restart at 0 in each document."""
    ids = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), n_docs - 1, replace=False))
        labels = rng.permutation(np.array([0, 5, -2, 9, 1, 3, 11, 4])[:n_docs])
        starts = np.concatenate([[0], cuts])
        for doc, (lo, hi) in enumerate(zip(starts, np.concatenate([cuts, [t]]), strict=True)):
            ids[row, lo:hi] = labels[doc]
            positions[row, lo:hi] = np.arange(hi - lo)
    return ids, positions


SMALL = Tiling(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
TOL = {  # (rtol, atol as a fraction of the largest reference magnitude); measured worst cases
    # float32: about 1e-7 of the scale (float32 eps 1.2e-7), so 30 eps leaves a 5x margin.
    jnp.float32: (2e-5, 4e-6),
    # bfloat16 (eps 2^-8 = 3.9e-3): q/k/v, the rotated q/k, P and dS are each rounded to bf16 before
    # the dots; the worst gradient error seen is 0.6% of the scale, so 3 eps leaves a 2x margin.
    jnp.bfloat16: (1e-2, 1.2e-2),
}


def check_close(name, actual, expected, dtype):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    assert np.isfinite(actual).all(), f"{name}: kernel output has NaN/inf"
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=atol * max(1.0, np.abs(expected).max()), err_msg=name
    )


def run_case(
    *,
    b,
    t,
    h,
    d,
    rot,
    causal,
    docs,
    dtype,
    tiling=SMALL,
    seed=0,
    kv_ids=None,
    ids=None,
    shared_positions=False,
    jit=True,
    **kernel_kwargs,
):
    """Forward, lse and gradients of one random case against the reference; kernel_kwargs go to
    flash_attention_with_lse (e.g. backend).

    ``jit=False`` runs the kernels op by op. Pallas' GPU interpreter needs it on small hosts: its
    simulated warp groups block in host callbacks, and inside one jitted program those can hold
    every thread of XLA's CPU pool while the work they wait for needs one (a hang on 2 cores).
    """
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((b, t, h, d)) for _ in range(4))
    dlse = rng.standard_normal((b, h, t))
    counting = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    positions, kernel_positions = counting, None  # the kernel's default is 0..T-1
    if ids is None and docs:
        ids, positions = packed_segments(rng, b, t, docs)
        kernel_positions = jnp.asarray(positions)
    if shared_positions:  # one [1, T] row for the whole batch
        positions, kernel_positions = counting, jnp.asarray(counting[:1])
    # The kernel sees the inputs rounded to its dtype; so does the reference (then in float64).
    q, k, v, dout = (
        np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64) for x in (q, k, v, dout)
    )
    scale = 1.0 / math.sqrt(d)
    ref = Reference(
        q,
        k,
        v,
        q_ids=ids,
        kv_ids=ids if kv_ids is None else kv_ids,
        positions=positions,
        rotary_dim=rot,
        causal=causal,
        scale=scale,
    )
    dlse = np.where(np.isfinite(ref.lse), dlse, 0.0)

    kwargs = dict(
        segment_ids=None if ids is None else jnp.asarray(ids),
        kv_segment_ids=None if kv_ids is None else jnp.asarray(kv_ids),
        positions=kernel_positions,
        rotary_dim=rot,
        causal=causal,
        tiling=tiling,
        poison_outputs=True,
        **kernel_kwargs,
    )

    def forward_and_grads(q, k, v, dout, dlse):
        (out, lse), pullback = jax.vjp(lambda *a: flash_attention_with_lse(*a, **kwargs), q, k, v)
        return out, lse, pullback((dout, dlse))

    if jit:
        forward_and_grads = jax.jit(forward_and_grads)

    args = [jnp.asarray(x, dtype) for x in (q, k, v, dout)] + [jnp.asarray(dlse, jnp.float32)]
    out, lse, (dq, dk, dv) = forward_and_grads(*args)
    assert out.dtype == dtype and out.shape == (b, t, h, d)
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    check_close("out", out, ref.out, dtype)
    finite = np.isfinite(ref.lse)
    lse = np.asarray(lse)
    assert (np.isneginf(lse) == ~finite).all(), "lse must be -inf exactly on fully masked rows"
    check_close("lse", np.where(finite, lse, 0.0), np.where(finite, ref.lse, 0.0), dtype)
    for name, got, want in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), ref.grads(dout, dlse), strict=True
    ):
        check_close(name, got, want, dtype)
    return ref
