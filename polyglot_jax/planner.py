"""Plans a training run before any device exists: memory per device, step time, days to a budget.

    planner = Planner(config, devices=256, kind="a100-40gb")
    best = planner.plan()[0]            # Candidate: mesh, remat_policy, grad_accum, memory, times
    planner.evaluate({"fsdp": 8, "dcn_data": 32}, "full", grad_accum=4)

`plan` enumerates mesh layouts (`data, fsdp, model` within a node, `dcn_data, dcn_fsdp, dcn_model`
across nodes; every layout's sizes multiply to the device count) x remat policy x gradient
accumulation at the config's global batch, keeps those whose sizes divide the model and batch, and
predicts for each one the bytes a device holds at the train step's peak, whether that fits, the
step time, tokens/day and days to the token budget. Nothing here touches a device: shapes come from
`jax.eval_shape`, so a laptop plans for 256 GPUs.

Units: bytes per device, seconds, FLOP/s; "rows" are sequences of `train.seq_len` tokens.

Memory (what the compiled `train.build_step` step holds at its peak: argument + output + temp -
alias of XLA's memory analysis, with params and optimizer state donated):

  persistent   parameters (param_dtype), optimizer state (optax's own tree: AdamW mu and nu),
               the float32 gradient accumulator and the batch, each sharded as the config's
               `mesh.rules` shard it: every dimension divided by the product of the mesh axes that
               `nn.logical_to_mesh_axes` gives it (never a formula that ignores the rules).
  + the larger of two phases:
    update     the optimizer's temporaries: the updates (one float32 value per parameter) and the
               new moments, all alive until the finite check picks new or old state.
    backward   the gradient of the current microbatch (only with grad_accum > 1), the activations
               every layer saved for the backward under the remat policy, and the larger of
                 the loss phase: float32 logits and their gradient for one `loss_chunk` of
                 positions over the device's share of the vocabulary, the final LayerNorm's
                 residuals, and (fsdp) the gathered output projection and its gradient before
                 the reduce-scatter, and one whole-size buffer of the input embedding (its
                 gathered table, then its scatter-added gradient);
                 the layer phase: one layer's activations recomputed (any policy but none) and
                 (fsdp) that layer's gathered weights and their gradients before the
                 reduce-scatter.

Which tensors a layer saves is what `jax.checkpoint` keeps of model.Block for each policy (JAX's
saved-residual tracing of Block, checked against the buffers the compiled forward scan stacks, and
written out term by term in `_layer_terms`): rows per device = microbatch / (the mesh axes the rules give `batch`); head,
d_ff and vocabulary widths divided over the axes the rules give `heads`, `mlp` and `vocab`.
tests/test_planner.py checks the totals against XLA's compiled figures within 20%.

Time (per step): compute = executed FLOPs / (devices x peak x mfu), where executed FLOPs are the
model FLOPs of `flops.training_flops_per_token` plus what remat recomputes (the whole layer forward
for `full`, the attention matmuls where the policy does not keep them, and the output projection,
which the chunked loss always recomputes); `mfu` is the fraction of peak the executed matmuls reach.
Plus the exposed part of the collectives, per microbatch (the accumulation scan's carry is sharded
like the parameters, so XLA reduces every microbatch's gradient inside the scan):

  data, fsdp  the parameters an axis shards are all-gathered (param_dtype: XLA gathers the float32
              master weights, then casts) for the forward and again for the backward (the input
              embedding only for the forward) and their float32 gradients reduce-scattered; the
              gradients of the parameters it replicates are all-reduced over it (data: all of
              them, the output projection's once per loss chunk, since the loss's scan sums it);
  model       tensor parallelism: sharded weights are used in place; all-reduces of [tokens,
              d_model] activations in the compute dtype, 2 per layer forward (attention and MLP
              outputs), 2 backward (their inputs' gradients), 2 more when `full` recomputes the
              forward, and 2 for the vocab-sharded embedding and output projection; plus the
              gradients of the weights it replicates (LayerNorms, output biases).

`Candidate.collective_bytes` counts these as mesh_bench does ((n - 1)/n x the array's bytes per
collective): the tests match XLA's compiled figures on CPU. Ring times: all-gather and
reduce-scatter that many bytes / bandwidth, all-reduce twice that, over the slowest link a group
spans: the node's interconnect when the group stays in a node, else the network with as many
NICs working in parallel as the group has members per node (rail-optimised: one NIC per GPU),
never more than the node's interconnect. Overlap: data and fsdp collectives overlap the backward
(the forward's gathers: the forward) except one layer's share, which waits; model-parallel
all-reduces sit on the critical path and are fully exposed. Left out: latency per collective, the
optimizer's elementwise update, input pipeline time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from polyglot_jax.config import check_train
from polyglot_jax.errors import ConfigError
from polyglot_jax.flops import training_flops_per_token
from polyglot_jax.hardware import DeviceKind, device_kind
from polyglot_jax.model import REMAT_POLICIES, ModelConfig, abstract_params
from polyglot_jax.optimizer import make_optimizer
from polyglot_jax.partitioning import DCN_AXES, MESH_AXES, check_divisibility, rules_from_config

AXES = MESH_AXES + DCN_AXES
# From keeping everything to recomputing everything; ties in time and memory prefer the earlier.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
# Assumed fraction of peak that the executed matmuls reach (communication is modelled apart).
# 0.4 sits below the best published large-scale figure (PaLM on TPU v4: 46.2% model FLOPs, 57.8%
# hardware FLOPs utilisation; Chowdhery et al. 2022) and above the GPU runs that paper lists
# (GPT-3 21.3%, Megatron-Turing NLG 30.2%, which include their communication); this code's
# default attention is plain XLA, not a fused kernel. `plan --mfu` shows other values.
DEFAULT_MFU = 0.4
SECONDS_PER_DAY = 86400.0
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter")
_F32 = 4


def mesh_text(mesh: Mapping[str, int]) -> str:
    """`data:2,model:4`: the axes larger than 1, in MESH_AXES + DCN_AXES order (`data:1` if none)."""
    parts = [f"{a}:{mesh[a]}" for a in AXES if mesh.get(a, 1) > 1]
    return ",".join(parts) or "data:1"


def parse_mesh(text: str, devices: int, examples: Iterable[str] = ()) -> dict[str, int]:
    """`data:2,model:4` (or `data=2 model=4`) as a full layout {axis: size} over the six axes.

    ConfigError (one line) for an unknown axis, a size that is not a positive int, or sizes that do
    not multiply to `devices`; each message lists what would be valid (`examples`: valid layouts
    to name when the sizes do not multiply out; default data:N and fsdp:N)."""
    mesh = dict.fromkeys(AXES, 1)
    items = [p for p in text.replace(" ", ",").split(",") if p.strip()]
    if not items:
        raise ConfigError(f"--mesh={text!r} is empty; write it like data:2,model:4")
    for item in items:
        name, sep, value = item.replace("=", ":").partition(":")
        name = name.strip()
        if name not in mesh:
            raise ConfigError(
                f"--mesh={text!r}: unknown mesh axis {name!r}; valid axes: {', '.join(AXES)}"
            )
        try:
            size = int(value)
        except ValueError:
            size = 0
        if not sep or size <= 0 or str(size) != value.strip():
            raise ConfigError(
                f"--mesh={text!r}: {name} needs a positive int size, like {name}:2 "
                f"(sizes must multiply to the {devices} devices)"
            )
        mesh[name] = size
    used = math.prod(mesh.values())
    if used != devices:
        named = ", ".join(list(examples) or [f"data:{devices}", f"fsdp:{devices}"])
        raise ConfigError(
            f"--mesh={text!r} uses {used} devices, not the {devices} of --devices; the sizes must "
            f"multiply to {devices}, e.g. {named}"
        )
    return mesh


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factorizations(n: int, parts: int) -> Iterable[tuple[int, ...]]:
    """Ordered tuples of `parts` positive ints whose product is n."""
    if parts == 1:
        yield (n,)
        return
    for d in _divisors(n):
        for rest in _factorizations(n // d, parts - 1):
            yield (d, *rest)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One parameter: its path, logical axis names, shape and bytes per element."""

    path: tuple[str, ...]
    names: tuple[str | None, ...]
    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def in_layers(self) -> bool:
        return self.path[0].startswith("layers")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device of one candidate at the train step's peak (module docstring: the model).

    `total` is what XLA's memory analysis calls argument + output + temp - alias."""

    params: int
    optimizer: int
    gradients: int  # the float32 accumulator the microbatch scan carries
    batch: int
    update: int  # optimizer-phase temporaries
    micro_gradients: int  # the current microbatch's gradient (grad_accum > 1)
    activations: int  # what every layer saved for the backward, all layers together
    loss_phase: int  # loss chunk + final LayerNorm + gathered output projection and its gradient
    layer_phase: int  # one recomputed layer + its gathered weights and their gradients

    @property
    def backward(self) -> int:
        """Temporaries at the backward's peak."""
        return self.micro_gradients + self.activations + max(self.loss_phase, self.layer_phase)

    @property
    def total(self) -> int:
        persistent = self.params + self.optimizer + self.gradients + self.batch
        return persistent + max(self.backward, self.update)

    def to_json(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "backward": self.backward, "total": self.total}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout x remat policy x gradient accumulation, with its predicted memory and time."""

    mesh: dict[str, int]  # all six axes; the product is the device count
    remat_policy: str
    grad_accum: int
    rows_per_device: int  # sequences per device per microbatch
    memory: Memory
    usable_bytes: int  # the device's HBM x memory fraction
    compute_s: float  # per step, at the assumed MFU
    exposed_comm_s: float  # per step, the collectives' part that does not overlap compute
    comm_s: dict[str, float]  # per step, each mesh axis's collectives in full (data, fsdp, model)
    # per step, bytes each device sends per collective kind: (n - 1)/n x the shared array's bytes
    collective_bytes: dict[str, float]
    step_time_s: float
    tokens_per_day: float
    days: float  # to the token budget
    mfu: float  # model FLOPs / (step time x devices x peak): what the run would report

    @property
    def bytes_per_device(self) -> int:
        return self.memory.total

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    def sort_key(self) -> tuple:
        """Fitting first, then faster, then fewer microbatches (larger matmuls than the model
        credits), then less memory, then the simpler layout."""
        return (
            not self.fits,
            float(f"{self.step_time_s:.6g}"),  # equal costs tie despite rounding noise
            self.grad_accum,
            self.bytes_per_device,
            REMAT_ORDER.index(self.remat_policy),
            sum(v > 1 for v in self.mesh.values()),
            mesh_text(self.mesh),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": dict(self.mesh),
            "remat_policy": self.remat_policy,
            "grad_accum": self.grad_accum,
            "rows_per_device": self.rows_per_device,
            "bytes_per_device": self.bytes_per_device,
            "fits": self.fits,
            "step_time_s": self.step_time_s,
            "tokens_per_day": self.tokens_per_day,
            "days": self.days,
            "mfu": self.mfu,
            "compute_s": self.compute_s,
            "exposed_comm_s": self.exposed_comm_s,
            "comm_s": dict(self.comm_s),
            "collective_bytes": dict(self.collective_bytes),
            "usable_bytes": self.usable_bytes,
            "memory": self.memory.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class _AxisLink:
    """A mesh axis of a layout: its total size and the bandwidth its collectives get (bytes/s)."""

    size: int
    bandwidth: float


class Planner:
    """Memory and time of every layout of one config on `devices` devices of one kind.

    Args:
      config: a full config (configs/*.py); its model, train and mesh.rules sections are used, its
        own mesh sizes and grad_accum are not (the planner enumerates them).
      devices: how many devices the run has (> 0).
      kind: a `hardware.DEVICE_KINDS` name or a DeviceKind row.
      mfu: assumed fraction of peak the executed FLOPs reach (0, 1].
      tokens: the token budget for `days`; None: steps x batch_size x seq_len.
      memory_fraction: share of HBM usable; None: the kind's.
      inter_node_bw: bytes/s per device between nodes; None: the kind's.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        devices: int,
        kind: str | DeviceKind,
        *,
        mfu: float = DEFAULT_MFU,
        tokens: float | None = None,
        memory_fraction: float | None = None,
        inter_node_bw: float | None = None,
    ):
        if not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
            raise ConfigError(f"--devices={devices!r} must be a positive int")
        self.kind = device_kind(kind) if isinstance(kind, str) else kind
        if not (isinstance(mfu, int | float) and 0 < mfu <= 1):
            raise ConfigError(f"--mfu={mfu!r} must be a number within (0, 1]")
        if memory_fraction is not None:
            if not (isinstance(memory_fraction, int | float) and 0 < memory_fraction <= 1):
                raise ConfigError(
                    f"--memory_fraction={memory_fraction!r} must be a number within (0, 1]"
                )
            self.kind = dataclasses.replace(self.kind, memory_fraction=float(memory_fraction))
        if inter_node_bw is not None:
            if not (isinstance(inter_node_bw, int | float) and inter_node_bw > 0):
                raise ConfigError(f"the inter-node bandwidth {inter_node_bw!r} must be > 0")
            self.kind = dataclasses.replace(self.kind, inter_node_bw=float(inter_node_bw))
        if "model" not in config or "train" not in config or "mesh" not in config:
            raise ConfigError("config needs the sections config.model, config.train, config.mesh")
        self.config = config
        self.devices = devices
        self.mfu = float(mfu)
        self.cfg = ModelConfig.from_config(config.model)
        # The train section alone (the planner picks mesh and grad_accum itself).
        train = ml_collections.ConfigDict(config.train.to_dict())
        train.grad_accum = 1
        probe = ml_collections.ConfigDict({"train": train})
        check_train(probe, self.cfg, dict.fromkeys(AXES, 1))
        self.batch = int(config.train.batch_size)
        self.seq_len = int(config.train.seq_len)
        self.loss_chunk = min(int(config.train.loss_chunk), self.seq_len)
        budget = float(config.train.steps) * self.batch * self.seq_len if tokens is None else tokens
        if not (isinstance(budget, int | float) and budget > 0 and math.isfinite(budget)):
            raise ConfigError(f"--tokens={tokens!r} must be a positive number")
        self.tokens = float(budget)
        self.rules = rules_from_config(config.mesh.get("rules", ()))
        self.packed = config.get("data", {}).get("mode", "concat") == "packed"
        self._state_cache: dict[tuple[int, ...], dict[str, float]] = {}
        self._boxed = abstract_params(self.cfg)
        self._leaves = self._param_leaves()
        self._opt = self._optimizer_leaves()
        self._fields = {
            "heads": ("config.model.num_heads", self.cfg.num_heads),
            "vocab": ("config.model.vocab_size", self.cfg.vocab_size),
            "mlp": ("config.model.d_ff", self.cfg.d_ff),
            "embed": ("config.model.d_model", self.cfg.d_model),
            "kv": ("head_dim (config.model.d_model / num_heads)", self.cfg.head_dim),
            "layers": ("config.model.num_layers", self.cfg.num_layers),
        }
        self.c = jnp.dtype(self.cfg.dtype).itemsize  # compute dtype bytes
        self.layer_params = sum(leaf.numel for leaf in self._leaves if leaf.in_layers)
        self.model_flops_per_token = training_flops_per_token(self.cfg, self.seq_len)

    # ----------------------------------------------------------------- parameters and state

    def _param_leaves(self) -> list[_Leaf]:
        flat = jax.tree_util.tree_flatten_with_path(
            self._boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )[0]
        return [
            _Leaf(
                tuple(str(getattr(k, "key", k)) for k in path),
                tuple(leaf.names),
                tuple(leaf.value.shape),
                jnp.dtype(leaf.value.dtype).itemsize,
            )
            for path, leaf in flat
        ]

    def _optimizer_leaves(self) -> list[tuple[int, int, _Leaf | None]]:
        """(numel, itemsize, the parameter it shards like or None) per optimizer-state leaf.

        A leaf under a parameter's path with that parameter's shape shards like it (train.py's
        `_shardings_like` rule); anything else (step counts) is replicated."""
        by_path = {leaf.path: leaf for leaf in self._leaves}
        unboxed = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype),
            self._boxed,
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
        abstract = jax.eval_shape(make_optimizer(self.config.train).init, unboxed)
        out = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            match = None
            for start in range(len(keys)):
                param = by_path.get(keys[start:])
                if param is not None and param.shape == tuple(leaf.shape):
                    match = param
                    break
            out.append((math.prod(leaf.shape), jnp.dtype(leaf.dtype).itemsize, match))
        return out

    def _spec_factors(self, names: tuple, totals: Mapping[str, int]) -> tuple[int, ...]:
        """Per dimension, the product of the mesh axes the rules give it (1: unsharded)."""
        spec = nn.logical_to_mesh_axes(names, self.rules)
        factors = []
        for axes in spec:
            axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
            factors.append(math.prod(totals[a] for a in axes))
        return tuple(factors)

    def _mesh_axes_of(self, names: tuple) -> set[str]:
        """The mesh axes the rules shard a parameter with these logical axes over."""
        spec = nn.logical_to_mesh_axes(names, self.rules)
        return {x for a in spec if a is not None for x in (a if isinstance(a, tuple) else (a,))}

    def _state_bytes(self, totals: Mapping[str, int]) -> dict[str, float]:
        """Parameter, gradient, optimizer and gathered bytes per device for mesh axis totals."""
        key = tuple(totals[a] for a in MESH_AXES)
        if key not in self._state_cache:
            self._state_cache[key] = self._compute_state_bytes(totals)
        return self._state_cache[key]

    def _compute_state_bytes(self, totals: Mapping[str, int]) -> dict[str, float]:
        params = grads = 0.0
        top_gathered = top_grads = layer_gathered = layer_grads = 0.0
        # Per mesh axis, for the collectives: the bytes of the parameters it shards once gathered
        # over it (param_dtype), their float32 gradients likewise, and the float32 gradients of
        # the parameters it replicates (all-reduced over it).
        # The input embedding is gathered for the forward's lookup only (its gradient is a
        # scatter-add, which needs no weights); everything else again in the backward. The output
        # projection's gradient is summed inside the loss's scan over chunks, and an axis that
        # replicates it all-reduces it once per chunk (as XLA compiles the scan).
        chunks = math.ceil(self.seq_len / self.loss_chunk)
        gathered_fwd = dict.fromkeys(MESH_AXES, 0.0)
        gathered_bwd = dict.fromkeys(MESH_AXES, 0.0)
        gathered_grads = dict.fromkeys(MESH_AXES, 0.0)
        replicated_grads = dict.fromkeys(MESH_AXES, 0.0)
        shard = {}
        for leaf in self._leaves:
            factor = math.prod(self._spec_factors(leaf.names, totals))
            shard[leaf.path] = factor
            numel = leaf.numel / factor
            params += numel * leaf.itemsize
            grads += numel * _F32
            axes = self._mesh_axes_of(leaf.names)
            for axis in MESH_AXES:
                if axis in axes:
                    gathered_fwd[axis] += numel * totals[axis] * leaf.itemsize
                    if leaf.path[0] != "embed_in":
                        gathered_bwd[axis] += numel * totals[axis] * leaf.itemsize
                    gathered_grads[axis] += numel * totals[axis] * _F32
                else:
                    times = chunks if leaf.path[0] == "embed_out" else 1
                    replicated_grads[axis] += numel * _F32 * times
            if totals["fsdp"] > 1 and "fsdp" in axes:
                full = numel * totals["fsdp"]  # this leaf gathered over fsdp
                if leaf.in_layers:
                    layer_gathered += full * leaf.itemsize / self.cfg.num_layers
                    layer_grads += full * _F32 / self.cfg.num_layers
                elif leaf.path[0] == "embed_in":
                    # One whole-size buffer stays live across the backward: the gathered table
                    # of the forward's lookup, then the scatter-added gradient.
                    top_gathered += full * max(leaf.itemsize, _F32)
                else:
                    # Read after the layers (output projection, final LayerNorm): gathered, and
                    # its gradient exists whole before the reduce-scatter, in the loss's backward.
                    top_gathered += full * leaf.itemsize
                    top_grads += full * _F32
        optimizer = 0.0
        for numel, itemsize, param in self._opt:
            factor = shard[param.path] if param is not None else 1
            optimizer += numel / factor * itemsize
        return {
            "params": params,
            "grads": grads,
            "optimizer": optimizer,
            "top_gathered": top_gathered + top_grads,
            "layer_gathered": layer_gathered + layer_grads,
            **{f"gathered_fwd_{a}": gathered_fwd[a] for a in MESH_AXES},
            **{f"gathered_bwd_{a}": gathered_bwd[a] for a in MESH_AXES},
            **{f"gathered_grads_{a}": gathered_grads[a] for a in MESH_AXES},
            **{f"replicated_grads_{a}": replicated_grads[a] for a in MESH_AXES},
        }

    # ----------------------------------------------------------------- activations

    def _act_divisors(self, totals: Mapping[str, int]) -> dict[str, int]:
        """How the rules shard activations: rows over `batch`; widths over the rest."""

        def factors(names):
            return self._spec_factors(names, totals)

        resid = factors(("batch", "length", "embed"))
        heads = factors(("batch", "length", "heads", "kv"))
        mlp = factors(("batch", "length", "mlp"))
        vocab = factors(("batch", "length", "vocab"))
        return {
            "rows": resid[0],
            "resid": resid[1] * resid[2],  # a [d_model] vector of each token
            "heads": heads[1] * heads[2] * heads[3],  # a [heads, head_dim] one
            "heads_only": heads[1] * heads[2],  # a [heads] one (softmax statistics)
            "mlp": mlp[1] * mlp[2],
            "vocab": vocab[1] * vocab[2],
            "length": resid[1],
        }

    def _layer_terms(
        self, policy: str, div: Mapping[str, int], *, recomputed: bool = False
    ) -> float:
        """Bytes one layer saves for the backward, per token of the device's rows.

        The residuals `jax.checkpoint` keeps of model.Block (parallel residual, fused QKV, partial
        RoPE, exact GELU) under each policy, c = compute dtype bytes:
          full           the layer input x                                   c·d
          dots_no_batch  x, the QKV and MLP-up matmul outputs                c·d + 3c·d + c·f
          dots           those, plus (xla attention) the score and value
                         matmul outputs, accumulated in float32             + 4·h·t + 4·d
          none           both LayerNorms' float32 statistics (x - mean, the normalised x and the
                         mean's product; shared, since both LayerNorms read the same x) and their
                         two outputs                                         12·d + 2c·d
                         rotated q and k, v, the attention output            4c·d
                         xla attention: the float32 exponentials and the
                         c probabilities, two float32 row statistics         (4 + c)·h·t + 8·h
                         flash kernels: only the log-sum-exp                 4·h
                         GELU's four intermediates                           4c·f
        with d, f and h divided over the axes the rules give embed, mlp and heads. (These are
        the per-layer buffers the compiled forward scan stacks; the causal mask and RoPE's tables
        do not depend on the layer and are kept once: `_once_terms`.)

        `recomputed`: the live set while the backward runs through one rematerialised layer, the
        `none` set with two of GELU's four intermediates (the MLP's backward, which runs first,
        consumes them as it goes; XLA's compiled peak on CPU matches this within a few percent).
        """
        cfg, c = self.cfg, self.c
        d, f, h, t = cfg.d_model, cfg.d_ff, cfg.num_heads, self.seq_len
        xla = cfg.attention_impl == "xla"
        x = c * d / div["resid"]
        qkv = 3 * c * d / div["heads"]
        up = c * f / div["mlp"]
        if policy == "full":
            return x
        if policy == "dots_no_batch":
            return x + qkv + up
        if policy == "dots":
            extra = (4 * h * t / div["heads_only"] + 4 * d / div["heads"]) if xla else 0.0
            return x + qkv + up + extra
        ln = (12 + 2 * c) * d / div["resid"]
        attn_in_out = 4 * c * d / div["heads"]
        if xla:
            attn = ((4 + c) * h * t + 8 * h) / div["heads_only"]
        else:
            attn = 4 * h / div["heads_only"]
        gelu = (2 if recomputed else 4) * c * f / div["mlp"]
        return ln + attn_in_out + attn + gelu

    def _once_terms(self, policy: str, div: Mapping[str, int]) -> float:
        """Bytes per token that `none` saves once for all layers: the loop-invariant residuals
        of the scan, RoPE's float32 cos and sin (8·rotary) and, for xla attention, the causal
        mask (bool) and a float32 tensor of the same [heads, t] per token that the compiled scan
        carries beside it (5·h·t)."""
        if policy != "none":
            return 0.0
        cfg = self.cfg
        once = 8 * cfg.rotary_dim / div["length"]
        if cfg.attention_impl == "xla":
            once += 5 * cfg.num_heads * self.seq_len / div["heads_only"]
        return once

    def _weight_casts(self, totals: Mapping[str, int]) -> float:
        """Bytes per layer of the compute-dtype copies of a layer's weights that `none` saves
        (the casts are residuals too when the compute dtype differs from param_dtype)."""
        if jnp.dtype(self.cfg.dtype) == jnp.dtype(self.cfg.param_dtype):
            return 0.0
        total = 0.0
        for leaf in self._leaves:
            if leaf.in_layers and "kernel" in leaf.path[-1]:
                factor = math.prod(self._spec_factors(leaf.names, totals))
                total += leaf.numel / factor / self.cfg.num_layers * self.c
        return total

    # ----------------------------------------------------------------- layouts

    def _totals(self, mesh: Mapping[str, int]) -> dict[str, int]:
        return {a: mesh[a] * mesh[f"dcn_{a}"] for a in MESH_AXES}

    def check_layout(self, mesh: Mapping[str, int]) -> None:
        """ConfigError unless the rules' sharded parameter dimensions divide over `mesh`."""
        check_divisibility(self._boxed, mesh, self.rules, self._fields)

    def _batch_factor(self, mesh: Mapping[str, int]) -> int:
        return self._act_divisors(self._totals(mesh))["rows"]

    def grad_accums(self, mesh: Mapping[str, int]) -> list[int]:
        """Accumulation counts whose microbatch divides over the mesh axes that shard rows."""
        rows = self._batch_factor(mesh)
        return [a for a in _divisors(self.batch) if (self.batch // a) % rows == 0]

    def layouts(self) -> list[dict[str, int]]:
        """Every layout whose sizes divide the model and some microbatch of the global batch.

        Within-node axes alone (devices laid out data-major, model innermost, as
        `partitioning.make_mesh` does), and, when the devices fill several nodes, every split into
        a node's worth of within-node axes x across-node `dcn_*` axes. Layouts whose collectives
        would cost the same (same axis sizes, same members per node) are listed once.
        """
        node = self.kind.devices_per_node
        seen, out = set(), []
        candidates = []
        for ici in _factorizations(self.devices, 3):
            candidates.append(
                {**dict(zip(MESH_AXES, ici, strict=True)), **dict.fromkeys(DCN_AXES, 1)}
            )
        if self.devices > node and self.devices % node == 0:
            for ici in _factorizations(node, 3):
                for dcn in _factorizations(self.devices // node, 3):
                    if math.prod(dcn) > 1:
                        candidates.append(
                            {
                                **dict(zip(MESH_AXES, ici, strict=True)),
                                **dict(zip(DCN_AXES, dcn, strict=True)),
                            }
                        )
        for mesh in candidates:
            links = self._links(mesh)
            signature = tuple((v.size, v.bandwidth) for v in links.values())
            if signature in seen:
                continue
            try:
                self.check_layout(mesh)
            except ConfigError:
                continue
            if not self.grad_accums(mesh):
                continue
            seen.add(signature)
            out.append(mesh)
        return out

    def parse_layout(self, text: str) -> dict[str, int]:
        """`parse_mesh` for this planner's device count, naming valid layouts in its errors,
        then `check_user_layout`."""
        try:
            mesh = parse_mesh(text, self.devices)
        except ConfigError as e:
            if "multiply to" not in str(e):
                raise
            examples = [mesh_text(m) for m in self.layouts()[:4]]
            raise ConfigError(
                str(e).split(", e.g. ")[0] + ", e.g. " + ", ".join(examples)
            ) from None
        self.check_user_layout(mesh)
        return mesh

    def check_user_layout(self, mesh: Mapping[str, int]) -> None:
        """A layout the user named: one ConfigError naming the problem and the valid sizes."""
        try:
            self.check_layout(mesh)
        except ConfigError as e:
            bad = next(
                (
                    a
                    for a in ("model", "fsdp", "data")
                    if f"the {a}" in str(e) or f"x {a}" in str(e)
                ),
                "model",
            )
            valid = self._total_sizes(bad)
            raise ConfigError(
                f"--mesh={mesh_text(mesh)}: {e}; {bad} sizes that divide on {self.devices} "
                f"devices: {', '.join(map(str, valid)) or 'none'}"
            ) from None
        if not self.grad_accums(mesh):
            rows = self._batch_factor(mesh)
            valid = [r for r in _divisors(self.devices) if self.batch % r == 0]
            raise ConfigError(
                f"--mesh={mesh_text(mesh)}: config.train.batch_size={self.batch} does not divide "
                f"over the {rows} devices that shard its rows (data x fsdp); valid data x fsdp "
                f"products: {', '.join(map(str, valid))}"
            )

    def _total_sizes(self, axis: str) -> list[int]:
        return sorted({m[axis] * m[f"dcn_{axis}"] for m in self.layouts()})

    def _links(self, mesh: Mapping[str, int]) -> dict[str, _AxisLink]:
        """Each mesh axis's size and bandwidth (module docstring: rail-optimised rings)."""
        kind = self.kind
        node = min(kind.devices_per_node, self.devices)
        hybrid = any(mesh[a] > 1 for a in DCN_AXES)
        links = {}
        stride = 1
        for axis in reversed(MESH_AXES):  # model innermost
            n_ici, n_dcn = mesh[axis], mesh[f"dcn_{axis}"]
            size = n_ici * n_dcn
            if hybrid:
                crosses, per_node = n_dcn > 1, n_ici
            else:
                crosses = stride * size > node
                per_node = size if not crosses else max(1, node // stride)
            stride *= n_ici
            crosses = crosses and size > 1  # a size-1 axis has no collectives
            bandwidth = kind.intra_node_bw
            if crosses:
                bandwidth = min(kind.intra_node_bw, per_node * kind.inter_node_bw)
            links[axis] = _AxisLink(size, bandwidth)
        return {a: links[a] for a in MESH_AXES}

    # ----------------------------------------------------------------- one candidate

    def memory(self, mesh: Mapping[str, int], policy: str, grad_accum: int) -> Memory:
        """Bytes per device at the step's peak for one layout, policy and accumulation count."""
        if policy not in REMAT_POLICIES:
            raise ConfigError(f"remat policy {policy!r} is not one of {', '.join(REMAT_POLICIES)}")
        totals = self._totals(mesh)
        state = self._state_bytes(totals)
        div = self._act_divisors(totals)
        micro_rows = self.batch // grad_accum
        if micro_rows % div["rows"]:
            raise ConfigError(
                f"batch {self.batch} / grad_accum {grad_accum} = {micro_rows} rows do not divide "
                f"over the {div['rows']} devices that shard rows"
            )
        rows = micro_rows // div["rows"]
        tokens = rows * self.seq_len
        cfg, c = self.cfg, self.c
        d = cfg.d_model
        layers = cfg.num_layers
        saved = layers * tokens * self._layer_terms(policy, div)
        saved += tokens * self._once_terms(policy, div)
        if policy == "none":
            saved += layers * self._weight_casts(totals)
        recompute = (
            0.0 if policy == "none" else tokens * self._layer_terms("none", div, recomputed=True)
        )
        layer_phase = recompute + state["layer_gathered"]
        chunk = self.loss_chunk / div["length"]
        logits = rows * chunk * 2 * _F32 * cfg.vocab_size / div["vocab"]
        final_ln = tokens * ((12 + c) * d + c * d) / div["resid"]  # + the hidden, chunk-major
        loss_phase = logits + final_ln + state["top_gathered"]
        batch_arrays = 3 if self.packed else 1  # tokens (+ segment ids and positions)
        batch = self.batch // div["rows"] * (self.seq_len + 1) * 4 * batch_arrays
        return Memory(
            params=round(state["params"]),
            optimizer=round(state["optimizer"]),
            gradients=round(state["grads"]),
            batch=batch,
            update=round(state["grads"] + state["optimizer"]),
            micro_gradients=round(state["grads"]) if grad_accum > 1 else 0,
            activations=round(saved),
            loss_phase=round(loss_phase),
            layer_phase=round(layer_phase),
        )

    def _executed_flops_per_token(self, policy: str) -> tuple[float, float]:
        """(forward, backward) FLOPs per token, the backward with what remat recomputes."""
        cfg = self.cfg
        model = self.model_flops_per_token
        attention_fwd = 4.0 * cfg.num_layers * cfg.d_model * self.seq_len
        recompute = 2.0 * cfg.d_model * cfg.vocab_size  # the chunked loss recomputes lm_head
        if policy == "full":
            recompute += 2.0 * self.layer_params + attention_fwd
        elif policy == "dots_no_batch" or (policy == "dots" and cfg.attention_impl != "xla"):
            recompute += attention_fwd
        return model / 3.0, 2.0 * model / 3.0 + recompute

    def evaluate(self, mesh: Mapping[str, int], policy: str, grad_accum: int) -> Candidate:
        """Memory and time of one layout (all six axes), policy and accumulation count."""
        mesh = {a: int(mesh.get(a, 1)) for a in AXES}
        memory = self.memory(mesh, policy, grad_accum)
        totals = self._totals(mesh)
        state = self._state_bytes(totals)
        links = self._links(mesh)
        div = self._act_divisors(totals)
        kind = self.kind
        rows = self.batch // grad_accum // div["rows"]
        micro_tokens = self.batch // grad_accum * self.seq_len
        fwd_pt, bwd_pt = self._executed_flops_per_token(policy)
        throughput = self.devices * kind.peak_flops * self.mfu
        t_fwd = fwd_pt * micro_tokens / throughput
        t_bwd = bwd_pt * micro_tokens / throughput

        # Per microbatch, in mesh_bench's convention: (n - 1)/n x the bytes of the array the
        # group shares, what each device sends in a ring. Parameters data or fsdp shard are
        # gathered for use and their gradients reduce-scattered; gradients of the parameters an
        # axis replicates are all-reduced over it. The model axis shards weights for tensor
        # parallelism (used in place, never gathered) and all-reduces activations instead.
        def ring(axis: str, nbytes: float) -> float:
            n = links[axis].size
            return (n - 1) / n * nbytes

        sent = {kind: dict.fromkeys(MESH_AXES, 0.0) for kind in COLLECTIVES}
        for axis in ("data", "fsdp"):
            sent["all-gather"][axis] = ring(axis, state[f"gathered_fwd_{axis}"])
            sent["all-gather"][axis] += ring(axis, state[f"gathered_bwd_{axis}"])
            sent["reduce-scatter"][axis] = ring(axis, state[f"gathered_grads_{axis}"])
        for axis in MESH_AXES:
            sent["all-reduce"][axis] = ring(axis, state[f"replicated_grads_{axis}"])
        layers = self.cfg.num_layers
        model_collectives = layers * (4 + (2 if policy == "full" else 0)) + 2
        act_bytes = rows * self.seq_len * self.cfg.d_model * self.c / div["resid"]
        activations = model_collectives * ring("model", act_bytes)
        # An all-reduce is a reduce-scatter then an all-gather: twice the ring time.
        seconds = {
            axis: (
                sent["all-gather"][axis]
                + sent["reduce-scatter"][axis]
                + 2 * sent["all-reduce"][axis]
            )
            / links[axis].bandwidth
            for axis in MESH_AXES
        }
        model_act = 2 * activations / links["model"].bandwidth
        in_fwd = sum(
            ring(a, state[f"gathered_fwd_{a}"]) / links[a].bandwidth for a in ("data", "fsdp")
        )
        in_bwd = sum(seconds.values()) - in_fwd
        overlap_fwd = max(in_fwd / layers, in_fwd - t_fwd)
        overlap_bwd = max(in_bwd / layers, in_bwd - t_bwd)
        exposed = grad_accum * (overlap_fwd + overlap_bwd + model_act)
        compute = grad_accum * (t_fwd + t_bwd)
        step = compute + exposed
        tokens_per_step = self.batch * self.seq_len
        tokens_per_day = tokens_per_step / step * SECONDS_PER_DAY
        model_flops = self.model_flops_per_token * tokens_per_step
        return Candidate(
            mesh=mesh,
            remat_policy=policy,
            grad_accum=grad_accum,
            rows_per_device=rows,
            memory=memory,
            usable_bytes=kind.usable_bytes,
            compute_s=compute,
            exposed_comm_s=exposed,
            comm_s={
                a: grad_accum * (seconds[a] + (model_act if a == "model" else 0.0))
                for a in MESH_AXES
            },
            collective_bytes={
                kind: grad_accum
                * (sum(by_axis.values()) + (activations if kind == "all-reduce" else 0.0))
                for kind, by_axis in sent.items()
            },
            step_time_s=step,
            tokens_per_day=tokens_per_day,
            days=self.tokens / tokens_per_day,
            mfu=model_flops / (step * self.devices * kind.peak_flops),
        )

    def plan(
        self,
        *,
        meshes: Iterable[Mapping[str, int]] | None = None,
        policies: Iterable[str] | None = None,
        grad_accums: Iterable[int] | None = None,
    ) -> list[Candidate]:
        """Every candidate, sorted: fitting ones first, by step time (`Candidate.sort_key`).

        `meshes`, `policies`, `grad_accums` restrict the enumeration (None: all); named meshes are
        checked with `check_user_layout` (one ConfigError listing valid sizes)."""
        if meshes is None:
            layouts = self.layouts()
            if not layouts:
                raise ConfigError(
                    f"no layout of {self.devices} devices divides the model and "
                    f"config.train.batch_size={self.batch}"
                )
        else:
            layouts = [{a: int(m.get(a, 1)) for a in AXES} for m in meshes]
            for mesh in layouts:
                self.check_user_layout(mesh)
        policies = tuple(REMAT_ORDER if policies is None else policies)
        for p in policies:
            if p not in REMAT_POLICIES:
                raise ConfigError(
                    f"--remat={p!r} is not a remat policy; valid: {', '.join(REMAT_ORDER)}"
                )
        wanted = None if grad_accums is None else set(grad_accums)
        out = []
        for mesh in layouts:
            accums = self.grad_accums(mesh)
            if wanted is not None:
                accums = [a for a in accums if a in wanted]
            for accum in accums:
                for policy in policies:
                    out.append(self.evaluate(mesh, policy, accum))
        if not out:
            valid = sorted({a for m in layouts for a in self.grad_accums(m)})
            raise ConfigError(
                f"--grad_accum={sorted(wanted or ())} divides no layout's microbatch of "
                f"config.train.batch_size={self.batch}; valid: {', '.join(map(str, valid))}"
            )
        return sorted(out, key=Candidate.sort_key)

    def assumptions(self) -> list[str]:
        """The assumptions behind every figure, one sentence each (printed under the table)."""
        k = self.kind
        return [
            f"{self.devices} x {k.name}: {k.memory_bytes / 2**30:.0f} GiB, of which "
            f"{k.memory_fraction:.0%} usable; {k.peak_flops / 1e12:.0f} TFLOP/s bf16 dense peak; "
            f"{k.intra_node_bw / 1e9:.0f} GB/s within a node of {k.devices_per_node}, "
            f"{k.inter_node_bw / 1e9:.2f} GB/s per device between nodes ({k.source}).",
            f"compute at {self.mfu:.0%} of peak on executed FLOPs (model FLOPs "
            f"{self.model_flops_per_token / 1e9:.2f} GFLOP/token, plus remat recompute).",
            "data/fsdp collectives overlap compute except one layer's share; model-parallel "
            "all-reduces are fully exposed; bandwidth-only ring costs, no latency.",
            f"global batch {self.batch} x {self.seq_len} tokens; attention "
            f"{self.cfg.attention_impl}, compute {self.cfg.dtype}, params {self.cfg.param_dtype}; "
            f"budget {self.tokens:.4g} tokens.",
        ]


def plan(
    config: ml_collections.ConfigDict,
    devices: int,
    kind: str,
    **kwargs: Any,
) -> list[Candidate]:
    """`Planner(config, devices, kind, **kwargs).plan()`: every candidate, best first."""
    return Planner(config, devices, kind, **kwargs).plan()
