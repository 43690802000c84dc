"""The device mesh (data x fsdp x model, within and across nodes) and logical-axis -> mesh-axis rules.

The model only names logical axes; `config.mesh.rules` maps them onto these mesh axes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from polyglot_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)
AXES = MESH_AXES + DCN_AXES  # every axis a layout names: within a node, then across nodes
LAYOUTS_LISTED = 8  # layouts an error message lists at most (then `...`)


def resolve_mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> dict[str, int]:
    """Fills the one -1 axis (within a node) so that the product of all axes is `num_devices`."""
    shape = {}
    for name in MESH_AXES + DCN_AXES:
        value = mesh_cfg.get(name, 1)
        if not isinstance(value, int) or value == 0 or value < -1:
            raise ConfigError(f"config.mesh.{name}={value!r} must be a positive int or -1")
        shape[name] = value
    fill = [n for n, v in shape.items() if v == -1]
    sizes = f"sizes multiplying to {num_devices} from {', '.join(map(str, divisors(num_devices)))}"
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if fill:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh: the fixed axes (product {fixed}) do not divide the {num_devices} "
                f"devices; valid: {sizes}, one axis -1 to take the rest"
            )
        shape[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh: axes multiply to {fixed} but there are {num_devices} devices (a layout "
            f"must use them all); valid: {sizes}, or one axis -1 to take the rest"
        )
    return shape


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (the sizes a mesh axis over n things can take)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def axis_size(mesh_shape: Mapping[str, int], axis: str) -> int:
    """Total size of a logical mesh axis, within-node times across-node."""
    return mesh_shape[axis] * mesh_shape[f"dcn_{axis}"]


# --- layouts: {axis: size} over all six AXES, written `data:2,model:4` ----------------------------


def layout_text(mesh_shape: Mapping[str, int]) -> str:
    """`data:2,model:4`: the axes of size other than 1, in `AXES` order (`data:1` for one device)."""
    parts = [f"{a}:{mesh_shape[a]}" for a in AXES if mesh_shape.get(a, 1) != 1]
    return ",".join(parts) or "data:1"


def full_layout(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """`mesh_shape` over all six `AXES` (a missing axis is 1); one ConfigError naming the valid
    axes for an unknown one."""
    unknown = [a for a in mesh_shape if a not in AXES]
    if unknown:
        raise ConfigError(f"unknown mesh axis {unknown[0]!r}; valid axes: {', '.join(AXES)}")
    return {a: int(mesh_shape.get(a, 1)) for a in AXES}


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every tuple of `parts` positive ints whose product is n, in lexicographic order."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in divisors(n) for rest in factorizations(n // d, parts - 1)]


def layouts_over(n: int, axes: Sequence[str]) -> list[dict[str, int]]:
    """Every full layout of n devices over `axes` (the other axes 1), in lexicographic order of
    the sizes of `axes`."""
    return [
        full_layout(dict(zip(axes, sizes, strict=True))) for sizes in factorizations(n, len(axes))
    ]


def layout_list(layouts: Iterable[Mapping[str, int]]) -> str:
    """`data:8, fsdp:8, ...`: the first few layouts' `layout_text`, for an error message."""
    names = [layout_text(m) for m in layouts]
    return ", ".join(names[:LAYOUTS_LISTED]) + (", ..." if len(names) > LAYOUTS_LISTED else "")


def parse_layout(
    text: str,
    num_devices: int,
    examples: Callable[[], Iterable[Mapping[str, int]]] | None = None,
) -> dict[str, int]:
    """`data:2,model:4` (NAME:SIZE parts, separated by commas or spaces) as a full layout
    {axis: size} over `AXES`.

    One one-line ConfigError, saying what would be valid, for an empty layout, a part that is
    not NAME:SIZE, an unknown or repeated axis, a size that is not a positive int, or sizes that
    do not multiply to `num_devices`. For the last it lists `examples()` (default: the layouts
    over the axes named and data)."""
    axes = ", ".join(AXES)
    if not text.strip():
        raise ConfigError(f"mesh layout {text!r} is empty: write it like data:2,model:4 ({axes})")
    shape: dict[str, int] = {}
    for part in re.split(r"[\s,]+", text.strip()):
        name, sep, size = part.partition(":")
        if not sep or not name:
            raise ConfigError(
                f"mesh layout {text!r}: {part!r} is not NAME:SIZE (e.g. data:2,model:4; "
                f"axes: {axes})"
            )
        if name not in AXES:
            raise ConfigError(
                f"mesh layout {text!r}: unknown mesh axis {name!r}; valid axes: {axes}"
            )
        if name in shape:
            raise ConfigError(f"mesh layout {text!r}: axis {name} is given twice")
        if not (size.isascii() and size.isdigit()) or int(size) < 1:
            raise ConfigError(
                f"mesh layout {text!r}: size {size!r} of {name} is not a positive int"
            )
        shape[name] = int(size)
    used = math.prod(shape.values())
    if used != num_devices:
        options = list(examples()) if examples is not None else []
        if not options:
            options = layouts_over(num_devices, [a for a in AXES if a in shape or a == "data"])
        raise ConfigError(
            f"mesh layout {text!r} uses {used} devices, not all {num_devices}: its sizes must "
            f"multiply to {num_devices}, e.g. {layout_list(options)}"
        )
    return full_layout(shape)


def mesh_axes(names: Sequence[str | None], rules=None) -> tuple[tuple[str, ...], ...]:
    """Per logical axis in `names`, the mesh axes the logical rules shard it over (() when
    unsharded), as flax's `nn.logical_to_mesh_axes` gives them (a name, a tuple or None);
    `rules=None` uses the rules in context (`nn.logical_axis_rules`)."""
    spec = nn.logical_to_mesh_axes(names, rules)
    return tuple(() if a is None else a if isinstance(a, tuple) else (a,) for a in spec)


