"""The compiled train step: what XLA executes against the model's FLOPs, and (CPU) its time against
transformers + torch AdamW on the same machine, in the same run.

    python bench/train_step.py --config=configs/tiny.py --out=bench/results/train_step_cpu_tiny.json
    python bench/train_step.py --shape=neox56m --out=bench/results/train_step_cpu_56m.json
    python bench/train_step.py --config=configs/polyglot_ko_1_3b.py --config.train.batch_size=8 \
        --torch=False --out=bench/results/train_step_h100_1_3b.json

`--shape=neox56m` is the issue's 56M-parameter GPT-NeoX (d_model 512, 8 layers, 8 heads, d_ff 2048,
vocab 30,080, batch 4 x 512, float32 compute), applied over `--config` (its optimizer settings).

FLOPs, for each remat policy (`--remat_policies`), from the compiled step without running it:
- `model_flops`: `flops.training_flops_per_token` x tokens (6 x matmul parameters + attention,
  the vocab projection included: PaLM's accounting), and `promised_flops`: that plus what the
  policy says it recomputes (`flops.recompute_flops_per_token`);
- `matmul_flops`: every dot of the compiled HLO, each counted as often as its loop runs
  (`hlo_costs.matmul_flops`); `recompute_factor` = matmul_flops / model_flops;
- `xla_flops`, `xla_bytes_accessed`: XLA's own cost analysis, raw: it counts a while loop's body
  once, so with scanned layers they are per-layer figures for the loop parts (`flops` adds the
  dots of every further run of a loop, as mesh_bench does).

Time (`--torch`, on where torch and transformers import; skipped with the reason in `skipped`
otherwise): `--rounds` rounds, each timing `--steps` steps of our step and then of
`GPTNeoXForCausalLM` (sdpa attention; on CUDA when torch sees a GPU, with fused AdamW and
`torch.compile` by default, eager if compiling fails, which `torch_compile_error` records) +
`torch.optim.AdamW` with global-norm clipping at the same shape and precision policy (float32
weights and optimizer, compute in the config's dtype under torch.autocast), on the same random
tokens; per backend the median of all its steps,
after one warm-up step each. Interleaving the two keeps a loaded machine's drift out of the
ratio; the load average is recorded before and after. `speed_ratio` = torch step / our step
(> 1: we are faster); `cpu_ratio` the same in process CPU seconds (all threads), which a loaded
machine disturbs less (run under `taskset -c 1` for a one-core comparison that another process's
load cannot skew much). The batch is random tokens (the step's cost does not depend on them).

MFU: model FLOP/s against the datasheet bf16 peak (`flops.PEAK_BF16_FLOPS`; none on CPU) and
against a dense matmul rate measured in the same run in the config's dtype (`matmul_peak`).
Peak device memory: ours from jax's memory_stats, torch's from max_memory_allocated. Both
frameworks share one GPU, so jax's preallocation is capped (XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
unless set).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

# Ours and torch share one GPU: jax must not preallocate 75 % of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py; the script's directory is on sys.path)
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config to time.")
_SHAPE = flags.DEFINE_enum("shape", None, ["neox56m"], "A model/batch shape applied over --config.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per backend per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds of (ours, torch) timing, interleaved.")
_TORCH = flags.DEFINE_boolean("torch", True, "Time transformers + torch too (where importable).")
_REMAT = flags.DEFINE_list(
    "remat_policies", "none,full,dots,dots_no_batch", "Policies to compile and count FLOPs for."
)
_TORCH_COMPILE = flags.DEFINE_boolean(
    "torch_compile", None, "torch.compile transformers' model (default: on a GPU)."
)
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "After timing, trace this many of our steps (jax.profiler): `profile`."
)
_TRACE_OUT = flags.DEFINE_string(
    "trace_out", None, "Keep that Perfetto trace (.json.gz) here, when under 6 MiB."
)
TRACE_KEEP_LIMIT = 6 << 20  # the device suite packs 4 of them under the device tool's 16 MiB

SHAPES = {
    "neox56m": {
        "model.num_layers": 8,
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.d_ff": 2048,
        "model.vocab_size": 30080,
        "model.rotary_dim": 16,  # rotary_pct 0.25 at head_dim 64
        "model.max_len": 512,
        "model.dtype": "float32",
        "model.remat_policy": "none",
        "train.batch_size": 4,
        "train.seq_len": 512,
        "train.grad_accum": 1,
        "train.loss_chunk": 512,
        "mesh.data": 1,
        "mesh.fsdp": 1,
        "mesh.model": 1,
    }
}


def apply_shape(config, shape: str | None):
    config = config.copy_and_resolve_references()
    for key, value in SHAPES.get(shape, {}).items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _cores() -> int:
    """CPU cores this process may run on (taskset/cgroup affinity), as XLA:CPU counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class OurStep:
    """The trainer's jitted step (`train.build_step`) on fresh parameters and a fixed batch."""

    def __init__(self, config, tokens: np.ndarray):
        import flax.linen as nn

        from polyglot_jax.config import validate_run
        from polyglot_jax.data.batch import Batch
        from polyglot_jax.partitioning import make_mesh, rules_from_config
        from polyglot_jax.train import build_step

        run = validate_run(config, jax.device_count())
        self.model_cfg = run.model
        self.mesh = make_mesh(run.mesh_shape)
        self.rules = rules_from_config(config.mesh.rules)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            self.fns = build_step(config, run.model, self.mesh, self.rules)
            self.params = self.fns.init_params(config.train.seed)
            self.opt_state = self.fns.init_opt(self.params)
            self.batch = jax.device_put(Batch(tokens), self.fns.batch_sharding)
        self.metrics = None
        self.cpu_s: list[float] = []  # process CPU seconds per step (all threads)

    def step(self) -> float:
        start, cpu = time.perf_counter(), time.process_time()
        self.params, self.opt_state, self.metrics = self.fns.train_step(
            self.params, self.opt_state, self.batch
        )
        jax.block_until_ready((self.params, self.opt_state, self.metrics))
        self.cpu_s.append(time.process_time() - cpu)
        return time.perf_counter() - start


