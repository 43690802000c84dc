"""The Flax model computes what HF GPTNeoXForCausalLM computes (float32, mapped weights)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import hf_logits, hf_state_dict, random_hf_model

from polyglot_jax.hf.mapping import from_hf_state_dict
from polyglot_jax.model import GPTNeoX, ModelConfig

CASES = {
    # name: (vocab, layers, d_model, d_ff, heads, rotary_dim) -- rotary_pct = rotary_dim / head_dim
    "pct0.5": (128, 2, 64, 256, 4, 8),
    "pct0.25_odd_heads": (96, 3, 80, 160, 5, 4),  # head_dim 16
    "pct0.25": (100, 2, 96, 192, 3, 8),  # head_dim 32
    "full_rotary_7_heads": (77, 2, 56, 112, 7, 8),  # head_dim 8
}


def _cfg(case, **kw) -> ModelConfig:
    vocab, layers, d, f, heads, rot = CASES[case]
    return ModelConfig(vocab, layers, d, f, heads, rot, dtype="float32", **kw)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, scan_layers):
    cfg = _cfg(case, scan_layers=scan_layers)
    hf = random_hf_model(cfg, seed=len(case))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 19))
    params = from_hf_state_dict(hf_state_dict(hf), cfg)
    ours = np.asarray(GPTNeoX(cfg).apply({"params": params}, jnp.asarray(tokens)))
    ref = hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (3, 19, cfg.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_non_default_eps_and_rope_base_match_transformers(scan_layers):
    """Every LayerNorm reads `layer_norm_eps` and RoPE `rope_base` (the defaults, 1e-5 and
    10000, would hide one that hard-codes them); a large eps changes the logits by ~1."""
    cfg = _cfg("pct0.5", scan_layers=scan_layers, layer_norm_eps=0.3, rope_base=500.0)
    hf = random_hf_model(cfg, seed=4)
    assert hf.config.layer_norm_eps == 0.3
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 17))
    params = from_hf_state_dict(hf_state_dict(hf), cfg)
    ours = np.asarray(GPTNeoX(cfg).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_rotary_fraction_matters():
    """Guards the test itself: a wrong rotary_dim must break parity, so parity is not vacuous."""
    cfg = _cfg("pct0.25")
    hf = random_hf_model(cfg)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16))
    params = from_hf_state_dict(hf_state_dict(hf), cfg)
    wrong = dataclasses.replace(cfg, rotary_dim=16)
    diff = np.abs(
        np.asarray(GPTNeoX(wrong).apply({"params": params}, tokens)) - hf_logits(hf, tokens)
    )
    assert diff.max() > 1e-2


def test_positions_and_segments_match_separate_documents():
    """Packed documents with restarted positions give each document's stand-alone logits."""
    cfg = _cfg("pct0.5")
    model = GPTNeoX(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None])
    segments = jnp.asarray(np.array([1] * 5 + [2] * 7)[None])
    out = model.apply({"params": params}, packed, positions, segments)
    alone_a = model.apply({"params": params}, jnp.asarray(a[None]))
    alone_b = model.apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], alone_b[0], atol=1e-5)


def test_params_carry_logical_axis_names():
    cfg = _cfg("pct0.5")
    boxed = GPTNeoX(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    names = {
        tuple(p.names)
        for p in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    }
    assert ("vocab", "embed") in names
    assert ("layers", "embed", "heads", None, "kv") in names
    assert ("layers", "mlp", "embed") in names
    allowed = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}
    assert all(set(n) <= allowed for n in names)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_and_bf16_compute_keep_the_function(policy):
    """Remat changes memory, not values; bf16 compute stays close to float32."""
    cfg = _cfg("pct0.5")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 12)))
    params = GPTNeoX(cfg).init(jax.random.key(1), tokens)["params"]

    def loss(p, c):
        return GPTNeoX(c).apply({"params": p}, tokens).astype(jnp.float32).mean()

    g_ref = jax.grad(loss)(params, cfg)
    g_remat = jax.grad(loss)(params, dataclasses.replace(cfg, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_ref, g_remat)
    bf16 = GPTNeoX(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, tokens)
    full = GPTNeoX(cfg).apply({"params": params}, tokens)
    assert bf16.dtype == jnp.bfloat16
    # Relative to the logit scale: bfloat16's machine epsilon is 2**-7 (8 significant bits); the
    # whole forward in bf16 measured max|diff| ~ 1.3 eps * max|logits| here, so 2 eps leaves margin.
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    atol = 2 * eps * float(np.abs(full).max())
    np.testing.assert_allclose(np.asarray(bf16, np.float32), full, rtol=0, atol=atol)


def test_cudnn_refuses_packed_segments():
    from polyglot_jax.attention import attend
    from polyglot_jax.errors import ConfigError

    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ConfigError, match="cudnn.*cannot mask packed segments"):
        attend(q, q, q, positions=jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32),
               rotary_dim=4, rope_base=10000.0, impl="cudnn")  # fmt: skip


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_only_xla_masks_prefix_trees(impl):
    from polyglot_jax.attention import attend
    from polyglot_jax.errors import ConfigError

    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ConfigError, match=f"{impl}.*cannot mask prefix trees"):
        attend(q, q, q, positions=jnp.zeros((1, 4), jnp.int32),
               segment_ids=jnp.ones((1, 4, 2), jnp.int32), rotary_dim=4, rope_base=10000.0,
               impl=impl)  # fmt: skip