def check_divisibility(
    boxed_params: Any,
    mesh_shape: Mapping[str, int],
    rules,
    fields: Mapping[str, tuple[str, int]],
) -> None:
    """Every parameter dimension that `rules` shard must divide evenly over its mesh axes.

    Derived from the rules and the abstract (boxed) parameters, so editing `config.mesh.rules`
    changes what is checked. `fields` names the config field behind each logical axis
    (`{"heads": ("config.model.num_heads", 16), ...}`) for the error. One ConfigError.
    """
    flat = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    failures: dict[str, str] = {}  # logical axis -> the error for its first parameter
    for path, leaf in flat:
        spec = mesh_axes(leaf.names, rules)
        for logical, dim, axes in zip(leaf.names, leaf.value.shape, spec, strict=True):
            if not axes or logical in failures:
                continue
            size = math.prod(axis_size(mesh_shape, a) for a in axes)
            if dim % size:
                field, value = fields.get(logical, (f"the {logical!r} dimension", dim))
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                fits = [d for d in divisors(dim) if d <= math.prod(mesh_shape.values())]
                failures[logical] = (
                    f"{field}={value} is not divisible by the {' x '.join(axes)} mesh axis "
                    f"(size {size}) that config.mesh.rules give {logical!r} (parameter {name}); "
                    f"sizes that divide it: {', '.join(map(str, fits))}"
                )
    for logical in [*fields, *failures]:  # in the order `fields` names them
        if logical in failures:
            raise ConfigError(failures[logical])


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over ('data', 'fsdp', 'model') with Auto axis types (classic GSPMD propagation).

    Across nodes (dcn_* > 1) devices are laid out so that the slow network carries only the dcn
    part: on TPU slices by `mesh_utils.create_hybrid_device_mesh`; elsewhere (GPU nodes, which
    have no slice index) the devices, ordered by process, are cut into consecutive groups of
    data x fsdp x model devices, one per node, and each axis is its dcn part (across groups)
    outside its ici part. That takes a node's processes to be consecutive, as SLURM's default
    block distribution and `launch/` number them.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici = tuple(mesh_shape[a] for a in MESH_AXES)
    dcn = tuple(mesh_shape[a] for a in DCN_AXES)
    if math.prod(dcn) > 1 and all(hasattr(d, "slice_index") for d in devices):
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, allow_split_physical_axes=True
        )
    elif math.prod(dcn) > 1:
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        grid = np.asarray(ordered).reshape(dcn + ici)
        grid = grid.transpose([i for axis in range(3) for i in (axis, axis + 3)])
        grid = grid.reshape([d * i for d, i in zip(dcn, ici, strict=True)])
    else:
        grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """`config.mesh.rules` (tuples or lists from a JSON/CLI round trip) as flax logical axis rules."""
    out = []
    for rule in rules:
        logical, mesh_axes = rule
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        for axis in mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(
                    f"config.mesh.rules maps {logical!r} to unknown mesh axis {axis!r}"
                )
        out.append((logical, mesh_axes))
    return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of boxed (nn.Partitioned) values, e.g. `model.abstract_params`."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the axes the rules give `batch`."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def row_sharding(mesh: Mesh, rules) -> tuple[NamedSharding, int]:
    """Sharding of a [rows, ...] input (rows over the axes the rules give `batch`) and the row
    count multiple that divides evenly over those axes."""
    axes = mesh_axes(("batch",), rules)[0] if rules else ()
    return NamedSharding(mesh, PartitionSpec(axes or None)), math.prod(mesh.shape[a] for a in axes)


def row_placement(mesh: Mesh | None, rules) -> tuple[Mesh, tuple, NamedSharding, int]:
    """(mesh, rules, row sharding, row multiple) for work on [rows, ...] inputs (decoding,
    scoring); `mesh=None` is the first device alone, with no rules."""
    if mesh is None:
        mesh, rules = Mesh(np.asarray(jax.devices()[:1]), ("data",)), ()
    rules = tuple(rules)
    return (mesh, rules, *row_sharding(mesh, rules))


def process_row_block(sharding: jax.sharding.Sharding, rows: int) -> tuple[int, int]:
    """(i, n): the devices of this process hold exactly block i of n equal blocks of rows of a
    `[rows, ...]` array laid out by `sharding` (n = 1 when every process holds all rows).

    The input pipeline yields that block of each global batch, so a process builds only the rows
    its devices take, whatever the mesh. A layout whose rows on a process are not one such block
    (possible only with a hand-made device order) is a ConfigError rather than a wrong batch."""
    spans = sorted(
        {
            (index[0].start or 0, rows if index[0].stop is None else index[0].stop)
            for index in sharding.addressable_devices_indices_map((rows,)).values()
        }
    )
    lo, hi, gap = spans[0][0], spans[0][1], False
    for start, stop in spans[1:]:
        gap |= start > hi
        hi = max(hi, stop)
    size = hi - lo
    if gap or rows % size or lo % size:
        raise ConfigError(
            f"the batch rows on process {jax.process_index()} ({spans}) are not one of equal "
            "blocks of the global batch: order the mesh's devices by process"
        )
    return lo // size, rows // size


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole (prompts, scoring rows) as a global
    `jax.Array` laid out by `sharding`: each process places the slices its devices hold. Unlike
    `jax.device_put`, this works when the mesh spans several processes."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated(sharding: NamedSharding) -> NamedSharding:
    """The fully replicated sharding on `sharding`'s mesh: results every process can read."""
    return NamedSharding(sharding.mesh, PartitionSpec())
