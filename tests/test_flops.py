"""The compiled train step does the model's work and no more: its matmul FLOPs, counted in the
optimised HLO (`hlo_costs.matmul_flops`, every dot weighted by how often its loop runs), against
`flops.training_flops_per_token` (6 x matmul parameters + attention) written out by hand below.

Hidden recomputation (a loss that recomputes its logits in the backward, a remat policy that saves
less than it promises) shows up as a factor above the promise.
"""

import jax
import pytest

from polyglot_jax import flops
from polyglot_jax.config import load_config
from polyglot_jax.mesh_bench import measure
from polyglot_jax.model import ModelConfig, count_params

ONE_DEVICE = {"data": 1, "fsdp": 1, "model": 1}


def _config(**model):
    """configs/tiny.py with 4 loss chunks (a single chunk would let XLA merge a recomputed
    forward into the first one and hide it)."""
    c = load_config("configs/tiny.py")
    c.train.loss_chunk = 32
    for k, v in model.items():
        c.model[k] = v
    return c


def test_model_flops_formula_by_hand():
    """6 x (QKV + dense + MLP + biases + LayerNorms + output projection) + 12 L d T."""
    c = _config()
    cfg = ModelConfig.from_config(c.model)
    d, f, v, layers, t = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers, c.train.seq_len
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    matmul_params = layers * per_layer + 2 * d + d * v
    assert flops.training_flops_per_token(cfg, t) == 6 * matmul_params + 12 * layers * d * t


def _factor(config, mesh_shape=ONE_DEVICE, devices=None) -> float:
    devices = devices or [jax.devices()[0]]
    r = measure(config, mesh_shape, devices=devices)
    cfg = ModelConfig.from_config(config.model)
    tokens = config.train.batch_size * config.train.seq_len
    model = flops.training_flops_per_token(cfg, config.train.seq_len) * tokens
    return r["matmul_flops"] * len(devices) / model


@pytest.mark.parametrize("scan_layers", [True, False])
def test_no_remat_computes_the_model_flops(scan_layers):
    """Goal of the step: compiled matmuls within 5% of the model's FLOPs (here 0.4% below: the
    formula counts biases and LayerNorm parameters as matmul parameters)."""
    assert 0.95 <= _factor(_config(scan_layers=scan_layers, remat_policy="none")) <= 1.05


def test_on_a_mesh_nothing_is_computed_twice():
    """data:2,fsdp:2,model:2: the per-device dots add up to the model FLOPs once."""
    devices = jax.devices()[:8]
    factor = _factor(_config(), {"data": 2, "fsdp": 2, "model": 2}, devices)
    assert 0.95 <= factor <= 1.05


@pytest.mark.parametrize("policy", ["none", "dots", "dots_no_batch", "full"])
def test_each_remat_policy_recomputes_what_it_promises(policy):
    """The promise, per layer and token, written out here: dots keeps every matmul output;
    dots_no_batch recomputes the two attention matmuls (4 d T); full recomputes the forward of
    every matmul whose output the backward reads: QKV (6 d^2), attention (4 d T) and the MLP's
    up projection (2 d f), but not the two projections into the residual stream."""
    c = _config(remat_policy=policy)
    cfg = ModelConfig.from_config(c.model)
    d, f, layers, t = cfg.d_model, cfg.d_ff, cfg.num_layers, c.train.seq_len
    extra = {
        "none": 0,
        "dots": 0,
        "dots_no_batch": 4 * d * t,
        "full": 6 * d * d + 4 * d * t + 2 * d * f,
    }[policy] * layers
    promised = 1 + extra / flops.training_flops_per_token(cfg, t)
    assert flops.recompute_flops_per_token(cfg, t) == extra
    assert _factor(c) == pytest.approx(promised, abs=0.01)
    if policy == "full":
        assert promised > 1.05  # the test can tell a recomputation from none


def test_the_output_projection_gradient_is_reduced_once_per_step():
    """data:8 with 4 loss chunks: the gradients' all-reduce is 4 bytes x P parameters x 7/8, the
    output projection's included once (summed per data shard over the chunks, then reduced), not
    once per chunk (+4 x vocab x d_model x 7/8 for every further chunk)."""
    c = _config()
    params = count_params(ModelConfig.from_config(c.model))
    got = measure(c, {"data": 8}, devices=jax.devices()[:8])["collective_bytes"]
    expected = 4 * params * 7 / 8
    assert got["all-reduce"] + got["reduce-scatter"] == pytest.approx(expected, rel=0.01)