def test_pallas_hopper_model_matches_xla_in_bfloat16():
    """attention_impl='pallas_hopper' (the Mosaic GPU forward, GPU interpret mode on CPU): logits of
    packed documents and the parameter gradients agree with the xla implementation.

    Unscanned: flax >= 0.12.9 (the Python 3.12 line) rejects the GPU interpreter's callbacks
    inside `nn.scan` (google/flax#5540); the kernel is the same either way."""
    cfg = ModelConfig(
        128, 1, 128, 256, 2, 32, dtype="bfloat16", attention_impl="xla", scan_layers=False
    )
    hopper = dataclasses.replace(cfg, attention_impl="pallas_hopper")
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 100)))
    positions = jnp.asarray(np.concatenate([np.arange(60), np.arange(40)])[None])
    segments = jnp.asarray(np.array([1] * 60 + [2] * 40)[None])
    params = GPTNeoX(cfg).init(jax.random.key(2), tokens)["params"]

    def loss(p, c):
        logits = GPTNeoX(c).apply({"params": p}, tokens, positions, segments)
        return logits.astype(jnp.float32).std(), logits

    (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, cfg)
    (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, hopper)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.05)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=0.03 * np.abs(b).max() + 1e-6)


def test_pallas_hopper_refuses_float32_and_narrow_heads():
    from polyglot_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="pallas_hopper.*float32"):
        ModelConfig(128, 1, 128, 256, 2, 32, dtype="float32", attention_impl="pallas_hopper")
    with pytest.raises(ConfigError, match="pallas_hopper.*head_dim=32"):
        ModelConfig(128, 1, 128, 256, 4, 16, dtype="bfloat16", attention_impl="pallas_hopper")
    with pytest.raises(ConfigError, match="pallas_hopper.*rotary_dim=128"):
        ModelConfig(128, 1, 128, 256, 1, 128, dtype="bfloat16", attention_impl="pallas_hopper")


def test_lm_head_is_the_models_output_projection():
    """The loss projects chunks of hidden states with `lm_head`: on the whole sequence it gives
    the model's logits exactly, and with float32 accumulation the same up to bfloat16 rounding."""
    from polyglot_jax.model import lm_head, lm_head_kernel

    cfg = ModelConfig(128, 2, 64, 256, 4, 8, dtype="bfloat16")
    model = GPTNeoX(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12)))
    logits = model.apply({"params": params}, tokens)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    head = lm_head(hidden, lm_head_kernel(params))
    assert head.dtype == logits.dtype == jnp.bfloat16 and head.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(head, np.float32), np.asarray(logits, np.float32))
    wide = lm_head(hidden, lm_head_kernel(params), preferred_element_type=jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(wide, np.asarray(logits, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "case, scan_layers, policy",
    [("pct0.25_odd_heads", True, "none"), ("pct0.5", False, "none"), ("pct0.5", True, "full")],
)
def test_training_gradients_match_transformers(case, scan_layers, policy):
    """d(mean next-token cross entropy + z-loss)/d(params) through our model and chunked loss
    (hand-written backward of the loss, LayerNorm and GELU) = torch autograd through
    GPTNeoXForCausalLM in float64, every parameter, mapped back with the HF mapping."""
    from hf_reference import require_torch

    from polyglot_jax.loss import chunked_cross_entropy
    from polyglot_jax.model import lm_head_kernel

    torch = require_torch()
    cfg = _cfg(case, scan_layers=scan_layers, remat_policy=policy)
    hf = random_hf_model(cfg, seed=7, std=0.1)
    params = from_hf_state_dict(hf_state_dict(hf), cfg)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, cfg.vocab_size, (3, 18))
    mask = (rng.random((3, 17)) > 0.2).astype(np.float32)
    z_loss = 1e-2

    ref = hf.double()
    logits = ref(torch.as_tensor(tokens[:, :-1])).logits
    log_z = torch.logsumexp(logits, -1)
    target = torch.gather(logits, -1, torch.as_tensor(tokens[:, 1:])[..., None])[..., 0]
    m = torch.as_tensor(mask, dtype=torch.float64)
    ((((log_z - target) + z_loss * log_z**2) * m).sum() / m.sum()).backward()
    want = from_hf_state_dict(
        {k: p.grad.numpy().astype(np.float32) for k, p in ref.named_parameters()}, cfg
    )

    def loss(p):
        hidden = GPTNeoX(cfg).apply({"params": p}, jnp.asarray(tokens[:, :-1]), return_hidden=True)
        ce, zl, count = chunked_cross_entropy(
            hidden,
            lm_head_kernel(p),
            jnp.asarray(tokens[:, 1:]),
            jnp.asarray(mask),
            chunk=5,
            z_loss=z_loss,
        )
        return (ce + zl) / count

    got = jax.jit(jax.grad(loss))(params)
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = flat_want[path]
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(
            np.asarray(g), w, rtol=1e-3, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
        )