class TorchStep:
    """transformers' GPTNeoXForCausalLM (sdpa) + torch AdamW, the same shape and optimizer
    settings: loss = mean next-token cross entropy, clip_grad_norm_, AdamW with weight decay on
    matrices only, zero_grad(set_to_none=True). On CUDA when torch sees a GPU, else CPU. The same
    precision policy as ours: float32 weights and AdamW, compute in the config's dtype (bfloat16
    or float16 under torch.autocast; float32 without it); `compile`: torch.compile the model
    (the caller falls back to eager if it fails, and says so)."""

    def __init__(self, config, model_cfg, tokens: np.ndarray, compile: bool = False):
        import torch
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        from polyglot_jax.hf.mapping import to_hf_config

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(_cores())
        torch.manual_seed(0)
        fields = {
            k: v
            for k, v in to_hf_config(model_cfg).items()
            if k not in ("architectures", "model_type", "torch_dtype")
        }
        hf = GPTNeoXConfig(**fields, attn_implementation="sdpa")
        with self.device:  # initialised where it runs (a 1.3B init on the host takes ~30 s)
            self.model = GPTNeoXForCausalLM(hf).float().train()
        self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model_cfg.dtype)
        t = config.train
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.b1, t.b2),
            eps=t.eps,
            fused=self.device.type == "cuda",
        )  # fmt: skip
        self.clip = t.clip_norm
        self.inputs = torch.as_tensor(tokens[:, :-1]).long().to(self.device)
        self.targets = torch.as_tensor(tokens[:, 1:]).long().to(self.device)
        self.torch = torch
        self.forward = torch.compile(self.model) if compile else self.model
        self.compiled = compile
        self.loss = None
        self.cpu_s: list[float] = []

    def eager(self) -> None:
        """Back to the uncompiled model (torch.compile failed)."""
        self.forward, self.compiled = self.model, False

    def step(self) -> float:
        torch = self.torch
        start, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            logits = self.forward(input_ids=self.inputs).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), self.targets.flatten()
            )
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.cpu_s.append(time.process_time() - cpu)
        return time.perf_counter() - start

    def peak_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())


def matmul_peak(dtype: str = "bfloat16") -> dict:
    """The device's measured dense matmul rate: jnp.dot of two square matrices (8192 on a GPU or
    TPU, 1024 on CPU) in `dtype`, best of 10 after a warm-up, in FLOP/s: the attainable peak
    that MFU is also reported against (datasheet peaks are rarely reached). Random normal
    operands: constant ones or zeros toggle fewer bits and ran 13% faster on an H200 here."""

    n = 1024 if jax.default_backend() == "cpu" else 8192
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), dtype)
    dot = jax.jit(lambda a, b: a @ b)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return {"dtype": dtype, "n": n, "flop_per_s": 2 * n**3 / best}


