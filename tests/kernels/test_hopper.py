"""The Hopper (Mosaic GPU) kernels, run in Pallas' GPU interpret mode against the float64 reference.

GPU interpret mode simulates the kernel's three warp groups, its shared memory (allocated as NaN, so
an unwritten output or buffer shows), TMA copies and barriers, with the happens-before race detector
on; only wgmma is replaced by a dot of the same shared-memory contents. Gradients go through the
Hopper backward (``hopper_backward``) up to head_dim 128 and through the portable backward kernels at
256 (interpret mode here, Triton on the GPU). Lowering for CUDA (the real Mosaic GPU compiler passes,
layouts, shared-memory budget) is checked in test_lowering.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import SMALL, run_case
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret

from polyglot_jax.errors import ConfigError
from polyglot_jax.kernels import flash_attention

HOPPER = dict(backend="mosaic_gpu", interpret=True)
# run_case un-jitted: inside one jitted program the interpreter's simulated warp groups can starve
# XLA's CPU thread pool on a 2-core host (head_dim 256 hung about half the runs jitted, never eager).
CASE = dict(HOPPER, jit=False)


@pytest.fixture
def no_races():
    """No data race. (A deadlock, a barrier waited on more often than it completes, hangs here as
    on the GPU; pytest's faulthandler_timeout stops the run with every thread's stack.)"""
    gpu_interpret.reset_gpu_interpret_mode_state()
    yield
    assert not gpu_interpret.get_races().races_found, "the race detector saw a data race"


@pytest.mark.parametrize(
    "b,t,h,d,rot,causal,docs",
    [
        # Packed documents, rotary 64 of 128 (1.3B), T=300 padded to 384: three programs, the K/V
        # ring wraps several times, the last query tile is ragged.
        (1, 300, 2, 128, 64, True, 3),
        (2, 200, 1, 128, 0, False, 0),  # non-causal: padded keys masked explicitly, no RoPE
        (1, 256, 1, 256, 64, True, 2),  # head_dim 256 (5.8B): one compute group per program
    ],
)
@pytest.mark.usefixtures("no_races")
def test_matches_reference(b, t, h, d, rot, causal, docs):
    run_case(b=b, t=t, h=h, d=d, rot=rot, causal=causal, docs=docs, dtype=jnp.bfloat16, **CASE)


@pytest.mark.usefixtures("no_races")
def test_tiles_wholly_past_the_sequence():
    """A 256-row portable tile pads T=257 to 512, so whole Hopper tiles lie past the last real key
    and query: their loops must skip the real tiles' masks and every stream wait must still pair up
    with a copy (a deadlock otherwise)."""
    tiling = dataclasses.replace(SMALL, block_q=256)
    run_case(b=1, t=257, h=1, d=64, rot=32, causal=True, docs=0, dtype=jnp.bfloat16, tiling=tiling,
             **CASE)  # fmt: skip


@pytest.mark.usefixtures("no_races")
def test_head_dim_256_shorter_than_the_stream_ring():
    """T=40 at head_dim 256: one 64-row K/V tile, while the stream's ring has two slots."""
    run_case(b=1, t=40, h=1, d=256, rot=64, causal=True, docs=0, dtype=jnp.bfloat16, **CASE)


@pytest.mark.usefixtures("no_races")
def test_fully_masked_rows_give_zero_and_no_nan():
    ids = np.repeat(np.array([[4, 7, 1]], np.int32), 48, axis=1)  # 144 rows, three documents
    kv_ids = np.where(ids == 7, 8, ids).astype(np.int32)  # no key has id 7
    ref = run_case(
        b=1, t=144, h=1, d=128, rot=64, causal=True, docs=0, dtype=jnp.bfloat16, ids=ids,
        kv_ids=kv_ids, **CASE,
    )  # fmt: skip
    assert np.isneginf(ref.lse).sum() == 48


@pytest.mark.usefixtures("no_races")
def test_float16_forward_matches_portable_kernel():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 2, 128)), jnp.float16) for _ in range(3))
    got = flash_attention(q, k, v, rotary_dim=64, **HOPPER)
    want = flash_attention(q, k, v, rotary_dim=64, interpret=True)
    assert got.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=4e-3)


@pytest.mark.parametrize(
    "dtype,head_dim,rotary_dim,message",
    [
        (jnp.float32, 128, 0, "bfloat16 or float16"),
        (jnp.bfloat16, 96, 0, "head_dim in"),
        (jnp.bfloat16, 192, 64, "head_dim in"),  # a multiple of 64, but no power-of-two tiles
        (jnp.bfloat16, 128, 48, "rotary_dim in"),
        (jnp.bfloat16, 128, 128, "rotary_dim in"),  # would overflow shared memory
    ],
)
def test_refuses_what_the_kernels_cannot_do(dtype, head_dim, rotary_dim, message):
    q = jnp.zeros((1, 128, 1, head_dim), dtype)
    with pytest.raises(ConfigError, match=message):
        flash_attention(q, q, q, rotary_dim=rotary_dim, **HOPPER)
