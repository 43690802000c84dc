"""The planner's memory model: the bytes one device holds at the train step's peak, from shapes alone.

    model = MemoryModel(config, ModelConfig.from_config(config.model))
    model.memory(full_layout({"fsdp": 8}), "full", grad_accum=4)   # Memory: bytes per device

Nothing here touches a device: parameter and optimizer-state shapes come from `jax.eval_shape`.
`planner.Planner` owns one and adds the time model; `state_bytes` also gives it, per mesh axis, the
parameter and gradient bytes its collectives move.

Units: bytes per device; "rows" are sequences of `train.seq_len` tokens.

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
                 the loss phase: the chunked loss forms each chunk's gradient in its forward
                 (loss.py's custom VJP), after the layers' forward, so it holds, besides the
                 saved activations: float32 [rows, loss_chunk, vocab share] arrays for one chunk
                 (the shifted exponentials and the logits' gradient, one gradient per loss term;
                 while the kernel-gradient matmuls run, those gradients and the chunk's float32
                 kernel gradient, whole over fsdp), the float32 kernel-gradient accumulator of
                 each loss term (one partial sum per data shard, so as large as the gradient on
                 each device), the output projection in the compute dtype (gathered over fsdp),
                 the hidden states' gradient of each term (kept for the backward, compute dtype,
                 every token), the final LayerNorm's float32 output and 1/std, its input and its
                 chunk-major output;
                 the layer phase: one layer's activations recomputed (any policy but none) and
                 (fsdp) that layer's gathered weights and their gradients before the
                 reduce-scatter.
               Left out: the input embedding gathered for its lookup and its gradient before
               the reduce-scatter (vocabulary x d_model float32, transient, at the forward's
               start and the backward's end: 0.25 GB for the 1.3B model).

Which tensors a layer saves is what `jax.checkpoint` keeps of model.Block for each policy (JAX's
saved-residual tracing of Block, checked against the buffers the compiled forward scan stacks, and
written out term by term in `MemoryModel._layer_terms`): rows per device = microbatch / (the mesh
axes the rules give `batch`); head, d_ff and vocabulary widths divided over the axes the rules give
`heads`, `mlp` and `vocab`. tests/test_planner.py checks the totals against XLA's compiled figures
within 20%.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from polyglot_jax.errors import ConfigError
from polyglot_jax.model import REMAT_POLICIES, ModelConfig, abstract_params
from polyglot_jax.optimizer import make_optimizer
from polyglot_jax.partitioning import MESH_AXES, axis_size, mesh_axes, rules_from_config

_F32 = 4


def axis_totals(mesh: Mapping[str, int]) -> dict[str, int]:
    """Each of `MESH_AXES`' total size in a full layout: within-node x across-node."""
    return {a: axis_size(mesh, a) for a in MESH_AXES}


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
    loss_phase: int  # one loss chunk + kernel-gradient accumulators + output projection + hidden
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


