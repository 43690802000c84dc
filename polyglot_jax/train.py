"""The trainer: a jitted, sharded step over a data x fsdp x model mesh, with checkpoints and metrics.

    state = (params, opt_state)               float32 master weights, sharded by the logical rules
    batch: data.batch.Batch                   [batch_size, seq_len + 1] rows, sharded over the mesh
                                              axes that the rules give `batch`
    step: grad_accum microbatches (lax.scan) -> one AdamW update; non-finite updates are never applied
    eval step: the same microbatches and loss, forward only: (sum of cross entropy, target count)
    loop: next batch -> step -> NaN policy -> hooks (hooks.py: progress, loss watch, evaluation,
          metrics, checkpoints and preemption, profiling), each step's metrics read after the
          next step is dispatched, unless a hook wants that step's state

Evaluation (`config.eval`, off by default) reads held-out rows from a pipeline of its own
(`data.eval_data.make_eval_dataset`), never the training iterator, and changes no state: a run
with it gives the losses of the same run without it, bit for bit, and resumes the same way.

Everything that can be checked before compiling is checked first (one ConfigError each).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
import shutil
import signal
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from polyglot_jax import flops
from polyglot_jax import workdir as wd
from polyglot_jax.checkpoint import Checkpointer, restore_params
from polyglot_jax.config import validate_run
from polyglot_jax.data.batch import Batch, LocalBatch
from polyglot_jax.data.eval_data import make_eval_dataset
from polyglot_jax.data.holdout import holdout_for
from polyglot_jax.data.pipeline import make_pipeline
from polyglot_jax.distributed import distributed_settings
from polyglot_jax.errors import ConfigError, PolyglotError
from polyglot_jax.eval.monitor import GenerationMonitor
from polyglot_jax.hooks import (
    Evaluate,
    LogMetrics,
    Profile,
    ProgressBar,
    SaveCheckpoints,
    TrainState,
    WatchLoss,
)
from polyglot_jax.loss import chunked_cross_entropy
from polyglot_jax.metrics import LossWatch, MetricsWriter
from polyglot_jax.model import GPTNeoX, ModelConfig, abstract_params, init_params, lm_head_kernel
from polyglot_jax.optimizer import learning_rate_schedule, make_optimizer
from polyglot_jax.partitioning import (
    batch_sharding,
    logical_shardings,
    make_mesh,
    process_row_block,
    rules_from_config,
)
from polyglot_jax.watchdog import PeerWatchdog


class NonFiniteLoss(PolyglotError):
    """The loss or gradient norm became NaN/Inf under `nan_policy='halt'`."""


def _unboxed_shapes(tree: Any) -> Any:
    """Shapes of a boxed abstract tree (no sharding constraint applied, unlike `nn.meta.unbox`)."""
    unbox = lambda x: x.value if isinstance(x, nn.Partitioned) else x  # noqa: E731
    tree = jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _shardings_like(tree: Any, param_shardings: Any, mesh) -> Any:
    """Shardings for an optimizer-state tree: leaves under a parameter's path take its sharding."""
    by_path = {
        tuple(str(getattr(k, "key", k)) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            if keys[start:] in by_path and len(keys[start:]) > 0:
                return by_path[keys[start:]]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


@dataclasses.dataclass
class StepFunctions:
    """The compiled pieces of a run and the shardings they agree on."""

    init_params: Any
    init_opt: Any
    train_step: Any
    eval_step: Any  # (params, batch) -> {"ce": summed cross entropy, "tokens": targets counted}
    param_shardings: Any
    opt_shardings: Any
    abstract_params: Any
    abstract_opt: Any
    batch_sharding: NamedSharding
    batch_size: int  # global rows of a batch (config.train.batch_size)


def build_step(
    config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh, rules
) -> StepFunctions:
    """Jits init and the train step with explicit in/out shardings; the state is donated."""
    t = config.train
    model = GPTNeoX(model_cfg)
    tx = make_optimizer(t)
    boxed = abstract_params(model_cfg)
    param_shardings = logical_shardings(boxed, mesh, rules)
    abs_params = _unboxed_shapes(boxed)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_shardings = _shardings_like(abs_opt, param_shardings, mesh)
    data_sharding = batch_sharding(mesh, rules)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *data_sharding.spec))

    def init_fn(seed):
        return nn.meta.unbox(init_params(model_cfg, jax.random.key(seed)))

    def loss_terms(params, micro: Batch):
        hidden = model.apply({"params": params}, *micro.model_inputs(), return_hidden=True)
        ce, zl, count = chunked_cross_entropy(
            hidden,
            lm_head_kernel(params),
            micro.targets,
            micro.loss_mask,
            chunk=t.loss_chunk,
            z_loss=t.z_loss,
        )
        return ce + zl, (ce, count)

    def microbatches(batch: Batch) -> Batch:
        # Microbatch m takes rows m, m + A, m + 2A, ...: every device keeps its share of each one.
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape(-1, t.grad_accum, *x.shape[1:]), 0, 1), micro_sharding
            ),
            batch,
        )

    def train_step(params, opt_state, batch: Batch):
        micro = microbatches(batch)
        grad_fn = jax.grad(loss_terms, has_aux=True)

        def accumulate(carry, mb):
            grads, ce, count = carry
            g, (ce_m, count_m) = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, grads, g), ce + ce_m, count + count_m), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, ce, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro
        )
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, grad_norm = ce / count, optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # An update is applied only when everything about it is finite (a NaN learning rate too).
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        )
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tokens": count}
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    def eval_step(params, batch: Batch):
        def add(carry, mb):
            _, (ce, count) = loss_terms(params, mb)  # the cross entropy, without the z-loss
            return (carry[0] + ce, carry[1] + count), None

        zero = jnp.float32(0)
        (ce, count), _ = jax.lax.scan(add, (zero, zero), microbatches(batch))
        return {"ce": ce, "tokens": count}

    return StepFunctions(
        init_params=jax.jit(init_fn, static_argnums=0, out_shardings=param_shardings),
        init_opt=jax.jit(tx.init, in_shardings=(param_shardings,), out_shardings=opt_shardings),
        train_step=jax.jit(
            train_step,
            in_shardings=(param_shardings, opt_shardings, data_sharding),
            out_shardings=(param_shardings, opt_shardings, None),
            donate_argnums=(0, 1),
        ),
        eval_step=jax.jit(eval_step, in_shardings=(param_shardings, data_sharding)),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
        abstract_params=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abs_params,
            param_shardings,
        ),
        abstract_opt=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_opt, opt_shardings
        ),
        batch_sharding=data_sharding,
        batch_size=t.batch_size,
    )


