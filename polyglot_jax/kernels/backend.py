"""Which Pallas lowering a kernel call uses, its compiler parameters, and the call itself.

Lowerings: ``"triton"`` (NVIDIA GPUs, A100 and H100; deprecated upstream since jax 0.11, so its
one import lives in ``polyglot_jax.jax_compat``), ``"mosaic_tpu"`` (TPU), ``"interpret"`` (any
device, the kernel body run as ordinary XLA ops; what the CPU tests use) and ``"mosaic_gpu"``
(Hopper only, never picked automatically: flash attention as warp-specialised Mosaic GPU kernels; with
``interpret=True`` it runs in Pallas' GPU interpret mode, which simulates shared memory, TMA and
barriers on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from polyglot_jax import jax_compat
from polyglot_jax.errors import ConfigError

BACKENDS = ("interpret", "triton", "mosaic_tpu", "mosaic_gpu")


def resolve_backend(interpret: bool | None, backend: str | None = None) -> str:
    """The lowering to use: ``backend`` if given, else by ``interpret`` and ``jax.default_backend()``.

    ``interpret=None`` means interpret mode on CPU and the native lowering elsewhere. ``backend`` names a
    lowering explicitly (e.g. ``"triton"`` to lower for a GPU from a CPU host with
    ``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` inside
    ``jax_compat.gpu_lowering_target()``).
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not one of {BACKENDS}")
        if backend == "mosaic_gpu":
            return backend  # interpret picks the GPU interpret mode there
        if interpret is not None and interpret != (backend == "interpret"):
            raise ConfigError(f"interpret={interpret} contradicts backend={backend!r}")
        return backend
    platform = jax.default_backend()
    if interpret is None:
        interpret = platform == "cpu"
    if interpret:
        return "interpret"
    if platform == "gpu":
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    raise ConfigError(
        f"Pallas kernels have no native lowering on the {platform!r} backend; pass interpret=True"
    )


def compiler_params(backend: str, *, num_warps: int, num_stages: int, grid_rank: int):
    """``pallas_call(compiler_params=...)`` for ``backend``; ``None`` in interpret mode.

    num_warps/num_stages only matter to Triton; on TPU every grid axis is declared parallel (no kernel
    here carries state across grid steps).
    """
    if backend == "triton":
        return jax_compat.triton_compiler_params(num_warps=num_warps, num_stages=num_stages)
    if backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_rank)
    return None


def compute_capability(backend: str) -> int:
    """The first GPU's compute capability as an int (80 for A100, 90 for H100); 90 off-GPU."""
    if backend != "triton" or jax.default_backend() != "gpu":
        return 90
    return int(str(jax.devices()[0].compute_capability).replace(".", ""))


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, ...; Triton tensors must have power-of-two shapes."""
    return n > 0 and n & (n - 1) == 0


def pallas_call_by_name(
    body: Callable,
    *,
    backend: str,
    poison: bool,
    name: str,
    grid: tuple[int, ...],
    inputs: list[tuple[str, jax.Array | None, pl.BlockSpec]],
    outputs: list[tuple[str, jax.ShapeDtypeStruct, pl.BlockSpec]],
    num_warps: int,
    num_stages: int,
    cost: pl.CostEstimate | None = None,
) -> list[jax.Array]:
    """``pl.pallas_call`` whose kernel ``body`` gets its refs as keyword arguments by name.

    inputs: (name, array or None, BlockSpec); None entries are left out, so optional operands are
    simply absent from ``body``'s keywords. outputs: (name, shape, BlockSpec). With ``poison`` every
    output buffer starts as NaN (aliased from a NaN-filled input the kernel never reads), so a tile the
    kernel forgets to write stays NaN on every lowering, not only in interpret mode.
    """
    inputs = [item for item in inputs if item[1] is not None]
    names = [n for n, _, _ in inputs]
    arrays = [a for _, a, _ in inputs]
    in_specs = [s for _, _, s in inputs]
    aliases = {}
    if poison:
        for j, (n, shape, _) in enumerate(outputs):
            aliases[len(arrays)] = j
            names.append(f"poison_{n}")
            arrays.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    names += [n for n, _, _ in outputs]

    def kernel(*refs):
        body(**{n: r for n, r in zip(names, refs, strict=True) if not n.startswith("poison_")})

    return pl.pallas_call(
        kernel,
        out_shape=[jax_compat.shape_varying_like(arrays[0], shape) for _, shape, _ in outputs],
        grid=grid,
        in_specs=in_specs,
        out_specs=[spec for _, _, spec in outputs],
        input_output_aliases=aliases,
        interpret=backend == "interpret",
        compiler_params=compiler_params(
            backend, num_warps=num_warps, num_stages=num_stages, grid_rank=len(grid)
        ),
        cost_estimate=cost,
        name=name,
    )(*arrays)
