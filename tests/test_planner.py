"""The planner against independent references: XLA's compiled memory of the real train step on 8 fake
CPU devices, and figures written out by hand from the config's numbers and the sharding rules.

The compiled checks run configs/small.py (~100M parameters) with `model.dtype=float32`: XLA's CPU
backend computes bfloat16 matmuls through float32 converts, temporaries a GPU never makes, so a
bfloat16 compile on CPU is not the device the planner describes. The planner takes the compute
dtype from the config, so float32 here tests the same code path with the dtype the CPU really uses.
"""

import math

import pytest

from polyglot_jax.config import load_config
from polyglot_jax.errors import ConfigError
from polyglot_jax.flops import training_flops_per_token
from polyglot_jax.hardware import DEVICE_KINDS, GiB, device_kind
from polyglot_jax.model import ModelConfig, count_params
from polyglot_jax.partitioning import AXES, layout_text, parse_layout
from polyglot_jax.planner import Planner

ONES = dict.fromkeys(AXES, 1)


def _small(**fields):
    config = load_config("configs/small.py")
    config.model.dtype = "float32"
    for key, value in fields.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def _mesh(**sizes):
    return {**ONES, **sizes}


# --- against the compiled step -----------------------------------------------------------------


def _measure(config, mesh):
    """mesh_bench.measure: the compiled train step's memory (argument + output + temp - alias)
    and collective bytes, read from XLA."""
    from polyglot_jax import mesh_bench

    return mesh_bench.measure(config, mesh)


# Pure fsdp, and model parallelism with data and with fsdp (every axis that shards parameters,
# activations or the vocabulary), each with one of the policies the Polyglot-Ko plans pick.
# (data:8 with remat none also agrees, -0.3%: docs/scaling.md; left out to keep the test short.)
COMPILED_CASES = [
    (_mesh(fsdp=8), "full"),
    (_mesh(data=2, model=4), "dots"),
    (_mesh(fsdp=4, model=2), "dots_no_batch"),
]


@pytest.mark.parametrize(
    "mesh, policy", COMPILED_CASES, ids=[f"{layout_text(m)}-{p}" for m, p in COMPILED_CASES]
)
def test_memory_and_collectives_match_compiled(mesh, policy):
    config = _small(model__remat_policy=policy)
    planned = Planner(config, 8, "a100-80gb").evaluate(mesh, policy, grad_accum=1)
    compiled = _measure(config, mesh)
    assert planned.bytes_per_device == pytest.approx(compiled["bytes_per_device"], rel=0.2)
    # Gradient reductions: XLA on CPU writes reduce-scatters as all-reduces; the bytes agree.
    ours, xla = planned.collective_bytes, compiled["collective_bytes"]
    reduced = ours["all-reduce"] + ours["reduce-scatter"]
    assert reduced == pytest.approx(
        xla.get("all-reduce", 0.0) + xla.get("reduce-scatter", 0.0), rel=0.05
    )
    if mesh["model"] == 1:
        assert ours["all-gather"] == pytest.approx(xla.get("all-gather", 0.0), rel=0.05, abs=1)
    else:
        # With the vocabulary over model and d_model over fsdp, XLA gathers the output
        # projection twice, once for each of a chunk's two matmuls that read it (on fsdp:8 one
        # gather serves both); the planner counts it once.
        assert ours["all-gather"] <= xla.get("all-gather", 0.0)


# --- by hand ------------------------------------------------------------------------------------