def make_global_batch(
    batch: Batch, sharding: jax.sharding.Sharding, global_rows: int | None = None
) -> Batch:
    """This process's block of rows (numpy, from the pipeline: the block that
    `partitioning.process_row_block(sharding, global_rows)` names) as global `jax.Array`s
    [global_rows, ...] laid out by `sharding` (`StepFunctions.batch_sharding`, e.g.
    `NamedSharding(mesh, P(("data", "fsdp")))`). `global_rows` defaults to the local rows times
    the process count (each process one block)."""
    local_rows = batch.tokens.shape[0]
    global_rows = local_rows * jax.process_count() if global_rows is None else global_rows
    _, blocks = process_row_block(sharding, global_rows)
    if global_rows // blocks != local_rows:
        raise ConfigError(
            f"this process has {local_rows} rows of the global batch of {global_rows}; its "
            f"devices hold {global_rows // blocks}"
        )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:])),
        batch,
    )


class PreemptionGuard:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._gathered: jax.Array | None = None  # the processes' flags at the previous step

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning(
            "received %s: finishing this step, saving, then exiting", signal.Signals(signum).name
        )
        self.requested = True

    def agreed(self) -> bool:
        """Whether to stop after this step; every process asks once per step (all must stop at
        the same one). One process: its own flag. Several: whether any process's flag was set
        when they last asked, a step ago: the all-gather of the flags is dispatched now and read
        at the next step, so that asking never waits for the device (a stop comes a step later)."""
        if jax.process_count() == 1:
            return self.requested
        previous, self._gathered = self._gathered, _any_process(self.requested)
        return previous is not None and bool(previous.addressable_data(0))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@functools.cache
