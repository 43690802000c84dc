"""Every difference between the jax lines we support (0.10 on Python 3.11, 0.11 and 0.12 on 3.12).

One place for them, so that the rest of the package is written against one API. Each function's
docstring says which jax version needs what. Imports only jax and the standard library (the kernels
use it, and must import on machines with nothing but jax).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import jax
from jax import lax

# Device kinds (as `jax.Device.device_kind` spells them) that Pallas' Triton lowering maps to a
# compute capability when it lowers for a GPU it cannot see.
GPU_KINDS = {80: "NVIDIA A100-SXM4-80GB", 90: "NVIDIA H100 80GB HBM3"}


def abstract_gpu(compute_capability: int = 90) -> jax.sharding.AbstractDevice:
    """An abstract NVIDIA GPU of this generation (80: A100, 90: H100), to lower for without one."""
    if compute_capability not in GPU_KINDS:
        raise ValueError(
            f"compute_capability={compute_capability} is not one of {sorted(GPU_KINDS)}"
        )
    return jax.sharding.AbstractDevice(
        device_kind=GPU_KINDS[compute_capability], num_cores=132, platform="gpu"
    )


def gpu_lowering_target(compute_capability: int = 90) -> contextlib.AbstractContextManager:
    """A context in which Pallas' Triton lowering targets this GPU generation (80 or 90).

    Lowering for a GPU from a host without one (``jit(f).trace(...).lower(lowering_platforms=
    ("cuda",))``): jax 0.10 took compute capability 9.0 when it saw no GPU; jax 0.11 and 0.12 raise
    "No supported GPU devices found" unless an abstract GPU device is set with
    ``jax.sharding.use_abstract_mesh``. This sets one on an empty mesh (no sharding changes); jax
    0.10 accepts it and ignores it (it still lowers for 9.0).
    """
    empty = jax.sharding.AbstractMesh((), (), abstract_device=abstract_gpu(compute_capability))
    return jax.sharding.use_abstract_mesh(empty)


def gpu_lowering_mesh(
    axis_sizes: tuple[int, ...], axis_names: tuple[str, ...], compute_capability: int = 90
) -> jax.sharding.AbstractMesh:
    """A mesh of abstract GPUs (Auto axes) for ``jax.shard_map`` when lowering for a GPU without one.

    jax 0.11 and 0.12 lower a shard_map body under the shard_map's own mesh, so a mesh of the
    host's CPU devices hides ``gpu_lowering_target``'s device from Pallas' Triton lowering (the
    same "No supported GPU devices found"); a mesh of abstract GPUs carries it. jax 0.10 lowers
    with either.
    """
    return jax.sharding.AbstractMesh(
        axis_sizes,
        axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names),
        abstract_device=abstract_gpu(compute_capability),
    )


def mosaic_gpu_load(ref, layout):
    """``plgpu.load`` of the whole ``ref`` into registers with ``layout`` (Mosaic GPU).

    jax 0.10 takes the index as a required positional argument (``load(ref, (), layout=...)``);
    jax 0.11 deprecates it (index the ref with ``ref.at[...]`` instead); jax 0.12 removes it.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if _takes_index(plgpu.load):
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


@functools.cache
def _takes_index(load) -> bool:
    parameters = inspect.signature(load).parameters
    return "idx" in parameters and parameters["idx"].default is inspect.Parameter.empty


def interpret_gpu_params(**kwargs):
    """``plgpu.InterpretGPUParams(**kwargs)``: Pallas' GPU interpret mode for Mosaic GPU kernels.

    Public in ``jax.experimental.pallas.mosaic_gpu`` from jax 0.11 on; jax 0.10 has it only under
    ``jax._src.pallas.mosaic_gpu.interpret.params``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(**kwargs)


def triton_compiler_params(*, num_warps: int, num_stages: int):
    """``pallas.triton.CompilerParams``: imported lazily, with its DeprecationWarning silenced.

    The Pallas Triton lowering is deprecated from jax 0.11 on (importing
    ``jax.experimental.pallas.triton`` warns; jax 0.10 does not) but it is still the one that runs
    on A100 and H100 through jax 0.12.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def varying_axes(x: jax.Array) -> frozenset[str]:
    """The manual (shard_map) mesh axes ``x`` varies over; empty outside shard_map.

    jax 0.10 to 0.12 keep them in ``jax.typeof(x).mat.varying`` (a ``ManualAxisType``; jax before
    0.10, which we do not support, called it ``vma``).
    """
    return frozenset(jax.typeof(x).mat.varying)


def shape_varying_like(like: jax.Array, shape: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """``shape`` marked as varying over the same manual mesh axes as ``like``.

    ``shard_map(check_vma=True)`` requires ``pallas_call`` outputs to say how they vary; outside
    shard_map the annotation is empty and ignored. jax 0.10 to 0.12 spell it
    ``ShapeDtypeStruct(..., manual_axis_type=jax.typeof(like).mat)`` (before 0.10: ``vma=``).
    """
    mat = jax.typeof(like).mat
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, manual_axis_type=mat)


def vary_like(like: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` marked as varying over every manual mesh axis that ``like`` varies over.

    Inside ``shard_map(check_vma=True)``, ``plgpu.kernel``'s outputs carry no varying axes (jax 0.10
    to 0.12), and ``custom_vjp`` insists that primal and cotangent types match.
    """
    missing = tuple(sorted(varying_axes(like) - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x