def test_hand_computation_fsdp8_full_remat():
    """configs/small.py on fsdp:8, remat full, float32, one microbatch, every term by hand."""
    V, d, f, h, L, t, chunk = 30080, 768, 3072, 12, 8, 512, 256  # configs/small.py
    rows = 16 // 8  # global batch 16; rows per device (batch -> data x fsdp)
    f32 = c = 4
    # Parameters per device. The rules shard `embed` over fsdp (batch is not in a parameter), so
    # every matrix and every d_model-long vector is divided by 8; the QKV and MLP-up biases
    # ([heads, 3, head_dim] and [d_ff]: heads and mlp -> model, size 1) are whole on every device.
    per_layer_fsdp = (
        3 * d * d + d * d + d + 2 * d * f + d + 4 * d
    )  # qkv, dense(+b), up, down(+b), LNs
    per_layer_whole = 3 * d + f  # qkv bias, up bias
    sharded = 2 * V * d + 2 * d + L * per_layer_fsdp  # embed_in, embed_out, final LN, layers
    params = (sharded / 8 + L * per_layer_whole) * f32
    assert sharded + L * per_layer_whole == count_params(ModelConfig.from_config(_small().model))

    planner = Planner(_small(model__remat_policy="full"), 8, "a100-80gb")
    m = planner.memory(_mesh(fsdp=8), "full", grad_accum=1)
    assert m.params == pytest.approx(params, abs=1)
    # AdamW keeps mu and nu like the parameters (float32) plus step counts (a few bytes).
    assert 0 <= m.optimizer - 2 * params <= 64
    assert m.gradients == pytest.approx(params, abs=1)  # the float32 accumulator
    assert m.batch == rows * (t + 1) * 4  # int32 tokens, seq_len + 1 per row
    assert m.micro_gradients == 0  # one microbatch: no second gradient
    assert m.update == pytest.approx(params + m.optimizer, abs=1)  # updates + new moments

    tokens = rows * t
    # remat full: each layer keeps only its input, [tokens, d] in the compute dtype.
    assert m.activations == pytest.approx(L * tokens * d * c, abs=1)
    # Loss (its custom VJP forms each chunk's gradient in the forward), one loss term (no z-loss):
    # - one chunk: float32 [rows, chunk, V] exponentials and logit gradient, or, larger here,
    #   the logit gradient and the chunk's float32 kernel gradient [d, V], whole over fsdp
    #   before its reduce-scatter;
    chunk_arrays = max(2 * rows * chunk * V * f32, rows * chunk * V * f32 + d * V * f32)
    assert chunk_arrays == rows * chunk * V * f32 + d * V * f32
    # - the float32 kernel-gradient accumulator, sharded like the kernel (d over fsdp: no data
    #   shards to keep partial sums for);
    accumulator = d * V * f32 / 8
    # - the output projection gathered over fsdp, in the compute dtype;
    kernel = d * V * c
    # - per token: the hidden states' gradient, the final LayerNorm's input and chunk-major
    #   output ([d] each, compute dtype), its float32 output [d] and 1/std (one float32).
    hidden = tokens * (3 * c * d + f32 * d + f32)
    loss = chunk_arrays + accumulator + kernel + hidden
    assert m.loss_phase == pytest.approx(loss, abs=1)
    # One layer recomputed, all of what remat none keeps of it: the LayerNorm core's float32
    # output and 1/std (one for both LayerNorms) and the two LayerNorms' outputs, q, k, v and the
    # attention output (4 d), float32 exponentials and probabilities over [heads, t] plus two row
    # statistics, GELU's output and its derivative (2 f); and that layer's fsdp-sharded weights
    # gathered, with their gradients, float32.
    ln = f32 * d + f32 + 2 * c * d
    recomputed = tokens * (ln + 4 * c * d + (4 + c) * h * t + 8 * h + 2 * c * f)
    layer = recomputed + per_layer_fsdp * (f32 + f32)
    assert m.layer_phase == pytest.approx(layer, abs=1)
    backward = m.activations + max(loss, layer)
    total = params + m.optimizer + params + m.batch + max(backward, m.update)
    assert m.total == pytest.approx(total, abs=4)


def test_parameter_bytes_follow_the_rules():
    """With `embed` unsharded by the rules, fsdp:8 divides nothing: every device holds all."""
    config = _small()
    config.mesh.rules = tuple((k, None if k == "embed" else v) for k, v in config.mesh.rules)
    planner = Planner(config, 8, "a100-80gb")
    m = planner.memory(_mesh(fsdp=8), "full", grad_accum=1)
    assert m.params == count_params(ModelConfig.from_config(config.model)) * 4


