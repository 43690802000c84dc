"""Greedy decoding speed: `polyglot_jax.generate.Generator` against transformers' `generate`.

    python bench/generate.py                                   # CPU, ~100M model, float32
    python bench/generate.py --size=1.3b --dtype=bfloat16 --device=cuda \
        --out=bench/results/generate_h100_1.3b_bf16.json

One random GPT-NeoX (transformers' own init, seed 0) is saved to a temporary directory; ours loads it
with `generate_weights.load_from_hf`, transformers keeps the model in memory: the same weights on
both sides. Per batch size (default 1 and 16): random 32-token prompts, 128 new tokens, greedy,
no eos (transformers: `eos_token_id=None`, `min_new_tokens=max_new_tokens`; ours: no `eos_id`), so
both produce exactly 128 tokens per row. Each measurement runs once first (compilation and warm-up,
excluded), then --repeats times; the median is kept. Time to first token = the wall time of the same
call with `max_new_tokens=1` (prefill and one token). Tokens/s = batch * 128 / wall time of the full
call. Also: the fraction of equal greedy ids per row and the first position where they differ (a
random model has near-ties, so this is reported, not asserted).

Goal (the issue): ours >= 1.5x transformers' tokens/s at batch 1 and >= 1.0x at batch 16.

Imports only jax, numpy, torch, transformers and `polyglot_jax.{generate,model,hf.mapping}` at module
level (no ml_collections, no grain). Where ml_collections is missing (e.g. a GPU image without it),
`load_from_hf` (which imports the checkpoint converter) and `Sampling.check` (which imports
`polyglot_jax.config` for SEED_LIMIT) cannot run: the bench then converts the state dict with
`hf.mapping.from_hf_state_dict` and stubs `polyglot_jax.config` with SEED_LIMIT only, and says so
in the JSON (`workarounds`).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU with torch

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from polyglot_jax.generate import Generator, Sampling  # noqa: E402
from polyglot_jax.hf.mapping import from_hf_state_dict, to_hf_config  # noqa: E402
from polyglot_jax.model import DTYPES, ModelConfig  # noqa: E402

SIZES = {
    # A script check only (seconds): python bench/generate.py --size=tiny --out=/tmp/g.json
    "tiny": ModelConfig(
        vocab_size=512, num_layers=2, d_model=64, d_ff=256, num_heads=4, rotary_dim=4, max_len=256
    ),
    # ~100M parameters: GPT-2-small shapes with Polyglot-Ko's vocabulary; rotary_pct 0.25 of 64.
    "100m": ModelConfig(
        vocab_size=30080, num_layers=12, d_model=768, d_ff=3072, num_heads=12, rotary_dim=16,
        max_len=2048,
    ),
    # Polyglot-Ko 1.3B (configs/polyglot_ko_1_3b.py): rotary_pct 0.5 of head_dim 128.
    "1.3b": ModelConfig(
        vocab_size=30080, num_layers=24, d_model=2048, d_ff=8192, num_heads=16, rotary_dim=64,
        max_len=2048,
    ),
}  # fmt: skip
GOAL_SPEEDUP = {1: 1.5, 16: 1.0}  # ours / transformers tokens/s, by batch size
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _has_ml_collections() -> bool:
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        return False
    return True


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _median_wall(fn, repeats: int, warm_up: bool = True) -> tuple[float, list[float], object]:
    """(median seconds, all samples, last result) of `fn()`, after one untimed warm-up call."""
    out = fn() if warm_up else None
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples, out


def read_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """The device's read rate on a buffer of `nbytes` (the weights a decode step reads): the
    fastest of a jitted float32 sum (JAX) and, on CPU, torch's multi-threaded sum. A batch-1 step
    reads every weight once, so `nbytes / rate` is the floor of its time on this machine."""
    n = max(1, nbytes // 4)
    x = jax.device_put(np.ones(n, np.float32))
    total = jax.jit(lambda a: a.sum())
    jax_s, _, _ = _median_wall(lambda: total(x).block_until_ready(), repeats)
    rates = {"jax_sum_gb_s": nbytes / jax_s / 1e9}
    if jax.default_backend() == "cpu":
        t = torch.ones(n, dtype=torch.float32)
        torch_s, _, _ = _median_wall(lambda: t.sum(), repeats)
        rates["torch_sum_gb_s"] = nbytes / torch_s / 1e9
    return {**rates, "best_gb_s": max(rates.values())}


# ----------------------------------------------------------------------------------- the model


def random_hf_model(cfg: ModelConfig) -> GPTNeoXForCausalLM:
    """transformers' own init (normal(0, 0.02) weights, unit LayerNorms), float32, seed 0."""
    fields = {
        k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")
    }
    fields["torch_dtype"] = "float32"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()


