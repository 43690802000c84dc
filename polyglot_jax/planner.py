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

Memory: `plan_memory.MemoryModel` (its module docstring has the model), which the planner owns;
`Planner.memory` is its figure for one layout.

Time (per step): compute = executed FLOPs / (devices x peak x mfu), where executed FLOPs are the
model FLOPs of `flops.training_flops_per_token` plus what remat recomputes
(`flops.recompute_flops_per_token`: for `full` the forward of the matmuls whose outputs the backward
reads, QKV, attention and MLP up; for `dots_no_batch` the attention matmuls; plus, with a fused
attention kernel, which is no dot, its forward under any policy but none); the chunked loss
recomputes nothing (it forms each chunk's gradient in its forward); `mfu` is the fraction of peak
the executed matmuls reach. Plus the exposed part of the collectives, per microbatch (the
accumulation scan's carry is sharded like the parameters, so XLA reduces every microbatch's
gradient inside the scan):

  data, fsdp  the parameters an axis shards are all-gathered (param_dtype: XLA gathers the float32
              master weights, then casts) for the forward and again for the backward, except the
              output projection (gathered once, for the loss) and the input embedding
              (gathered once, for its lookup); their float32 gradients are reduce-scattered, the output
              projection's once per loss chunk (inside the loss's scan); the gradients of the
              parameters an axis replicates are all-reduced over it (data: all of them, once
              per microbatch; the loss sums the output projection's per data shard over the
              chunks and reduces it once);
  model       tensor parallelism: sharded weights are used in place; all-reduces of [tokens,
              d_model] activations in the compute dtype, 2 per layer forward (attention and MLP
              outputs), 2 backward (their inputs' gradients), whatever the policy (`full`
              recomputes neither projection they follow), 1 for the vocab-sharded embedding
              and 1 per loss term (2 with the z-loss) for the output projection's hidden-state
              gradient; plus the gradients of the weights it replicates (LayerNorms, output
              biases).

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

import ml_collections

from polyglot_jax.config import check_train
from polyglot_jax.errors import ConfigError
from polyglot_jax.flops import recompute_flops_per_token, training_flops_per_token
from polyglot_jax.hardware import DeviceKind, device_kind
from polyglot_jax.model import REMAT_POLICIES, ModelConfig
from polyglot_jax.partitioning import (
    AXES,
    DCN_AXES,
    MESH_AXES,
    check_divisibility,
    divisors,
    full_layout,
    layout_text,
    layouts_over,
    parse_layout,
)
from polyglot_jax.plan_memory import Memory, MemoryModel, axis_totals

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
            layout_text(self.mesh),
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
        self.memory_model = MemoryModel(config, self.cfg)
        self.batch = self.memory_model.batch
        self.seq_len = self.memory_model.seq_len
        self.c = self.memory_model.c  # compute dtype bytes
        budget = float(config.train.steps) * self.batch * self.seq_len if tokens is None else tokens
        if not (isinstance(budget, int | float) and budget > 0 and math.isfinite(budget)):
            raise ConfigError(f"--tokens={tokens!r} must be a positive number")
        self.tokens = float(budget)
        self._fields = {
            "heads": ("config.model.num_heads", self.cfg.num_heads),
            "vocab": ("config.model.vocab_size", self.cfg.vocab_size),
            "mlp": ("config.model.d_ff", self.cfg.d_ff),
            "embed": ("config.model.d_model", self.cfg.d_model),
            "kv": ("head_dim (config.model.d_model / num_heads)", self.cfg.head_dim),
            "layers": ("config.model.num_layers", self.cfg.num_layers),
        }
        self.layer_params = self.memory_model.layer_params
        self.model_flops_per_token = training_flops_per_token(self.cfg, self.seq_len)

    # ----------------------------------------------------------------- layouts

    def check_layout(self, mesh: Mapping[str, int]) -> None:
        """ConfigError unless the rules' sharded parameter dimensions divide over `mesh`."""
        check_divisibility(self.memory_model.boxed, mesh, self.memory_model.rules, self._fields)

    def _batch_factor(self, mesh: Mapping[str, int]) -> int:
        return self.memory_model.act_divisors(axis_totals(mesh))["rows"]

    def grad_accums(self, mesh: Mapping[str, int]) -> list[int]:
        """Accumulation counts whose microbatch divides over the mesh axes that shard rows."""
        rows = self._batch_factor(mesh)
        return [a for a in divisors(self.batch) if (self.batch // a) % rows == 0]

    def layouts(self) -> list[dict[str, int]]:
        """Every layout whose sizes divide the model and some microbatch of the global batch.

        Within-node axes alone (devices laid out data-major, model innermost, as
        `partitioning.make_mesh` does), and, when the devices fill several nodes, every split into
        a node's worth of within-node axes x across-node `dcn_*` axes. Layouts whose collectives
        would cost the same (same axis sizes, same members per node) are listed once.
        """
        node = self.kind.devices_per_node
        seen, out = set(), []
        candidates = layouts_over(self.devices, MESH_AXES)
        if self.devices > node and self.devices % node == 0:
            for ici in layouts_over(node, MESH_AXES):
                for dcn in layouts_over(self.devices // node, DCN_AXES):
                    if math.prod(dcn.values()) > 1:
                        candidates.append({**ici, **{a: dcn[a] for a in DCN_AXES}})
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
        """`partitioning.parse_layout` for this planner's device count, naming layouts that
        divide the model in its errors, then `check_user_layout`."""
        mesh = parse_layout(text, self.devices, examples=self.layouts)
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
                f"--mesh={layout_text(mesh)}: {e}; {bad} sizes that divide on {self.devices} "
                f"devices: {', '.join(map(str, valid)) or 'none'}"
            ) from None
        if not self.grad_accums(mesh):
            rows = self._batch_factor(mesh)
            valid = [r for r in divisors(self.devices) if self.batch % r == 0]
            raise ConfigError(
                f"--mesh={layout_text(mesh)}: config.train.batch_size={self.batch} does not divide "
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
        """Bytes per device at the step's peak for one layout, policy and accumulation count
        (`plan_memory.MemoryModel.memory`)."""
        return self.memory_model.memory(mesh, policy, grad_accum)

    def _executed_flops_per_token(self, policy: str) -> tuple[float, float]:
        """(forward, backward) FLOPs per token, the backward with what remat recomputes."""
        cfg = dataclasses.replace(self.cfg, remat_policy=policy)
        model = self.model_flops_per_token
        recompute = recompute_flops_per_token(cfg, self.seq_len)
        if policy != "none" and cfg.attention_impl != "xla":
            # A fused attention kernel is no dot, so every policy but none recomputes it.
            recompute += 4.0 * cfg.num_layers * cfg.d_model * self.seq_len
        return model / 3.0, 2.0 * model / 3.0 + recompute

    def evaluate(self, mesh: Mapping[str, int], policy: str, grad_accum: int) -> Candidate:
        """Memory and time of one layout (all six axes), policy and accumulation count."""
        mesh = full_layout(mesh)
        memory = self.memory(mesh, policy, grad_accum)
        totals = axis_totals(mesh)
        state = self.memory_model.state_bytes(totals)
        links = self._links(mesh)
        div = self.memory_model.act_divisors(totals)
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
        model_collectives = layers * 4 + 1 + self.memory_model.loss_terms
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
            layouts = [full_layout(m) for m in meshes]
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