def test_bfloat16_parameters_still_accumulate_float32_gradients():
    """train.py accumulates gradients in float32 whatever param_dtype is: bf16 parameters halve
    the parameter bytes, not the gradients'."""
    mesh = _mesh(fsdp=8)
    f32 = Planner(_small(), 8, "a100-80gb").memory(mesh, "full", grad_accum=1)
    bf16 = Planner(_small(model__param_dtype="bfloat16"), 8, "a100-80gb").memory(
        mesh, "full", grad_accum=1
    )
    assert bf16.params * 2 == pytest.approx(f32.params, rel=0.01)
    assert bf16.gradients == f32.gradients


def test_time_by_hand_data_parallel_across_two_nodes():
    """data:16 on two 8-GPU A100 nodes: the all-reduce rides 8 NICs per node (8 x 25 GB/s)."""
    config = _small()
    cfg = ModelConfig.from_config(config.model)
    planner = Planner(config, 16, "a100-40gb")
    cand = planner.evaluate(_mesh(data=16), "none", grad_accum=1)
    # float32 gradients, replicated, all-reduced once per microbatch; the output projection's
    # too: the loss sums it per data shard over its 2 chunks (512 positions / loss_chunk 256) and
    # reduces it once.
    grad_bytes = count_params(cfg) * 4
    allreduce = 2 * 15 / 16 * grad_bytes / min(300e9, 8 * 25e9)
    assert cand.comm_s["data"] == pytest.approx(allreduce)
    assert cand.comm_s["fsdp"] == cand.comm_s["model"] == 0
    # Executed FLOPs: the model FLOPs alone (remat none recomputes nothing, and the chunked loss
    # forms each chunk's gradient in its forward: no second output projection).
    tokens = 16 * 512
    per_token = training_flops_per_token(cfg, 512)
    throughput = 16 * 312e12 * 0.4
    assert cand.compute_s == pytest.approx(per_token * tokens / throughput)
    backward = 2 / 3 * training_flops_per_token(cfg, 512) * tokens / throughput
    exposed = max(allreduce / 8, allreduce - backward)  # all but overlapped, one layer's share
    assert cand.exposed_comm_s == pytest.approx(exposed)
    assert cand.step_time_s == pytest.approx(cand.compute_s + exposed)
    assert cand.tokens_per_day == pytest.approx(tokens / cand.step_time_s * 86400)
    assert cand.days == pytest.approx(1000 * tokens / cand.tokens_per_day)  # steps x batch x seq


def test_model_parallel_allreduces_by_hand():
    """data:2,model:4 in one H100 node: 4 activation all-reduces per layer + 2 (embedding, output
    projection), all exposed."""
    config = _small()
    config.model.dtype = "bfloat16"
    planner = Planner(config, 8, "h100-80gb")
    cand = planner.evaluate(_mesh(data=2, model=4), "dots", grad_accum=2)
    rows = 16 // 2 // 2  # per microbatch, per device
    one = 2 * 3 / 4 * rows * 512 * 768 * 2 / 450e9  # ring all-reduce of [tokens, d] bf16
    # The gradients of the parameters model does not shard (LayerNorms, the two output biases of
    # each layer, the final LayerNorm: [d] vectors) are all-reduced over it too, in float32.
    replicated = (8 * (4 + 2) + 2) * 768 * 4
    grads = 2 * 3 / 4 * replicated / 450e9
    assert cand.comm_s["model"] == pytest.approx(2 * ((8 * 4 + 2) * one + grads))  # 2 microbatches
    # remat full recomputes neither the attention output nor the MLP output projection (their
    # outputs only feed the residual sum), so none of the all-reduces that follow them.
    full = planner.evaluate(_mesh(data=2, model=4), "full", grad_accum=2)
    assert full.comm_s["model"] == pytest.approx(2 * ((8 * 4 + 2) * one + grads))
    # The z-loss adds one: its own hidden-state gradient of the output projection.
    config.train.z_loss = 1e-4
    z = Planner(config, 8, "h100-80gb").evaluate(_mesh(data=2, model=4), "dots", grad_accum=2)
    assert z.comm_s["model"] == pytest.approx(2 * ((8 * 4 + 3) * one + grads))


