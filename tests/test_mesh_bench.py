"""mesh_bench on 8 fake CPU devices: layouts, the HLO readers on hand-written modules, and the real
train step of configs/tiny.py compiled per layout, checked against references derived by hand
from the parameter count and the sharding rules (never against numbers the code printed)."""

import math

import flax.linen as nn
import jax
import pytest

from polyglot_jax import flops, hlo_costs, mesh_bench
from polyglot_jax.config import load_config
from polyglot_jax.errors import ConfigError
from polyglot_jax.model import ModelConfig, abstract_params, count_params
from polyglot_jax.partitioning import layout_text, make_mesh, rules_from_config

AXES_LINE = "data, fsdp, model, dcn_data, dcn_fsdp, dcn_model"


# --- layouts -----------------------------------------------------------------------------------


def test_parse_meshes_fills_missing_axes_with_one():
    shapes = mesh_bench.parse_meshes("data:8  data:2,model:4 fsdp:4,data:2", 8)
    assert shapes == [
        {"data": 8, "fsdp": 1, "model": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1},
        {"data": 2, "fsdp": 1, "model": 4, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1},
        {"data": 2, "fsdp": 4, "model": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_model": 1},
    ]
    assert [layout_text(s) for s in shapes] == [
        "data:8",
        "data:2,model:4",
        "data:2,fsdp:4",
    ]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data:2,tensor:4", f"unknown mesh axis 'tensor'; valid axes: {AXES_LINE}"),
        ("data:4", "uses 4 devices, not all 8: its sizes must multiply to 8, e.g. data:8"),
        (
            "model:2",
            "uses 2 devices, not all 8: its sizes must multiply to 8, e.g. model:8, "
            "data:2,model:4, data:4,model:2, data:8",
        ),
        ("data=8", "'data=8' is not NAME:SIZE"),
        ("data:0,model:8", "size '0' of data is not a positive int"),
        ("data:2,data:4", "axis data is given twice"),
        ("   ", "no mesh layouts given"),
    ],
)
def test_bad_layouts_are_one_line_saying_what_is_valid(spec, expected):
    with pytest.raises(ConfigError) as e:
        mesh_bench.parse_meshes(spec, 8)
    assert expected in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_size_that_does_not_divide_the_heads_lists_the_layouts_that_work():
    config = load_config("configs/tiny.py")  # 4 heads
    shape = mesh_bench.parse_meshes("model:8", 8)[0]
    with pytest.raises(ConfigError) as e:
        mesh_bench.validate_layout(config, shape, 8)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("mesh layout 'model:8': config.model.num_heads=4 is not divisible")
    # Hand-derived: over data x model, 4 heads take model 1, 2 or 4.
    assert message.endswith(
        "layouts over data, model that work: data:2,model:4, data:4,model:2, data:8"
    )


def test_unknown_axis_given_to_measure_directly():
    with pytest.raises(ConfigError, match=f"unknown mesh axis 'tensor'; valid axes: {AXES_LINE}"):
        mesh_bench.measure(load_config("configs/tiny.py"), {"tensor": 8})


def test_dcn_axes_on_devices_without_slices_take_nodes_outermost():
    """dcn_fsdp:2,model:4 on devices 0..7 (as on GPU nodes): two 'nodes' (0-3, 4-7) of model 4
    each; dcn_data:2,data:2,model:2: the data axis is node-major."""
    shape = mesh_bench.parse_meshes("dcn_fsdp:2,model:4", 8)[0]
    mesh = make_mesh(shape, jax.devices())
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "model": 4}
    assert [[d.id for d in row] for row in mesh.devices[0]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shape = mesh_bench.parse_meshes("dcn_data:2,data:2,model:2", 8)[0]
    mesh = make_mesh(shape, jax.devices())
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "model": 2}
    assert [[d.id for d in row[0]] for row in mesh.devices] == [[0, 1], [2, 3], [4, 5], [6, 7]]


# --- reading compiled HLO ----------------------------------------------------------------------

HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_dot (p0: f32[16,32], p1: f32[32,8]) -> f32[16,8] {
  %p0 = f32[16,32]{1,0} parameter(0)
  %p1 = f32[32,8]{1,0} parameter(1)
  ROOT %d = f32[16,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[16,32], /*index=2*/f32[256])) -> (s32[], f32[16,32], f32[256]) {
  %t = (s32[], f32[16,32]{1,0}, /*index=2*/f32[256]{0}) parameter(0)
  %x = f32[16,32]{1,0} get-tuple-element(%t), index=1
  %w = f32[32,8]{1,0} constant({...})
  %f = f32[16,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %y = f32[256]{0} get-tuple-element(%t), index=2
  %ar = f32[256]{0} all-reduce(%y), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  ROOT %r = (s32[], f32[16,32]{1,0}, f32[256]{0}) tuple(%i, %x, %ar)
}

%cond (t: (s32[], f32[16,32], f32[256])) -> pred[] {
  %t = (s32[], f32[16,32]{1,0}, f32[256]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%wrapped_reduce_scatter (w: f32[1024]) -> f32[256] {
  %w = f32[1024]{0} parameter(0)
  ROOT %rs3 = f32[256]{0} reduce-scatter(%w), channel_id=9, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[16,32]) -> f32[64,32] {
  %x = f32[16,32]{1,0} parameter(0)
  %loop = (s32[], f32[16,32]{1,0}, f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = f32[64,32]{1,0} all-gather(%x), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %ags = (f32[16,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%x), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[64,32]{1,0} all-gather-done(%ags)
  %rs = f32[16]{0} reduce-scatter(%v), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %rs2 = f32[8]{0} reduce-scatter(%v2), channel_id=5, replica_groups=mesh['axis_0'=8] {'axis_0':(2)4}, dimensions={0}, to_apply=%add
  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%p, %q), channel_id=6, replica_groups={{0,1},{2,3},{4,5},{6,7}}
  %cps = (f32[128]{0}, f32[128]{0}, u32[], u32[]) collective-permute-start(%z), channel_id=7, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[128]{0} collective-permute-done(%cps)
  %ars = bf16[1024]{0} all-reduce-start(%h), channel_id=8, replica_groups={}, to_apply=%add
  %ard = bf16[1024]{0} all-reduce-done(%ars)
  %rss = ((f32[1024]{0}), f32[256]{0}) async-start(%big), async_execution_thread="main", calls=%wrapped_reduce_scatter
  %rsd = f32[256]{0} async-done(%rss), calls=%wrapped_reduce_scatter
  ROOT %out = f32[64,32]{1,0} copy(%agd)
}
"""


def test_collective_bytes_by_kind_on_a_hand_written_module():
    got = hlo_costs.collective_bytes(HLO)
    assert got == {
        # f32[256] over groups of 4, in a loop body run 3 times; bf16[1024] over all 8 devices
        "all-reduce": 1024 * 3 / 4 * 3 + 2048 * 7 / 8,
        # f32[64,32] gathered in groups of 4 (iota form), once plain and once async (start only)
        "all-gather": 2 * 8192 * 3 / 4,
        # results f32[16] (axis_1 = 4 devices) and f32[8] (sub-axis of size 4): whole = n x result;
        # and f32[1024] in groups of 4 inside an async wrapper (its start and done name it)
        "reduce-scatter": 64 * 4 * 3 / 4 + 32 * 4 * 3 / 4 + 4096 * 3 / 4,
        "all-to-all": 128 * 1 / 2,  # two f32[2,8] pieces in groups of 2
        "collective-permute": 512,  # what each device sends, counted at the start only
    }


def test_matmul_flops_count_a_loop_body_as_often_as_it_runs():
    total, beyond_first_run = hlo_costs.matmul_flops(HLO)
    dot = 2 * 16 * 8 * 32  # output [16, 8], contracted over 32
    assert (total, beyond_first_run) == (3 * dot, 2 * dot)


# --- the real train step -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_config("configs/tiny.py")


@pytest.fixture(scope="module")
def measured(tiny):
    """configs/tiny.py's train step per layout; data:8 also runs one timed step."""
    layouts = mesh_bench.parse_meshes("data:8 data:2,fsdp:4 fsdp:8 data:2,model:4", 8)
    return {
        layout_text(s): mesh_bench.measure(tiny, s, timed_steps=1 if s["data"] == 8 else 0)
        for s in layouts
    }


def _local_parameters(config, mesh_shape) -> float:
    """Parameters held per device: each one's size over the mesh axes its logical axes map to."""
    rules = rules_from_config(config.mesh.rules)
    boxed = abstract_params(ModelConfig.from_config(config.model))
    total = 0.0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        shards = 1
        for axes in nn.logical_to_mesh_axes(leaf.names, rules):
            for axis in () if axes is None else axes if isinstance(axes, tuple) else (axes,):
                shards *= mesh_shape[axis]
        total += math.prod(leaf.value.shape) / shards
    return total


def test_every_field_is_present(measured):
    for name, r in measured.items():
        assert r["layout"] == name
        assert math.prod(r["mesh"].values()) == r["devices"] == 8
        assert r["device_kind"] == "cpu"
        assert set(r["collective_bytes"]) == set(mesh_bench.COLLECTIVE_KINDS)
        assert r["bytes_per_device"] > 0 and r["flops"] > 0
        m = r["memory"]
        assert r["bytes_per_device"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    assert measured["data:8"]["step_time_s"] > 0
    assert measured["fsdp:8"]["step_time_s"] is None


def test_state_per_device_is_the_sharded_parameters_times_three(measured, tiny):
    """Arguments = float32 params, Adam mu and nu (12 bytes per parameter held) + this device's
    rows of the int32 [16, 129] batch + the optimizer's step counters (a few scalars)."""
    batch_bytes = 16 * 129 * 4
    for name, r in measured.items():
        shape = r["mesh"]
        expected = 12 * _local_parameters(tiny, shape) + batch_bytes / (
            shape["data"] * shape["fsdp"]
        )
        assert 0 <= r["memory"]["argument"] - expected <= 64, name
    assert _local_parameters(tiny, measured["data:8"]["mesh"]) == count_params(
        ModelConfig.from_config(tiny.model)
    )


def test_memory_per_device_falls_as_fsdp_grows(measured):
    by_fsdp = [measured[n]["bytes_per_device"] for n in ("data:8", "data:2,fsdp:4", "fsdp:8")]
    assert by_fsdp[0] > by_fsdp[1] > by_fsdp[2]
    assert by_fsdp[2] < 0.8 * by_fsdp[0]


def test_data_parallel_all_reduces_float32_gradients(measured, tiny):
    """4 bytes x P parameters x (n - 1) / n, n = 8 (or as reduce-scatter, where XLA splits it);
    tests/test_flops.py checks the same with several loss chunks."""
    params = count_params(ModelConfig.from_config(tiny.model))
    expected = 4 * params * 7 / 8
    got = measured["data:8"]["collective_bytes"]
    assert got["all-reduce"] == pytest.approx(expected, rel=0.01) or got[
        "reduce-scatter"
    ] == pytest.approx(expected, rel=0.01)
    assert got["all-to-all"] == got["collective-permute"] == 0


def test_model_parallel_adds_activation_collectives(measured, tiny):
    """data:2,model:4: gradients all-reduce over data (n = 2) only for the quarter of the
    model-sharded parameters each device holds; the rest of the all-reduce is activations: at
    least one [16 / 2, 128, 128] float32 residual stream per layer over model (n = 4)."""

    def activations(name, n_data):
        r = measured[name]
        gradients = 4 * _local_parameters(tiny, r["mesh"]) * (n_data - 1) / n_data
        return r["collective_bytes"]["all-reduce"] - gradients

    one_stream = (16 // 2) * 128 * 128 * 4 * 3 / 4
    assert activations("data:2,model:4", 2) >= tiny.model.num_layers * one_stream
    assert abs(activations("data:8", 8)) < 64  # a pure data layout: a few loss scalars at most


def test_flops_per_device_match_the_6nd_reference(measured, tiny):
    """Dots = training FLOPs (6 x matmul parameters + attention, flops.py) / 8 devices, for every
    layout (the loss computes its gradient while its logits exist: no second forward). XLA's own
    count takes each scanned layer's body once, so `flops` corrects it upwards."""
    cfg = ModelConfig.from_config(tiny.model)
    tokens = tiny.train.batch_size * tiny.train.seq_len
    reference = flops.training_flops_per_token(cfg, tiny.train.seq_len) * tokens / 8
    for name, r in measured.items():
        assert r["matmul_flops"] == pytest.approx(reference, rel=0.02), name
        assert r["flops"] >= r["matmul_flops"] and r["flops"] > r["flops_xla"]


def test_table_and_chart(measured, tmp_path):
    results = list(measured.values())
    table = mesh_bench.format_table(results).splitlines()
    assert table[0].split()[:3] == ["layout", "GiB/device", "TFLOP/device"]
    assert [row.split()[0] for row in table[1:]] == list(measured)
    assert table[1].split()[-1] != "-" and table[2].split()[-1] == "-"  # step time where timed
    mesh_bench.write_chart(results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]  # no temporary file left
