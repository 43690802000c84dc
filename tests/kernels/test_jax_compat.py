"""polyglot_jax.jax_compat, the one place for jax version differences, on whichever jax is installed.

The kernels' lowering and interpret tests exercise every shim end to end; these pin down the parts
those would only show indirectly: the import contract (the GPU image has jax and nothing else of
ours), bad input, and the lowering target actually reaching Pallas' Triton lowering.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from polyglot_jax import jax_compat
from polyglot_jax.kernels import rope

# Not on the GPU benchmark machine (jax 0.11 there): the kernels must import without them.
ABSENT = ("grain", "ml_collections", "seqio", "tensorflow", "flax", "optax", "orbax", "torch")


def test_kernels_import_with_nothing_but_jax():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT)
    code = f"import sys; {blocked}; import polyglot_jax.kernels, polyglot_jax.jax_compat"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("compute_capability", [75, 100])
def test_unknown_gpu_generation_is_one_clear_error(compute_capability):
    with pytest.raises(ValueError, match=f"compute_capability={compute_capability} is not one of"):
        jax_compat.gpu_lowering_target(compute_capability)


def test_lowering_target_reaches_the_triton_lowering():
    """The abstract device's generation is what Pallas' Triton lowering sees: a kernel lowered for
    cuda inside the target names it (jax 0.11 on; jax 0.10 lowers without one, for 9.0)."""
    x = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((1, 64), jnp.int32)

    def f(x, positions):
        return rope(x, positions, rotary_dim=32, backend="triton")

    with jax_compat.gpu_lowering_target(80):
        assert jax.sharding.get_abstract_mesh().abstract_device.device_kind.startswith(
            "NVIDIA A100"
        )
        text = jax.jit(f).trace(x, positions).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert jax.sharding.get_abstract_mesh().abstract_device is None  # restored on exit


def test_lowering_mesh_is_abstract_gpus_with_auto_axes():
    mesh = jax_compat.gpu_lowering_mesh((2, 4), ("data", "model"))
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert mesh.abstract_device.platform == "gpu"


def test_varying_axes_outside_and_inside_shard_map():
    from jax.sharding import PartitionSpec as P

    assert jax_compat.varying_axes(jnp.zeros(4)) == frozenset()
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = []

    def body(x):
        seen.append(jax_compat.varying_axes(x))
        shape = jax_compat.shape_varying_like(x, jax.ShapeDtypeStruct((3,), jnp.float32))
        seen.append(frozenset(shape.manual_axis_type.varying))
        return x

    jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(jnp.zeros(4))
    assert seen == [frozenset({"data"})] * 2