def _any_of_all_devices() -> tuple[NamedSharding, Any]:
    """A flag per device over every device of every process, and their OR, on every device."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
    replicated = NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec("all")), jax.jit(jnp.any, out_shardings=replicated)


def _any_process(flag: bool) -> jax.Array:
    """Whether any process passed True (dispatched: reading the result waits for it)."""
    sharding, any_fn = _any_of_all_devices()
    local = np.full((jax.local_device_count(),), flag)
    return any_fn(jax.make_array_from_process_local_data(sharding, local))


def use_compilation_cache(setting: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """Points XLA's persistent compilation cache at `setting` ('' = $JAX_COMPILATION_CACHE_DIR or
    WORKDIR/xla_cache; 'off' = none, even with $JAX_COMPILATION_CACHE_DIR set) and caches every
    program, however quickly it compiled (so a rerun compiles nothing). Returns the directory.
    JAX decides at a process's first compile whether and where it caches: later calls in the same
    process keep what the first one chose."""
    if setting == "off":
        # jax reads $JAX_COMPILATION_CACHE_DIR itself: only this switch turns it off.
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    import os

    path = pathlib.Path(
        setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or workdir / "xla_cache"
    )
    jax.config.update("jax_compilation_cache_dir", str(path))
    import warnings

    # A failed cache write (a full disk) only costs a compile next time: no line for the user,
    # whose one error line (if the disk really is full) comes from what the run itself writes.
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def _say(message: str) -> None:
    """A line on stderr from process 0 at any verbosity (absl shows only warnings by default)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains until `config.train.steps`, resuming from `workdir/checkpoints/` when it holds any.

    Everything is validated before the workdir is touched; process 0 holds `workdir/.lock` for the
    whole run; with several processes, a lost peer ends it (watchdog.py). Returns the last logged metrics (`preempted: True` when a signal stopped the run
    early, `nothing_to_do: True` when the checkpoint already reached `steps`).
    """
    workdir = pathlib.Path(workdir)
    run = validate_run(config, jax.device_count())
    settings = distributed_settings(config)
    model_cfg, mesh_shape = run.model, run.mesh_shape
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")
    created = not workdir.exists()
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(config.train.get("compilation_cache_dir", ""), workdir)
    with (
        wd.locked(workdir) if is_main else contextlib.nullcontext(),
        PeerWatchdog(settings) as watch,
    ):
        try:
            return _start(config, model_cfg, mesh_shape, workdir, watch)
        except BaseException:
            # A run that failed before its first step leaves no trace in a workdir it created.
            if created and is_main and not (workdir / wd.CONFIG).exists():
                shutil.rmtree(workdir, ignore_errors=True)
            raise


def _start(config, model_cfg, mesh_shape, workdir, watch):
    t = config.train
    rules = rules_from_config(config.mesh.rules)
    mesh = make_mesh(mesh_shape)
    steps_on_disk = Checkpointer.steps_in(workdir)
    restore_data = wd.check_resume(config, workdir, bool(steps_on_disk))
    # The global batch is the same on every layout; this process builds the block of its devices.
    block, blocks = process_row_block(batch_sharding(mesh, rules), t.batch_size)
    data_iter = make_pipeline(
        config.data,
        seq_len=t.seq_len,
        global_batch_size=t.batch_size,
        process_index=block,
        process_count=blocks,
        holdout=holdout_for(config.get("eval"), "train"),
    )
    eval_data = None
    if config.get("eval") and config.eval.eval_every:
        eval_data = make_eval_dataset(
            config.data,
            config.eval,
            seq_len=t.seq_len,
            global_batch_size=t.batch_size,
            process_index=block,
            process_count=blocks,
        )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fns = build_step(config, model_cfg, mesh, rules)
        ckpt = Checkpointer(
            workdir,
            keep=t.keep_checkpoints,
            keep_period=t.keep_every,
            async_save=t.async_checkpoints,
        )
        try:
            restored = ckpt.restore_latest(
                fns.abstract_params, fns.abstract_opt, data_iter if restore_data else None
            )
        except BaseException:
            ckpt.close()
            raise
        if restored is not None and restored[0] >= t.steps:
            ckpt.close()
            _say(
                f"nothing to do: checkpoint {restored[0]} >= config.train.steps={t.steps} "
                f"in {workdir} (raise --config.train.steps to train on)"
            )
            return {"step": restored[0], "nothing_to_do": True}
        if restored is not None:
            start, params, opt_state = restored
            _say(f"resumed from step {start} of {t.steps} ({ckpt.directory}/{start})")
        else:
            start = 0
            if t.init_from:
                params, source = restore_params(t.init_from, fns.abstract_params)
                _say(f"initialised parameters from {source}")
            else:
                params = fns.init_params(t.seed)
            opt_state = fns.init_opt(params)
        if jax.process_index() == 0:
            wd.record_start(config, workdir, start)  # only now: the run really starts
        run = _Run(config, model_cfg, workdir, fns, ckpt, data_iter, eval_data, mesh, rules, watch)
        return _loop(run, TrainState(params, opt_state), start)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop works with, once the run has started."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    workdir: pathlib.Path
    fns: StepFunctions
    ckpt: Checkpointer
    data_iter: Any
    eval_data: Any = None  # the held-out rows' dataset (None: no evaluation)
    mesh: Any = None
    rules: Any = ()
    watch: PeerWatchdog | None = None  # told of every finished step


def _generation_monitor(run: _Run) -> GenerationMonitor:
    """The broken-generation monitor of `config.eval`, its prompts encoded with the run's tokenizer."""
    from polyglot_jax.generate_weights import load_tokenizer_dir

    e = run.config.eval
    tokenizer = load_tokenizer_dir(wd.run_tokenizer(run.config, run.workdir))
    if tokenizer is None:
        raise ConfigError(
            "config.eval.generation_every needs the run's tokenizer: set config.data.tokenizer"
        )
    return GenerationMonitor(
        run.model_cfg,
        [tokenizer.encode(p) for p in e.generation_prompts],
        every=e.generation_every,
        last_step=run.config.train.steps,
        max_new_tokens=e.generation_max_new_tokens,
        mesh=run.mesh,
        rules=run.rules,
        decode=tokenizer.decode,
    )