class MemoryModel:
    """Bytes per device of one config's train step on any layout (module docstring: the model).

    Args:
      config: a full config (configs/*.py) whose train section has been checked
        (`config.check_train`); its model, train, mesh.rules and data.mode are used.
      cfg: `ModelConfig.from_config(config.model)`.
    """

    def __init__(self, config: ml_collections.ConfigDict, cfg: ModelConfig):
        self.config = config
        self.cfg = cfg
        self.batch = int(config.train.batch_size)
        self.seq_len = int(config.train.seq_len)
        self.loss_chunk = min(int(config.train.loss_chunk), self.seq_len)
        self.rules = rules_from_config(config.mesh.get("rules", ()))
        self.packed = config.get("data", {}).get("mode", "concat") == "packed"
        # The terms the chunked loss differentiates: cross entropy, and the z-loss when it is on.
        self.loss_terms = 2 if float(config.train.get("z_loss", 0.0)) != 0.0 else 1
        self.c = jnp.dtype(cfg.dtype).itemsize  # compute dtype bytes
        self.boxed = abstract_params(cfg)  # the parameters' shapes, boxed with their logical axes
        self._state_cache: dict[tuple[int, ...], dict[str, float]] = {}
        self._leaves = self._param_leaves()
        self._opt = self._optimizer_leaves()
        self.layer_params = sum(leaf.numel for leaf in self._leaves if leaf.in_layers)

    def memory(self, mesh: Mapping[str, int], policy: str, grad_accum: int) -> Memory:
        """Bytes per device at the step's peak for one layout, policy and accumulation count."""
        if policy not in REMAT_POLICIES:
            raise ConfigError(f"remat policy {policy!r} is not one of {', '.join(REMAT_POLICIES)}")
        totals = axis_totals(mesh)
        state = self.state_bytes(totals)
        div = self.act_divisors(totals)
        micro_rows = self.batch // grad_accum
        if micro_rows % div["rows"]:
            raise ConfigError(
                f"batch {self.batch} / grad_accum {grad_accum} = {micro_rows} rows do not divide "
                f"over the {div['rows']} devices that shard rows"
            )
        rows = micro_rows // div["rows"]
        tokens = rows * self.seq_len
        layers = self.cfg.num_layers
        saved = layers * tokens * self._layer_terms(policy, div)
        saved += tokens * self._once_terms(policy, div)
        if policy == "none":
            saved += layers * self._weight_casts(totals)
        recompute = 0.0 if policy == "none" else tokens * self._layer_terms("none", div)
        layer_phase = recompute + state["layer_gathered"]
        loss_phase = self._loss_phase(totals, div, rows)
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

    # ----------------------------------------------------------------- parameters and state

    def _param_leaves(self) -> list[_Leaf]:
        flat = jax.tree_util.tree_flatten_with_path(
            self.boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
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
            self.boxed,
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
        return tuple(math.prod(totals[a] for a in axes) for axes in mesh_axes(names, self.rules))

    def _mesh_axes_of(self, names: tuple) -> set[str]:
        """The mesh axes the rules shard a parameter with these logical axes over."""
        return {a for axes in mesh_axes(names, self.rules) for a in axes}

    def state_bytes(self, totals: Mapping[str, int]) -> dict[str, float]:
        """Bytes per device for mesh axis totals (`axis_totals`), cached per totals: `params`,
        `grads` (float32), `optimizer`, `layer_gathered` (what fsdp gathers of one layer, with its
        gradients, for the layer phase), and per mesh axis what its collectives share per
        microbatch: `gathered_fwd_<axis>`, `gathered_bwd_<axis>` (the parameters it shards,
        gathered for the forward and for the backward), `gathered_grads_<axis>` (their float32
        gradients, reduce-scattered) and `replicated_grads_<axis>` (the float32 gradients of the
        parameters it replicates, all-reduced)."""
        key = tuple(totals[a] for a in MESH_AXES)
        if key not in self._state_cache:
            self._state_cache[key] = self._compute_state_bytes(totals)
        return self._state_cache[key]

    def _compute_state_bytes(self, totals: Mapping[str, int]) -> dict[str, float]:
        params = grads = layer_gathered = layer_grads = 0.0
        # Per mesh axis, for the collectives: the bytes of the parameters it shards once gathered
        # over it (param_dtype), their float32 gradients likewise, and the float32 gradients of
        # the parameters it replicates (all-reduced over it), as XLA compiles the step:
        # - the layers and the final LayerNorm are gathered for the forward and again for the
        #   backward;
        # - the output projection is gathered once: the loss forms its gradient in the forward.
        #   That gradient (one per loss term: with the z-loss, two) is summed inside the loss's
        #   scan over chunks: an axis that shards the kernel (fsdp) reduce-scatters it once per
        #   chunk; one that replicates it and shards the batch (data) all-reduces it once, after
        #   the last chunk (the loss keeps one partial sum per data shard); one that replicates
        #   it and not the batch, once per chunk;
        # - the input embedding is gathered once, for its lookup (model.py: looked up from
        #   d_model-sharded rows, the gradient's resharding from batch to d_model made SPMD
        #   replicate the [tokens, d_model] cotangent on meshes with data and fsdp); its
        #   gradient, scatter-added per batch shard, is reduce-scattered.
        chunks = math.ceil(self.seq_len / self.loss_chunk)
        terms = self.loss_terms
        batch_axes = self._mesh_axes_of(("batch",))
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
            top = leaf.path[0]
            for axis in MESH_AXES:
                if axis in axes:
                    gathered_fwd[axis] += numel * totals[axis] * leaf.itemsize
                    if top not in ("embed_out", "embed_in"):  # gathered once (above)
                        gathered_bwd[axis] += numel * totals[axis] * leaf.itemsize
                    times = chunks * terms if top == "embed_out" else 1
                    gathered_grads[axis] += numel * totals[axis] * _F32 * times
                else:
                    times = 1
                    if top == "embed_out":
                        times = terms if axis in batch_axes else chunks * terms
                    replicated_grads[axis] += numel * _F32 * times
            if totals["fsdp"] > 1 and "fsdp" in axes and leaf.in_layers:
                full = numel * totals["fsdp"]  # this leaf gathered over fsdp
                layer_gathered += full * leaf.itemsize / self.cfg.num_layers
                layer_grads += full * _F32 / self.cfg.num_layers
        optimizer = 0.0
        for numel, itemsize, param in self._opt:
            factor = shard[param.path] if param is not None else 1
            optimizer += numel / factor * itemsize
        return {
            "params": params,
            "grads": grads,
            "optimizer": optimizer,
            "layer_gathered": layer_gathered + layer_grads,
            **{f"gathered_fwd_{a}": gathered_fwd[a] for a in MESH_AXES},
            **{f"gathered_bwd_{a}": gathered_bwd[a] for a in MESH_AXES},
            **{f"gathered_grads_{a}": gathered_grads[a] for a in MESH_AXES},
            **{f"replicated_grads_{a}": replicated_grads[a] for a in MESH_AXES},
        }

    def _loss_phase(self, totals: Mapping[str, int], div: Mapping[str, int], rows: int) -> float:
        """Bytes per device the chunked loss holds at its peak, beyond the saved activations
        (loss.py: each chunk's gradient is formed in the forward, by a custom VJP).

        With `terms` the loss terms differentiated (2 with the z-loss, else 1), per device:
          one chunk        float32 [rows, loss_chunk, vocab share] arrays: the shifted
                           exponentials and each term's logit gradient, (1 + terms) of them; or,
                           if larger, once the kernel-gradient matmuls have run, one of those
                           and each term's float32 kernel gradient of the chunk (the output
                           projection's shape, whole over fsdp until its reduce-scatter)
          accumulators     each term's float32 kernel gradient summed over chunks, one partial
                           sum per data shard laid out one per shard: the gradient's size
          kernel           the output projection in the compute dtype, gathered over fsdp (no
                           new buffer when neither gathered nor cast)
          per token        the hidden states' gradient of each term (compute dtype, kept for
                           the backward), the final LayerNorm's input (the last layer's output)
                           and its chunk-major output (compute dtype), its float32 output and
                           1/std (`ops.normalize`): (4 + (2 + terms)·c)·d + 4
        """
        cfg, c = self.cfg, self.c
        terms = self.loss_terms
        (kernel,) = (leaf for leaf in self._leaves if leaf.path[0] == "embed_out")
        numel = kernel.numel / math.prod(self._spec_factors(kernel.names, totals))
        gathered = "fsdp" in self._mesh_axes_of(kernel.names) and totals["fsdp"] > 1
        whole = numel * (totals["fsdp"] if gathered else 1)  # the kernel as the loss reads it
        chunk = rows * self.loss_chunk * cfg.vocab_size * _F32 / div["vocab"]
        one_chunk = max((1 + terms) * chunk, chunk + terms * whole * _F32)
        accumulators = terms * numel * _F32
        cast = gathered or c != kernel.itemsize
        kernel_bytes = whole * c if cast else 0.0
        tokens = rows * self.seq_len
        hidden = tokens * ((4 + (2 + terms) * c) * cfg.d_model / div["resid"] + 4 / div["length"])
        return one_chunk + accumulators + kernel_bytes + hidden

    # ----------------------------------------------------------------- activations

    def act_divisors(self, totals: Mapping[str, int]) -> dict[str, int]:
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

    def _layer_terms(self, policy: str, div: Mapping[str, int]) -> float:
        """Bytes one layer saves for the backward, per token of the device's rows.

        The residuals `jax.checkpoint` keeps of model.Block (parallel residual, fused QKV, partial
        RoPE, exact GELU) under each policy, c = compute dtype bytes:
          full           the layer input x                                   c·d
          dots_no_batch  x, the QKV and MLP-up matmul outputs                c·d + 3c·d + c·f
          dots           those, plus (xla attention) the score and value
                         matmul outputs, accumulated in float32             + 4·h·t + 4·d
          none           the LayerNorm core's float32 output and 1/std
                         (`ops.normalize`, computed once: both LayerNorms
                         read the same x) and the two LayerNorms' outputs    4·d + 4 + 2c·d
                         rotated q and k, v, the attention output            4c·d
                         xla attention: the float32 exponentials and the
                         c probabilities, two float32 row statistics         (4 + c)·h·t + 8·h
                         flash kernels: only the log-sum-exp                 4·h
                         GELU's output and its derivative (`ops.gelu`)       2c·f
        with d, f and h divided over the axes the rules give embed, mlp and heads (1/std over
        the length axis alone). These are the per-layer buffers the compiled forward scan stacks;
        the causal mask and RoPE's tables do not depend on the layer and are kept once
        (`_once_terms`).

        A rematerialised layer's backward starts with its `none` set recomputed and all of it
        live (the MLP's backward, which runs first, reads GELU's two arrays; the attention's then
        reads the rest): that is the recomputed layer of the layer phase. (configs/small.py with
        a 4096-token vocabulary, so that the layer phase is the peak, on fsdp:8: 6% above XLA's
        compiled figure on CPU under full, 5% under dots_no_batch.)
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
        ln = (4 + 2 * c) * d / div["resid"] + 4 / div["length"]
        attn_in_out = 4 * c * d / div["heads"]
        if xla:
            attn = ((4 + c) * h * t + 8 * h) / div["heads_only"]
        else:
            attn = 4 * h / div["heads_only"]
        gelu = 2 * c * f / div["mlp"]
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