def test_links_inside_and_across_nodes():
    """A group inside a node uses NVLink; across nodes, its members per node each bring a NIC."""
    config = load_config("configs/polyglot_ko_1_3b.py")
    planner = Planner(config, 256, "a100-40gb")

    def data_bandwidth(**mesh):
        """The bandwidth the data all-reduce got: 2(n-1)/n x gradient bytes x 4 microbatches,
        each float32 gradient once (the output projection's too: the loss reduces it after its
        last chunk)."""
        cand = planner.evaluate(_mesh(**mesh), "full", grad_accum=4)
        n = cand.mesh["data"] * cand.mesh["dcn_data"]
        return 4 * 2 * (n - 1) / n * cand.memory.gradients / cand.comm_s["data"]

    # data over 32 nodes with fsdp:8 inside each: one member per node, one 25 GB/s NIC; the same
    # written as dcn_data; two members per node (data:2 inside): two NICs.
    assert data_bandwidth(data=32, fsdp=8) == pytest.approx(25e9)
    assert data_bandwidth(fsdp=8, dcn_data=32) == pytest.approx(25e9)
    assert data_bandwidth(data=2, fsdp=4, dcn_data=32) == pytest.approx(50e9)
    # Inside one node: NVLink. Without dcn axes make_mesh lays devices out data-major, so
    # data:8,fsdp:32 puts data across nodes (stride 32); data:8 inside takes dcn_fsdp.
    assert data_bandwidth(data=8, dcn_fsdp=32) == pytest.approx(300e9)
    assert data_bandwidth(data=8, fsdp=32) == pytest.approx(25e9)
    # fsdp over all 256: 8 NICs per node (200 GB/s), below NVLink's 300. Per microbatch, the
    # float32 parameters fsdp shards are gathered twice (forward, backward) and their gradients
    # reduce-scattered, except: the input embedding is gathered once (for its lookup; the
    # backward only scatter-adds into its gradient) and its gradient reduce-scattered once; the
    # output projection is gathered once (for the loss, which forms its gradient in the forward)
    # and its gradient reduce-scattered once per loss chunk (2048 / 512 = 4). The QKV and MLP-up
    # biases fsdp does not shard get their gradients all-reduced (twice the bytes' time).
    cand = planner.evaluate(_mesh(fsdp=256), "full", grad_accum=4)
    biases = 24 * (3 * 2048 + 8192) * 4
    embed_in = embed_out = 30080 * 2048 * 4
    rest = count_params(ModelConfig.from_config(config.model)) * 4 - biases - embed_in - embed_out
    gathered = 2 * rest + embed_out + embed_in
    reduced = rest + 4 * embed_out + embed_in
    expected = 4 * (gathered + reduced + 2 * biases) * 255 / 256 / 200e9
    assert cand.comm_s["fsdp"] == pytest.approx(expected)


def test_layouts_use_every_device_and_split_across_nodes():
    planner = Planner(load_config("configs/polyglot_ko_1_3b.py"), 32, "a100-40gb")
    layouts = planner.layouts()
    assert layouts and all(math.prod(m.values()) == 32 for m in layouts)
    hybrid = [m for m in layouts if any(m[a] > 1 for a in ("dcn_data", "dcn_fsdp", "dcn_model"))]
    assert hybrid and all(m["data"] * m["fsdp"] * m["model"] == 8 for m in hybrid)
    assert all(16 % (m["model"] * m["dcn_model"]) == 0 for m in layouts)  # 16 heads
    one_node = Planner(_small(), 8, "a100-40gb").layouts()
    assert all(m["dcn_data"] == m["dcn_fsdp"] == m["dcn_model"] == 1 for m in one_node)
    assert not any(m["model"] == 8 for m in one_node)  # 12 heads