def _loop(run: _Run, state: TrainState, start: int) -> dict[str, Any]:
    """Steps from `start` to `config.train.steps`; returns the last logged metrics."""
    t = run.config.train
    with PreemptionGuard() as guard, contextlib.ExitStack() as cleanup:
        cleanup.callback(run.ckpt.close)  # last: after every hook's close
        log = _log_metrics(run, start)
        save = SaveCheckpoints(
            run.ckpt, run.data_iter, guard.agreed, every=t.checkpoint_every, last_step=t.steps
        )
        hooks = [
            ProgressBar(start, t.steps, enabled=jax.process_index() == 0),
            WatchLoss(LossWatch(t.spike_threshold, t.drop_threshold, t.spike_halflife)),
        ]
        if run.eval_data is not None:  # before LogMetrics: it writes what Evaluate adds
            e = run.config.eval
            hooks.append(
                Evaluate(
                    HeldOut(run.fns, run.eval_data, e.eval_batches),
                    every=e.eval_every,
                    last_step=t.steps,
                )
            )
        if (run.config.get("eval") or {}).get("generation_every", 0):
            hooks.append(_generation_monitor(run))  # before LogMetrics, like Evaluate
        hooks += [
            log,
            save,
            Profile(str(run.workdir / "profile"), *t.profile_steps, start=start),
        ]
        for hook in reversed(hooks):  # closed in this order, however the loop ends
            cleanup.callback(hook.close)

        def step_fn(step: int, state: TrainState):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                return _train_step(run.fns, state, next(run.data_iter))

        def finish(step: int, metrics: dict[str, Any], state: TrainState | None) -> bool:
            metrics = jax.device_get(metrics)  # waits for this step only
            if run.watch is not None:
                run.watch.step_done(step)
            _apply_nan_policy(t.nan_policy, step, metrics, run.ckpt)
            for hook in hooks:
                hook(step, state, metrics)
            return save.preempted

        if _pipelined_steps(state, range(start + 1, t.steps + 1), step_fn, finish, hooks):
            return {**log.last, "preempted": True}
        return log.last