def trace_steps(ours: OurStep, count: int, keep: str | None) -> dict:
    """`count` more of our steps under `jax.profiler.trace` (a Perfetto trace), summarized by
    bench/trace_summary.py: device busy and idle time, time by kernel category, the longest
    kernels. `keep`: where to copy the trace (left out, saying why, over TRACE_KEEP_LIMIT)."""
    import shutil
    import tempfile

    from trace_summary import load_events, summarize

    cpu_s = list(ours.cpu_s)  # traced steps are slower: not part of the timing
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(count):
                ours.step()
        ours.cpu_s = cpu_s
        trace = next(pathlib.Path(tmp).rglob("perfetto_trace.json.gz"), None)
        if trace is None:
            return {"steps": count, "error": "jax.profiler wrote no perfetto_trace.json.gz"}
        result = {"steps": count, "trace_bytes": trace.stat().st_size}
        result.update(summarize(load_events(trace)))
        if keep and trace.stat().st_size <= TRACE_KEEP_LIMIT:
            pathlib.Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(trace, keep)
            result["trace"] = pathlib.Path(keep).name
        elif keep:
            result["trace"] = None
            result["trace_not_kept"] = f"{trace.stat().st_size} bytes, over {TRACE_KEEP_LIMIT}"
    return result


def compiled_costs(config, policies) -> dict:
    """Per remat policy: the compiled step's FLOPs beside the model's (see the docstring)."""
    import dataclasses

    from polyglot_jax import flops
    from polyglot_jax.config import validate_run
    from polyglot_jax.mesh_bench import measure

    out = {}
    for policy in policies:
        c = config.copy_and_resolve_references()
        c.model.remat_policy = policy
        run = validate_run(c, jax.device_count())
        r = measure(c, run.mesh_shape)
        tokens = c.train.batch_size * c.train.seq_len
        cfg = dataclasses.replace(run.model, remat_policy=policy)
        model = flops.training_flops_per_token(cfg, c.train.seq_len) * tokens
        promised = model + flops.recompute_flops_per_token(cfg, c.train.seq_len) * tokens
        devices = r["devices"]  # measure's FLOPs and bytes are per device
        out[policy] = {
            "model_flops": model,
            "promised_flops": promised,
            "matmul_flops": r["matmul_flops"] * devices,
            "flops": r["flops"] * devices,
            "xla_flops": r["flops_xla"] * devices,
            "xla_bytes_accessed": r["bytes_accessed_xla"] * devices,
            "recompute_factor": r["matmul_flops"] * devices / model,
            "promised_factor": promised / model,
            "compile_s": r["compile_s"],
        }
        print(policy, json.dumps(out[policy]), flush=True)
    return out


def _raised_by_torch_compile(e: BaseException) -> bool:
    """Whether `e` came out of torch.compile's own machinery (dynamo, inductor, their Triton
    codegen): those fall back to eager and are recorded; anything else (a shape bug of ours, an
    out-of-memory) is a real failure and propagates."""
    compiler = ("torch/_dynamo/", "torch/_inductor/", "torch/_functorch/", "triton/")
    frames = traceback.extract_tb(e.__traceback__)
    return any(any(c in f.filename.replace("\\", "/") for c in compiler) for f in frames)


