"""The model's projection, LayerNorm core and GELU, written so that the compiled step does only the
work the model needs (tests/test_flops.py holds it to the model's FLOPs).

Each of them computes exactly what the plain jnp expression computes in the forward; what differs
is what the backward keeps (`normalize`, `gelu`) or how XLA lays out the gradient (`project`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def project(x: jax.Array, spec: str, kernel: jax.Array, **kwargs) -> jax.Array:
    """`einsum(spec, x, kernel)` with x's [batch, seq] flattened into one row axis `r` (spec names
    the rest, e.g. "re,ef->rf"), the result shaped [batch, seq, ...] again.

    The forward is the same dot. Its transpose, the kernel's gradient, then contracts one axis
    (rows) instead of two: XLA:CPU lowers a dot that contracts [batch, seq] of both operands by
    first transposing the output gradient and then running a transposed-operand kernel; over rows
    it runs the plain one. On GPU/TPU the reshapes are bitcasts. The batch axis is the rows' major
    part, so a batch-sharded array stays batch-sharded.
    """
    b, t = x.shape[:2]
    y = jnp.einsum(spec, x.reshape(b * t, *x.shape[2:]), kernel, **kwargs)
    return y.reshape(b, t, *y.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis: LayerNorm without its scale and bias.

    x: float32 [..., d] -> float32 [..., d]. The backward, from the saved output y and
    r = 1 / sqrt(var + eps), is r * (g - mean(g) - y * mean(g * y)): what autodiff of the forward
    gives, but autodiff keeps x - mean, the square's derivative, r and r's derivative besides y
    (three more [batch, seq, d] arrays per LayerNorm, stacked per layer by the scan).
    """
    return _normalize_fwd(x, eps)[0]


def _normalize_fwd(x: jax.Array, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x - mean) * rstd
    return y, (y, rstd)


def _normalize_bwd(eps: float, residuals, g: jax.Array):
    y, rstd = residuals
    return (rstd * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True)),)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, any float dtype, same shape.

    Its derivative is formed in the forward, so the backward keeps that one array
    ([batch, seq, d_ff]) where autodiff of the erfc formula keeps three.
    """
    return jax.nn.gelu(x, approximate=False)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # d/dx 0.5 x erfc(u) with u = -x sqrt(1/2): 0.5 erfc(u) + 0.5 x (2 / sqrt(pi)) exp(-u^2) sqrt(1/2)
    sqrt_half = np.asarray(np.sqrt(0.5), x.dtype)
    u = -x * sqrt_half
    slope = 0.5 * jax.lax.erfc(u) + (0.5 * x) * (
        np.asarray(2.0 / np.sqrt(np.pi), x.dtype) * jnp.exp(-jnp.square(u)) * sqrt_half
    )
    return gelu(x), t * slope