def _pipelined_steps(state: Any, steps: range, step_fn: Any, finish: Any, hooks: list) -> bool:
    """`state, metrics = step_fn(step, state)` for each step, and `finish(step, metrics, state)`
    after it, where it can a step late: step n + 1 is dispatched before step n's metrics are read,
    so the device works while the host reads, logs and builds the next batch. At a step some
    hook `wants_state` (a checkpoint, an evaluation, a stop), it is finished before the next is
    dispatched, with its state (which the next step's donation would delete); elsewhere `finish`
    gets None for it. True as soon as a `finish` returns True (a stop), else False at the end."""
    pending = None  # (step, metrics): dispatched, not yet finished
    for step in steps:
        try:
            state, metrics = step_fn(step, state)
        except BaseException:
            if pending is not None:  # the step before is done: its metrics are not lost
                finish(*pending, None)
            raise
        if pending is not None and finish(*pending, None):
            return True
        wanted = [hook.wants_state(step) for hook in hooks]  # every hook asked, at every step
        if any(wanted):
            pending = None
            if finish(step, metrics, state):
                return True
        else:
            pending = (step, metrics)
    return pending is not None and finish(*pending, None)


def _log_metrics(run: _Run, start: int) -> LogMetrics:
    t = run.config.train
    tokens_per_step = t.batch_size * t.seq_len
    return LogMetrics(
        MetricsWriter(run.workdir, enabled=jax.process_index() == 0, resume_step=start),
        learning_rate_schedule(t),
        every=t.log_every,
        last_step=t.steps,
        tokens_per_step=tokens_per_step,
        flops_per_step=flops.training_flops_per_token(run.model_cfg, t.seq_len) * tokens_per_step,
        peak_flops=t.peak_flops_per_device or flops.peak_flops_per_device(),
    )


class HeldOut:
    """The mean loss of parameters over `batches` fixed global batches of held-out rows.

    The rows are the first `batches` batches of a fresh iterator of `dataset` (always the same:
    the dataset is unshuffled and starts from its beginning), read at the first evaluation and
    kept on the host, so later evaluations do not read the data again."""

    def __init__(self, fns: StepFunctions, dataset: Any, batches: int):
        self.fns, self.dataset, self.batches = fns, dataset, batches
        self._rows: list[Batch] | None = None

    def rows(self) -> list[Batch]:
        if self._rows is None:
            self._rows = _eval_batches(iter(self.dataset), self.batches)
        return self._rows

    def __call__(self, params: Any) -> tuple[float, float]:
        """(token-weighted mean cross entropy, number of targets that counted)."""
        sums = [
            self.fns.eval_step(
                params, make_global_batch(rows, self.fns.batch_sharding, self.fns.batch_size)
            )
            for rows in self.rows()
        ]
        sums = jax.device_get(sums)
        ce = sum(float(s["ce"]) for s in sums)
        tokens = sum(float(s["tokens"]) for s in sums)
        return ce / max(tokens, 1.0), tokens


def _eval_batches(iterator: Any, count: int) -> list[Batch]:
    """The next `count` batches of a held-out iterator (this process's rows, numpy)."""
    batches = [next(iterator) for _ in range(count)]
    if batches[-1].epoch > 1:
        logging.warning(
            "config.eval.eval_batches=%d batches take %.2f epochs of the held-out data: some rows "
            "repeat (hold out more, or evaluate fewer batches)",
            count,
            float(batches[-1].epoch),
        )
    return [b.batch for b in batches]


def _train_step(fns: StepFunctions, state: TrainState, local: LocalBatch):
    """One optimizer step on the next batch, dispatched: the new state and the step's metrics,
    both still computing on the device (`jax.device_get` waits for them), `epoch` on the host."""
    batch = make_global_batch(local.batch, fns.batch_sharding, fns.batch_size)
    params, opt_state, metrics = fns.train_step(state.params, state.opt_state, batch)
    return TrainState(params, opt_state), {**metrics, "epoch": float(local.epoch)}


def _apply_nan_policy(policy: str, step: int, metrics: dict[str, Any], ckpt: Checkpointer) -> None:
    """A step whose update was not applied (non-finite): NonFiniteLoss under 'halt' (nothing of
    it is saved), a warning under 'skip'."""
    if metrics["finite"]:
        return
    if policy == "halt":
        raise NonFiniteLoss(
            f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
            f"step {step}; nothing was applied or saved; the last checkpoint is step "
            f"{max(ckpt.steps(), default=0)}"
        )
    logging.warning("step %d: non-finite loss or gradient norm; update skipped", step)