def load_ours(model: GPTNeoXForCausalLM, cfg: ModelConfig, dtype: str, workarounds: list[str]):
    """(decode config, params) through `load_from_hf` on a saved copy, or, without ml_collections,
    through the numpy state-dict mapping."""
    if _has_ml_collections():
        from polyglot_jax.generate_weights import load_from_hf

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            dec_cfg, params, _ = load_from_hf(tmp, dtype=dtype)
        return dec_cfg, params
    workarounds.append(
        "ml_collections missing: params from hf.mapping.from_hf_state_dict instead of "
        "generate_weights.load_from_hf (which imports polyglot_jax.hf.convert -> ml_collections)"
    )
    dec_cfg = dataclasses.replace(
        cfg, dtype=dtype, param_dtype=dtype, scan_layers=False, remat_policy="none"
    )
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tree = from_hf_state_dict(state, dec_cfg)
    return dec_cfg, jax.tree.map(lambda x: jax.device_put(x.astype(DTYPES[dtype])), tree)


def stub_config_module(workarounds: list[str]) -> None:
    """`Sampling.check` imports polyglot_jax.config (which imports ml_collections) for SEED_LIMIT."""
    if not _has_ml_collections() and "polyglot_jax.config" not in sys.modules:
        stub = types.ModuleType("polyglot_jax.config")
        stub.SEED_LIMIT = 2**32
        sys.modules["polyglot_jax.config"] = stub
        workarounds.append(
            "ml_collections missing: polyglot_jax.config stubbed with SEED_LIMIT for Sampling.check"
        )


# ----------------------------------------------------------------------------------- the runs


