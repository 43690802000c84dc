"""The kernels lower for GPU (Pallas Triton, Mosaic GPU) and TPU (Mosaic) from this CPU-only host.

Lowering runs every Pallas lowering rule (supported primitives, Triton's power-of-two tensor shapes,
TPU block-shape rules; for Mosaic GPU also register layouts, bank-conflict-free shared-memory
transfers and the 227 KiB shared-memory budget) without a device; compiling to machine code and
running on the device stay untested here. GPU lowerings run inside
``jax_compat.gpu_lowering_target()`` (an H100 as the abstract device: jax 0.11 on needs one).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from polyglot_jax import jax_compat
from polyglot_jax.kernels import flash_attention, rope
from polyglot_jax.kernels.hopper_common import HEAD_DIMS as HOPPER_HEAD_DIMS
from polyglot_jax.kernels.hopper_common import ROTARY_DIMS as HOPPER_ROTARY_DIMS

TARGETS = {"cuda": ("triton", "__gpu$xla.gpu.triton"), "tpu": ("mosaic_tpu", "tpu_custom_call")}
MOSAIC_GPU_CALL = "mosaic_gpu_v2"


def lowered_text(fn, *shapes, platform):
    target = jax_compat.gpu_lowering_target() if platform == "cuda" else contextlib.nullcontext()
    with target:
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


TRITON, TPU = TARGETS["cuda"][1], TARGETS["tpu"][1]


@pytest.mark.parametrize(
    "backend,head_dim,rotary_dim,segmented,platform,kernels",
    [
        ("triton", 128, 64, True, "cuda", {TRITON: 3}),  # forward, dK/dV and dQ
        ("triton", 256, 64, False, "cuda", {TRITON: 3}),
        ("mosaic_tpu", 128, 64, True, "tpu", {TPU: 3}),
        ("mosaic_gpu", 128, 64, True, "cuda", {MOSAIC_GPU_CALL: 3, TRITON: 0}),  # all Hopper
        ("mosaic_gpu", 128, 0, False, "cuda", {MOSAIC_GPU_CALL: 3, TRITON: 0}),
        # head_dim 256: Hopper forward, Triton backward (shared memory holds no more)
        ("mosaic_gpu", 256, 64, True, "cuda", {MOSAIC_GPU_CALL: 1, TRITON: 2}),
    ],
)
def test_flash_attention_forward_and_backward_lower(
    backend, head_dim, rotary_dim, segmented, platform, kernels
):
    qkv = jax.ShapeDtypeStruct((2, 256, 4, head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(q, k, v, segment_ids, positions):
        out = flash_attention(
            q,
            k,
            v,
            segment_ids=segment_ids if segmented else None,
            positions=positions,
            rotary_dim=rotary_dim,
            backend=backend,
        )
        return jnp.sum(out.astype(jnp.float32))

    text = lowered_text(
        jax.grad(loss, argnums=(0, 1, 2)), qkv, qkv, qkv, ids, ids, platform=platform
    )
    assert {target: text.count(target) for target in kernels} == kernels


@pytest.mark.parametrize(
    "head_dim,rotary_dim",
    [(d, r) for d in HOPPER_HEAD_DIMS for r in HOPPER_ROTARY_DIMS if r <= d],
)
def test_every_shape_the_hopper_kernels_accept_lowers(head_dim, rotary_dim):
    """check() refuses up front exactly what would fail later (tile shapes, shared memory)."""
    qkv = jax.ShapeDtypeStruct((1, 128, 2, head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def loss(q, k, v, segment_ids, positions):
        out = flash_attention(
            q, k, v, segment_ids=segment_ids, positions=positions, rotary_dim=rotary_dim,
            backend="mosaic_gpu",
        )  # fmt: skip
        return jnp.sum(out.astype(jnp.float32))

    text = lowered_text(jax.grad(loss, argnums=(0, 1, 2)), qkv, qkv, qkv, ids, ids, platform="cuda")
    assert text.count(MOSAIC_GPU_CALL) == (1 if head_dim == 256 else 3)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_rope_forward_and_backward_lower(platform):
    backend, call_target = TARGETS[platform]
    x = jax.ShapeDtypeStruct((2, 256, 16, 128), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def loss(x, positions):
        return jnp.sum(rope(x, positions, rotary_dim=64, backend=backend).astype(jnp.float32))

    # value_and_grad, not grad: the loss is linear in rope's output, so from jax 0.12 on grad alone
    # needs no forward kernel (dead-code elimination drops it).
    text = lowered_text(jax.value_and_grad(loss), x, positions, platform=platform)
    assert text.count(call_target) == 2


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_lowers_inside_shard_map_with_vma_checks(backend):
    """The model runs attention per shard: under shard_map(check_vma=True) the kernels' outputs must
    declare how they vary over the mesh; lowering for GPU checks that typing end to end."""
    from jax.sharding import PartitionSpec as P

    # A mesh of 4 abstract H100s: jax 0.11 on lowers the body under the shard_map's own mesh.
    mesh = jax_compat.gpu_lowering_mesh((2, 2), ("data", "model"))
    heads = P("data", None, "model")

    def attention(q, k, v, ids, positions):
        return flash_attention(
            q, k, v, segment_ids=ids, positions=positions, rotary_dim=64, backend=backend
        )

    sharded = jax.shard_map(
        attention, mesh=mesh, in_specs=(heads,) * 3 + (P("data"),) * 2, out_specs=heads
    )

    def loss(q, k, v, ids, positions):
        return jnp.sum(sharded(q, k, v, ids, positions).astype(jnp.float32))

    qkv = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    text = lowered_text(jax.grad(loss, argnums=(0, 1, 2)), qkv, qkv, qkv, ids, ids, platform="cuda")
    kernels = text.count(TARGETS["cuda"][1]) + text.count(MOSAIC_GPU_CALL)
    assert kernels == 3
