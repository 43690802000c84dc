"""Lowering selection and the named-ref pallas_call wrapper (poisoning proven to catch a gap)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from polyglot_jax.errors import ConfigError
from polyglot_jax.kernels import backend


def test_resolve_backend():
    assert backend.resolve_backend(None) == "interpret"  # tests run on CPU
    assert backend.resolve_backend(True) == "interpret"
    assert backend.resolve_backend(None, "triton") == "triton"
    with pytest.raises(ConfigError, match="no native lowering"):
        backend.resolve_backend(False)
    with pytest.raises(ConfigError, match="not one of"):
        backend.resolve_backend(None, "cuda")
    with pytest.raises(ConfigError, match="contradicts"):
        backend.resolve_backend(True, "triton")


def copy_some_tiles(poison: bool, skip_last: bool):
    """Copies x tile by tile, skipping the last tile when asked (a kernel with a bug)."""
    x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    n = 4

    def body(*, src, dst):
        i = pl.program_id(0)
        if skip_last:

            @pl.when(i < n - 1)
            def _():
                dst[...] = src[...]

        else:
            dst[...] = src[...]

    spec = pl.BlockSpec((16, 8), lambda i: (i, 0))
    (out,) = backend.pallas_call_by_name(
        body,
        backend="interpret",
        poison=poison,
        name="copy",
        grid=(n,),
        inputs=[("src", x, spec), ("absent", None, spec)],
        outputs=[("dst", jax.ShapeDtypeStruct(x.shape, x.dtype), spec)],
        num_warps=4,
        num_stages=1,
    )
    return np.asarray(x), np.asarray(out)


def test_poisoned_outputs_expose_an_unwritten_tile():
    x, out = copy_some_tiles(poison=True, skip_last=False)
    np.testing.assert_array_equal(out, x)
    x, out = copy_some_tiles(poison=True, skip_last=True)
    np.testing.assert_array_equal(out[:48], x[:48])
    assert np.isnan(out[48:]).all()  # the tile the buggy kernel skipped