def run_ours(gen: Generator, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    def call(n):
        return lambda: gen.generate(prompts, Sampling(max_new_tokens=n, greedy=True))

    first_calls_s = {}
    for n in (new_tokens, 1):  # the warm-up calls: each shape compiles once, then runs
        start = time.perf_counter()
        call(n)()
        first_calls_s[str(n)] = time.perf_counter() - start
    wall, samples, out = _median_wall(call(new_tokens), repeats, warm_up=False)
    ttft, ttft_samples, _ = _median_wall(call(1), repeats, warm_up=False)
    ids = [row[0].ids for row in out]
    assert all(len(i) == new_tokens for i in ids), [len(i) for i in ids]
    return dict(
        tokens_per_s=len(prompts) * new_tokens / wall,
        ttft_s=ttft,
        wall_s=wall,
        decode_step_s=(wall - ttft) / (new_tokens - 1),
        wall_samples_s=samples,
        ttft_samples_s=ttft_samples,
        first_call_s_by_max_new_tokens=first_calls_s,  # compile + one run (excluded)
        ids=ids,
    )


def run_hf(model, prompts: list[list[int]], new_tokens: int, repeats: int, device: str) -> dict:
    input_ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(input_ids)

    def call(n):
        def go():
            with torch.inference_mode():
                out = model.generate(
                    input_ids, attention_mask=mask, do_sample=False, use_cache=True,
                    max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        return go

    wall, samples, out = _median_wall(call(new_tokens), repeats)
    ttft, ttft_samples, _ = _median_wall(call(1), repeats)
    ids = out[:, input_ids.shape[1] :].cpu().tolist()
    assert all(len(i) == new_tokens for i in ids), [len(i) for i in ids]
    return dict(
        tokens_per_s=len(prompts) * new_tokens / wall,
        ttft_s=ttft,
        wall_s=wall,
        decode_step_s=(wall - ttft) / (new_tokens - 1),
        wall_samples_s=samples,
        ttft_samples_s=ttft_samples,
        ids=ids,
    )


def agreement(ours: list[list[int]], hf: list[list[int]]) -> dict:
    equal = [float(np.mean(np.asarray(a) == np.asarray(b))) for a, b in zip(ours, hf, strict=True)]
    first = []
    for a, b in zip(ours, hf, strict=True):
        diff = np.flatnonzero(np.asarray(a) != np.asarray(b))
        first.append(int(diff[0]) if diff.size else None)
    return dict(
        identical=all(f is None for f in first),
        equal_fraction_per_row=equal,
        first_difference_per_row=first,
    )


# ----------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="both sides")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch's side")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the cpu count)")
    parser.add_argument("--out", default="", help="JSON path (default bench/results/<auto>.json)")
    args = parser.parse_args()

    cpus = _cpus()
    threads = args.threads or cpus
    torch.set_num_threads(threads)
    workarounds: list[str] = []
    stub_config_module(workarounds)
    cfg = SIZES[args.size]

    t0 = time.perf_counter()
    model = random_hf_model(cfg)
    dec_cfg, params = load_ours(model, cfg, args.dtype, workarounds)
    model = model.to(device=args.device, dtype=TORCH_DTYPES[args.dtype])
    model.generation_config.eos_token_id = None
    setup_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    gen = Generator(params, dec_cfg, batch_size=max(args.batches))

    device = jax.devices()[0]
    record = {
        "benchmark": "generate",
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "argv": sys.argv[1:],
        "device": str(device),
        "device_kind": device.device_kind,
        "cpu": cpu_model(),
        "platform": jax.default_backend(),
        "torch_device": args.device,
        "versions": _versions(),
        "cpu_count": cpus,
        "torch_threads": torch.get_num_threads(),
        "threads_note": f"torch.set_num_threads({threads}) (the cpu count unless --threads); "
        "XLA's CPU client uses its own pool over all cores",
        "config": {
            "size": args.size,
            "parameters": n_params,
            **{
                k: getattr(dec_cfg, k)
                for k in (
                    "num_layers",
                    "d_model",
                    "num_heads",
                    "d_ff",
                    "vocab_size",
                    "rotary_dim",
                    "max_len",
                    "dtype",
                    "attention_impl",
                )
            },
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "greedy": True,
        },  # fmt: skip
        "method": "per measurement: one untimed warm-up call (for ours also the compile), then "
        f"the median of {args.repeats} timed calls; ttft = the wall time of max_new_tokens=1; "
        "tokens_per_s = batch * new_tokens / full wall time; decode_step_s = "
        "(wall - ttft) / (new_tokens - 1)",
        "setup_s": setup_s,
        "workarounds": workarounds,
        "batches": {},
    }
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        load_before = os.getloadavg()
        ours = run_ours(gen, prompts, args.new_tokens, args.repeats)
        load_between = os.getloadavg()
        hf = run_hf(model, prompts, args.new_tokens, args.repeats, args.device)
        load_after = os.getloadavg()
        same = agreement(ours.pop("ids"), hf.pop("ids"))
        speedup = ours["tokens_per_s"] / hf["tokens_per_s"]
        goal = GOAL_SPEEDUP.get(batch)
        record["batches"][str(batch)] = dict(
            ours=ours,
            hf=hf,
            speedup=speedup,
            ttft_speedup=hf["ttft_s"] / ours["ttft_s"],
            goal_speedup=goal,
            goal_met=None if goal is None else speedup >= goal,
            greedy_agreement=same,
            # 1-minute load averages before ours, between, after transformers: on a shared
            # machine other jobs' load shows here (torch's threads suffer most from it).
            load_average_1m=[load_before[0], load_between[0], load_after[0]],
        )
        print(
            f"batch {batch}: ours {ours['tokens_per_s']:.1f} tok/s (ttft {ours['ttft_s']:.3f}s), "
            f"hf {hf['tokens_per_s']:.1f} tok/s (ttft {hf['ttft_s']:.3f}s), "
            f"speedup {speedup:.2f}x, identical ids {same['identical']}",
            flush=True,
        )

    # After both sides (its buffers must not disturb them): a batch-1 step reads every weight
    # but the input embedding once, its floor on this device.
    step_bytes = (n_params - cfg.vocab_size * cfg.d_model) * np.dtype(DTYPES[args.dtype]).itemsize
    bandwidth = read_bandwidth(step_bytes)
    record["batch1_floor"] = {
        "weight_bytes_per_step": step_bytes,
        **bandwidth,
        "floor_step_s": step_bytes / bandwidth["best_gb_s"] / 1e9,
        "note": "a batch-1 decode step reads every weight but the input embedding once; at the "
        "best measured read rate that takes floor_step_s, so neither side can step faster, and "
        "the largest possible speedup over transformers is its decode_step_s / floor_step_s",
    }
    if "1" in record["batches"]:
        floor, steps = record["batch1_floor"], record["batches"]["1"]
        for side in ("ours", "hf"):
            floor[f"{side}_step_over_floor"] = steps[side]["decode_step_s"] / floor["floor_step_s"]
        floor["largest_possible_speedup"] = steps["hf"]["decode_step_s"] / floor["floor_step_s"]

    kind = "cpu" if jax.default_backend() == "cpu" else device.device_kind.lower().replace(" ", "-")
    name = f"generate_{kind}_{args.size}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    out = pathlib.Path(args.out or REPO / "bench" / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
