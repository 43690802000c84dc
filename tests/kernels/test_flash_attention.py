"""Flash attention kernels (interpret mode on CPU) against the float64 numpy reference.

The reference (tests/attention_reference.py) is checked here against central finite differences.
Every kernel call runs with poisoned outputs (each output buffer starts as NaN), so a tile a kernel
fails to write fails the comparison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import SMALL, Reference, packed_segments, run_case

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.kernels import Tiling, flash_attention, flash_attention_with_lse


def test_reference_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    b, t, h, d, rot = 1, 6, 1, 8, 4
    q, k, v = (rng.standard_normal((b, t, h, d)) for _ in range(3))
    ids = np.array([[3, 3, 0, 0, 0, 7]])
    kv_ids = np.array([[3, 3, 0, 5, 0, 7]])  # query 3 (id 0) sees keys 2, 4 only when non-causal
    positions = np.array([[0, 1, 0, 1, 2, 0]])
    dout = rng.standard_normal((b, t, h, d))
    dlse = rng.standard_normal((b, h, t))

    def loss(q, k, v, causal):
        ref = Reference(
            q,
            k,
            v,
            q_ids=ids,
            kv_ids=kv_ids,
            positions=positions,
            rotary_dim=rot,
            causal=causal,
            scale=0.7,
        )
        finite = np.isfinite(ref.lse)
        return (ref.out * dout).sum() + (np.where(finite, ref.lse, 0.0) * dlse).sum(), ref

    for causal in (True, False):
        _, ref = loss(q, k, v, causal)
        dlse_used = np.where(np.isfinite(ref.lse), dlse, 0.0)
        analytic = ref.grads(dout, dlse_used)
        eps = 1e-6
        for which, arr in enumerate((q, k, v)):
            numeric = np.zeros_like(arr)
            for idx in np.ndindex(arr.shape):
                args = [q.copy(), k.copy(), v.copy()]
                args[which][idx] += eps
                up = loss(*args, causal)[0]
                args[which][idx] -= 2 * eps
                down = loss(*args, causal)[0]
                numeric[idx] = (up - down) / (2 * eps)
            np.testing.assert_allclose(analytic[which], numeric, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "b,t,h,d,rot,causal,docs",
    [
        (2, 67, 2, 128, 0, True, 0),  # T not a block multiple, no RoPE, default positions
        (1, 130, 2, 128, 64, True, 4),  # rotary 64 of 128 (1.3B), packed documents
        (1, 67, 1, 256, 64, True, 3),  # rotary 64 of 256 (5.8B)
        (2, 100, 1, 128, 64, False, 3),  # non-causal: padded keys must be masked explicitly
        (1, 75, 2, 64, 32, False, 0),  # non-causal without segments: only the padding masks
    ],
)
def test_float32_matches_reference(b, t, h, d, rot, causal, docs):
    run_case(b=b, t=t, h=h, d=d, rot=rot, causal=causal, docs=docs, dtype=jnp.float32)


@pytest.mark.parametrize(
    "b,t,h,d,rot,docs",
    [
        (1, 130, 2, 128, 64, 4),
        (1, 67, 1, 256, 64, 2),
    ],
)
def test_bfloat16_matches_reference(b, t, h, d, rot, docs):
    run_case(b=b, t=t, h=h, d=d, rot=rot, causal=True, docs=docs, dtype=jnp.bfloat16)


def test_long_sequence_with_gpu_default_tiles():
    """T=260 with the tile sizes the GPU uses (several 64/128-row tiles, last one ragged)."""
    run_case(
        b=1,
        t=260,
        h=1,
        d=128,
        rot=64,
        causal=True,
        docs=3,
        dtype=jnp.float32,
        tiling=Tiling.default(128, "triton"),
    )


def test_tpu_layout_index_maps():
    """The [batch, heads, seq, dim] layout used on TPU, run in interpret mode."""
    tiling = Tiling(
        block_q=32,
        block_k=16,
        block_q_dkv=16,
        block_k_dkv=32,
        block_q_dq=16,
        block_k_dq=32,
        layout="bhtd",
    )
    run_case(
        b=2,
        t=64,
        h=2,
        d=128,
        rot=64,
        causal=True,
        docs=2,
        dtype=jnp.float32,
        tiling=tiling,
        shared_positions=True,
    )


@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_rows_give_zero_and_no_nan(causal):
    """Queries whose segment id has no key (kv_segment_ids differ) see nothing: output 0, lse -inf,
    zero gradient contributions, and no NaN anywhere."""
    t = 48
    ids = np.repeat(np.array([[4, 7, 1]], np.int32), 16, axis=1)  # [4]*16 + [7]*16 + [1]*16
    kv_ids = np.where(ids == 7, 8, ids).astype(np.int32)  # nobody has id 7 on the key side
    ref = run_case(
        b=1,
        t=t,
        h=2,
        d=128,
        rot=64,
        causal=causal,
        docs=0,
        dtype=jnp.float32,
        ids=ids,
        kv_ids=kv_ids,
    )
    assert np.isneginf(ref.lse).sum() == 2 * 16  # the hand-built case really has empty rows


def test_output_matches_without_lse_variant_and_jnp_model_rope():
    """flash_attention (no lse) equals attention on q/k rotated by the model's own jnp formula."""
    rng = np.random.default_rng(3)
    b, t, h, d, rot = 1, 40, 2, 128, 64
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    out = flash_attention(q, k, v, rotary_dim=rot, tiling=SMALL, poison_outputs=True)
    # The model's formula (the contract's wording), in jnp float32.
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    emb = jnp.concatenate([jnp.arange(t)[:, None] * inv_freq] * 2, axis=-1)
    cos, sin = jnp.cos(emb)[None, :, None], jnp.sin(emb)[None, :, None]

    def model_rope(x):
        xr = x[..., :rot]
        half = jnp.concatenate([-xr[..., rot // 2 :], xr[..., : rot // 2]], axis=-1)
        return jnp.concatenate([xr * cos + half * sin, x[..., rot:]], axis=-1)

    expected = jax.nn.dot_product_attention(model_rope(q), model_rope(k), v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("shape", [(0, 8, 2, 64), (1, 0, 2, 64), (1, 8, 0, 64)])
def test_empty_batch_sequence_or_heads_give_empty_results(shape):
    """Like jax.nn.dot_product_attention: no rows, nothing to compute, empty outputs and grads."""
    q = jnp.ones(shape, jnp.float32)
    ids = jnp.zeros(shape[:2], jnp.int32)
    (out, lse), pullback = jax.vjp(
        lambda q, k, v: flash_attention_with_lse(q, k, v, segment_ids=ids, rotary_dim=32), q, q, q
    )
    assert out.shape == shape and lse.shape == (shape[0], shape[2], shape[1])
    assert all(g.shape == shape for g in pullback((out, lse)))


def test_bad_inputs_raise_named_errors():
    q = jnp.zeros((1, 8, 2, 128), jnp.float32)
    with pytest.raises(InputError, match="shapes differ"):
        flash_attention(q, q[:, :4], q)
    with pytest.raises(InputError, match="segment_ids"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(InputError, match="dtype"):
        flash_attention(q.astype(jnp.int32), q, q)
    with pytest.raises(InputError, match="head_dim must be positive"):
        flash_attention(q[..., :0], q[..., :0], q[..., :0])
    with pytest.raises(ConfigError, match="rotary_dim"):
        flash_attention(q, q, q, rotary_dim=3)
    with pytest.raises(ConfigError, match="powers of two"):
        flash_attention(q, q, q, tiling=Tiling(block_q=48))
    # Triton needs power-of-two chunks >= 16: rotary 24 gives halves of 12.
    with pytest.raises(ConfigError, match="Triton"):
        flash_attention(q, q, q, rotary_dim=24, backend="triton")


def test_inside_shard_map_matches_unsharded():
    """Batch over 'data' and heads over 'model' (how the model calls it): per-shard kernels give the
    unsharded result. Interpret mode needs check_vma=False (the Pallas interpreter is not
    vma-typed); the GPU/TPU lowerings run with the checks on (see test_lowering)."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(7)
    b, t, h, d, rot = 2, 48, 4, 128, 64
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    ids, positions = (jnp.asarray(x) for x in packed_segments(rng, b, t, 3))

    def attention(q, k, v, ids, positions):
        return flash_attention(
            q, k, v, segment_ids=ids, positions=positions, rotary_dim=rot, tiling=SMALL
        )

    heads = P("data", None, "model")
    sharded = jax.shard_map(
        attention,
        mesh=mesh,
        in_specs=(heads,) * 3 + (P("data"),) * 2,
        out_specs=heads,
        check_vma=False,
    )

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, ids, positions)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(
        jax.tree.leaves(grads(sharded)), jax.tree.leaves(grads(attention)), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