def test_plan_is_sorted_fitting_first_by_step_time():
    candidates = Planner(_small(), 8, "a100-40gb").plan()
    fits = [c.fits for c in candidates]
    assert fits == sorted(fits, reverse=True)
    times = [c.step_time_s for c in candidates if c.fits]
    assert all(b >= a * (1 - 1e-6) for a, b in zip(times, times[1:], strict=False))
    for c in candidates[:5]:
        j = c.to_json()
        assert math.prod(j["mesh"].values()) == 8
        assert {"remat_policy", "grad_accum", "bytes_per_device", "fits", "step_time_s"} <= set(j)
        assert {"tokens_per_day", "days"} <= set(j)


def test_12_8b_state_alone_rules_out_pure_data_parallel():
    """16 bytes per parameter (float32 weights, Adam's two moments, float32 gradients) of 12.9B
    parameters is 206 GB, far beyond one A100's 40 GiB, whatever the remat."""
    config = load_config("configs/polyglot_ko_12_8b.py")
    planner = Planner(config, 8, "a100-40gb")
    cand = planner.evaluate(_mesh(data=8), "full", grad_accum=32)
    assert cand.bytes_per_device >= 16 * 12_893_603_840
    assert not cand.fits
    sharded = planner.memory(_mesh(fsdp=8), "full", 32)
    assert sharded.params + sharded.optimizer + sharded.gradients == pytest.approx(
        16 * 12_893_603_840 / 8, rel=1e-3
    )


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("data:2,tensor:4", "unknown mesh axis 'tensor'; valid axes: data, fsdp, model, dcn_data"),
        ("data:2,model:2", "uses 4 devices, not all 8: its sizes must multiply to 8, e.g. model:8"),
        ("data:two", "size 'two' of data is not a positive int"),
        ("data:0,fsdp:8", "size '0' of data is not a positive int"),
        ("data=2,model=4", "'data=2' is not NAME:SIZE"),
        ("data:2,data:4", "axis data is given twice"),
        ("", "mesh layout '' is empty: write it like data:2,model:4"),
    ],
)
def test_parse_layout_errors_list_what_is_valid(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_layout(text, 8)


def test_layout_errors_list_valid_sizes():
    planner = Planner(_small(), 8, "a100-40gb")
    with pytest.raises(ConfigError) as e:
        planner.parse_layout("model:8")
    assert "config.model.num_heads=12 is not divisible" in str(e.value)
    assert "model sizes that divide on 8 devices: 1, 2, 4" in str(e.value)
    with pytest.raises(ConfigError, match=r"e\.g\. .*fsdp:8"):
        planner.parse_layout("fsdp:4")
    odd = Planner(_small(train__batch_size=12), 8, "a100-40gb")
    with pytest.raises(ConfigError, match="valid data x fsdp products: 1, 2, 4"):
        odd.parse_layout("data:8")


def test_device_kind_and_count_errors():
    with pytest.raises(ConfigError, match="known kinds: a100-40gb, a100-80gb, h100-80gb, h200"):
        device_kind("v100")
    for bad in (0, -8):
        with pytest.raises(ConfigError, match=f"--devices={bad} must be a positive int"):
            Planner(_small(), bad, "a100-40gb")


def test_hardware_table_rows():
    """The datasheet figures the issue names, and a source for every row."""
    expected = {
        "a100-40gb": (40 * GiB, 312e12),
        "a100-80gb": (80 * GiB, 312e12),
        "h100-80gb": (80 * GiB, 989e12),
        "tpu-v4": (32 * GiB, 275e12),
        "tpu-v5p": (95 * GiB, 459e12),
        "tpu-v6e": (32 * GiB, 918e12),
    }
    for name, (memory, peak) in expected.items():
        kind = DEVICE_KINDS[name]
        assert (kind.memory_bytes, kind.peak_flops) == (memory, peak)
    assert DEVICE_KINDS["h200"].peak_flops == 989e12
    assert all(k.source and 0 < k.memory_fraction <= 1 for k in DEVICE_KINDS.values())