def main(argv):
    from polyglot_jax import flops

    config = apply_shape(_CONFIG.value, _SHAPE.value)
    t = config.train
    with_torch = _TORCH.value is not False
    rng = np.random.default_rng(0)
    vocab = config.model.vocab_size
    tokens = rng.integers(0, vocab, (t.batch_size, t.seq_len + 1), dtype=np.int32)
    load_before = _load()

    ours = OurStep(config, tokens)
    model_cfg = ours.model_cfg
    start = time.perf_counter()
    ours.step()
    compile_s = time.perf_counter() - start
    skipped = {}
    theirs, compile_error = None, None
    if with_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            skipped["torch"] = f"transformers + torch not importable here: {e}"
            with_torch = False
    if with_torch:
        gpu = jax.default_backend() == "gpu"
        use_compile = gpu if _TORCH_COMPILE.value is None else _TORCH_COMPILE.value
        theirs = TorchStep(config, model_cfg, tokens, compile=use_compile)
        try:
            theirs.step()  # warm-up (torch.compile compiles here)
        except (RuntimeError, AssertionError, theirs.torch._dynamo.exc.TorchDynamoException) as e:
            if not (theirs.compiled and _raised_by_torch_compile(e)):
                raise
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"torch.compile failed, timing eager torch: {compile_error}", flush=True)
            theirs.eager()
            theirs.step()
        theirs.cpu_s.clear()
    ours.cpu_s.clear()  # the first (compiling) step
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(_ROUNDS.value):
        times["ours"] += [ours.step() for _ in range(_STEPS.value)]
        if theirs is not None:
            times["torch"] += [theirs.step() for _ in range(_STEPS.value)]
        print({k: [round(x, 3) for x in v] for k, v in times.items()}, flush=True)
    load_after = _load()
    step_s = statistics.median(times["ours"])
    torch_s = statistics.median(times["torch"]) if theirs is not None else None

    costs = compiled_costs(config, _REMAT.value) if _REMAT.value else {}
    tokens_per_step = t.batch_size * t.seq_len
    peak = t.peak_flops_per_device or flops.peak_flops_per_device()
    flops_per_step = flops.training_flops_per_token(model_cfg, t.seq_len) * tokens_per_step
    memory = jax.devices()[0].memory_stats() or {}
    measured = matmul_peak(config.model.dtype)
    measured_peak = measured["flop_per_s"]
    if peak is None:
        skipped["mfu"] = f"no datasheet peak for device kind {jax.devices()[0].device_kind!r}"
    result = {
        "benchmark": "train_step",
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "platform": jax.default_backend(),
        "cpu": cpu_model(),
        "cpu_cores": _cores(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax"), "torch": _version("torch") if theirs else None, "transformers": _version("transformers") if theirs else None},
        "shape": _SHAPE.value,
        "model": {k: getattr(model_cfg, k) for k in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "rotary_dim", "dtype", "attention_impl", "remat_policy", "scan_layers")},
        "parameters": _count(model_cfg),
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum": t.grad_accum,
        "loss_chunk": t.loss_chunk,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "compile_and_first_step_s": compile_s,
        "step_time_s": step_s,
        "step_times_s": times["ours"],
        "torch_step_time_s": torch_s,
        "torch_step_times_s": times["torch"] or None,
        "speed_ratio": torch_s / step_s if torch_s else None,
        "step_cpu_s": statistics.median(ours.cpu_s),
        "torch_step_cpu_s": statistics.median(theirs.cpu_s) if theirs else None,
        "cpu_ratio": statistics.median(theirs.cpu_s) / statistics.median(ours.cpu_s) if theirs else None,
        "environment": {k: os.environ.get(k) for k in ("XLA_FLAGS", "LD_PRELOAD", "MALLOC_CONF", "OMP_NUM_THREADS")},
        "tokens_per_s": tokens_per_step / step_s,
        "model_flops_per_step": flops_per_step,
        "model_flop_per_s": flops_per_step / step_s,
        "mfu": flops_per_step / step_s / (peak * jax.device_count()) if peak else None,
        "datasheet_peak_flop_per_s": peak,
        "matmul_peak": measured,  # measured in this run, on one device
        "mfu_of_measured_matmul_peak": flops_per_step / step_s / (measured_peak * jax.device_count()),
        "torch_mfu": flops_per_step / torch_s / peak if torch_s and peak and jax.device_count() == 1 else None,
        "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
        "torch_device": str(theirs.device) if theirs else None,
        "torch_precision": ("autocast " + config.model.dtype if theirs.autocast else "float32") if theirs else None,
        "torch_compiled": theirs.compiled if theirs else None,
        "torch_compile_error": compile_error,
        "torch_peak_bytes": theirs.peak_bytes() if theirs else None,
        "loss": float(ours.metrics["loss"]),
        "torch_loss": theirs.loss if theirs else None,
        "skipped": skipped,  # what this run could not do here, and why
        "profile": None,  # --profile_steps: where the device time of traced steps went
        "compiled": costs,
    }  # fmt: skip
    _write(result)
    if _PROFILE_STEPS.value:
        # Written first: a profiler that fails or hangs here (CUPTI in a sandbox) costs the trace,
        # not the timing. An error is recorded, whatever it is: nothing but the trace depends on it.
        try:
            result["profile"] = trace_steps(ours, _PROFILE_STEPS.value, _TRACE_OUT.value)
        except Exception as e:  # noqa: BLE001
            result["profile"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        _write(result)
    print(json.dumps(result, indent=2))


def _write(result: dict) -> None:
    if _OUT.value:
        path = pathlib.Path(_OUT.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def _count(model_cfg) -> int:
    from polyglot_jax.model import count_params

    return count_params(model_cfg)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    app.run(main)
