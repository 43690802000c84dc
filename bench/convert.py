"""Checkpoint conversion at real size: random Polyglot-Ko checkpoints, orbax -> HF -> orbax.

    python bench/convert.py [--cases=1.3b,1.3b_fsdp8,12.8b_2layers] [--repeats=3]
        [--cache_dir=DIR] [--out=bench/results/convert_cpu.json]

Cases: `1.3b` (the goal case: the 1.3B model saved from one device, so each stacked parameter is
one storage chunk spanning all 24 layers), `1.3b_fsdp8` (saved from 8 fake CPU devices with
fsdp=8: chunks cut every tensor along d_model, so every layer arrives in 8 pieces) and
`12.8b_2layers` (two layers of the 12.8B shapes: 5120 x 20480 tensors, the largest per-tensor
memory of any conversion in the family).

Per case:
1. Once, in its own process: random parameters from the model's init (float32), saved as
   `checkpoints/0` of a run directory by `polyglot_jax.checkpoint.Checkpointer`, with the run's
   config.json. Kept in --cache_dir for later runs.
2. `convert.to_hf` (float16, default 5GB shards) in a fresh process.
3. `convert.from_hf` of that output (back to a float32 orbax checkpoint) in a fresh process.

Each measured process starts after `sync` and reports its wall time and its peak RSS
(`ru_maxrss`) minus its RSS after all imports (the interpreter's baseline). Throughput is the float32 parameter bytes (what the
checkpoint holds) per second. The goal (1.3B): peak RSS <= 2.5 GB above the baseline, >= 200 MB/s.
Timings on a shared 2-core machine are noisy (other jobs compete for the cores and the disk).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from machine import cpu_model  # noqa: E402  (bench/machine.py)

REPO = Path(__file__).resolve().parents[1]
GOAL_RSS_BYTES = 2.5e9
GOAL_BYTES_PER_S = 200e6


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "orbax-checkpoint",
        "tensorstore",
        "safetensors",
        "numpy",
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _machine() -> dict:
    cpu = cpu_model()
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": mem}


# ---------------------------------------------------------------- child processes


CASES = {
    "1.3b": {"config": "configs/polyglot_ko_1_3b.py", "num_layers": None, "fsdp": 1},
    "1.3b_fsdp8": {"config": "configs/polyglot_ko_1_3b.py", "num_layers": None, "fsdp": 8},
    "12.8b_2layers": {"config": "configs/polyglot_ko_12_8b.py", "num_layers": 2, "fsdp": 1},
}


def _case_config(case: dict):
    from polyglot_jax.config import load_config

    config = load_config(str(REPO / case["config"]))
    if case["num_layers"]:
        config.model.num_layers = case["num_layers"]
    return config


def build(case: dict, workdir: Path) -> None:
    """Random params from the model's own init, saved as checkpoint 0 with config.json, on a
    mesh of `case["fsdp"]` CPU devices (fsdp) sharded by the config's rules."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from polyglot_jax.checkpoint import Checkpointer
    from polyglot_jax.model import GPTNeoX, ModelConfig, abstract_params
    from polyglot_jax.partitioning import logical_shardings, make_mesh, rules_from_config

    config = _case_config(case)
    cfg = ModelConfig.from_config(config.model)
    shape = {"data": 1, "fsdp": case["fsdp"], "model": 1, "dcn_data": 1, "dcn_fsdp": 1}
    mesh = make_mesh({**shape, "dcn_model": 1}, jax.devices()[: case["fsdp"]])
    shardings = logical_shardings(abstract_params(cfg), mesh, rules_from_config(config.mesh.rules))

    def init():
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(GPTNeoX(cfg).init(jax.random.key(0), tokens)["params"])

    params = jax.jit(init, out_shardings=shardings)()
    tmp = workdir.with_name(workdir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = Checkpointer(tmp, keep=1, keep_period=None, async_save=False)
    # Only `params` is measured; a one-scalar optimizer state keeps the build within memory.
    ckpt.save(0, params, {"count": np.zeros((), np.int32)}, None)
    ckpt.close()
    (tmp / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    tmp.rename(workdir)


def measure(direction: str, source: Path, target: Path) -> dict:
    """Runs one conversion in this (fresh) process; RSS relative to after the imports."""
    from polyglot_jax.hf import convert

    convert.axis_order  # noqa: B018 - imported, nothing allocated yet
    baseline = _rss_bytes()
    start = time.perf_counter()
    if direction == "to_hf":
        result = convert.to_hf(source, target, dtype="float16", show_progress=False)
    else:
        result = convert.from_hf(source, target, show_progress=False)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_above_baseline_bytes": _peak_rss_bytes() - baseline,
        "files": [f.name for f in result.files],
        "written_tensor_bytes": result.tensor_bytes,
    }


def _child(args: list[str], devices: int = 1) -> dict | None:
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{' '.join(args)} failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_case(name: str, cache: Path, repeats: int) -> dict:
    """Builds the case's checkpoint if needed, then `repeats` rounds of to_hf and from_hf; the
    reported round is the median one by time (all rounds are kept under `rounds`)."""
    case = CASES[name]
    workdir, hf_dir, back = cache / f"{name}_run", cache / f"{name}_hf", cache / f"{name}_back"
    if not (workdir / "config.json").is_file():
        print(f"building a random checkpoint in {workdir} (once)", file=sys.stderr)
        start = time.perf_counter()
        _child(["--role=build", f"--cases={name}", f"--target={workdir}"], case["fsdp"])
        print(f"  built in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    from polyglot_jax.model import ModelConfig, count_params

    cfg = ModelConfig.from_config(_case_config(case).model)
    param_bytes = count_params(cfg) * 4
    report = {**case, "parameters": count_params(cfg), "float32_param_bytes": param_bytes}
    rounds: dict[str, list] = {"to_hf": [], "from_hf": []}
    for _ in range(repeats):
        for d in (hf_dir, back):
            shutil.rmtree(d, ignore_errors=True)
        for direction, source, target in (("to_hf", workdir, hf_dir), ("from_hf", hf_dir, back)):
            print(f"{name} {direction} ...", file=sys.stderr)
            os.sync()  # start without the previous step's dirty pages still being written back
            r = _child([f"--role={direction}", f"--source={source}", f"--target={target}"])
            r["float32_param_bytes_per_s"] = param_bytes / r["seconds"]
            rounds[direction].append(r)
            print(
                f"  {r['seconds']:.1f} s, {r['float32_param_bytes_per_s'] / 1e6:.0f} MB/s of "
                f"float32 params, peak RSS +{r['peak_rss_above_baseline_bytes'] / 1e9:.2f} GB",
                file=sys.stderr,
            )
    for direction, runs in rounds.items():
        report[direction] = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        report[direction]["rounds"] = [
            {k: r[k] for k in ("seconds", "peak_rss_above_baseline_bytes")} for r in runs
        ]
    shutil.rmtree(back, ignore_errors=True)
    shutil.rmtree(hf_dir, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case (median kept)")
    parser.add_argument(
        "--cache_dir", default=str(Path(tempfile.gettempdir()) / "polyglot_jax_bench_convert")
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "convert_cpu.json"))
    parser.add_argument("--role", choices=["build", "to_hf", "from_hf"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    if args.role == "build":
        build(CASES[args.cases], Path(args.target))
        return
    if args.role in ("to_hf", "from_hf"):
        print(json.dumps(measure(args.role, Path(args.source), Path(args.target))))
        return

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    cases = {name: run_case(name, cache, args.repeats) for name in args.cases.split(",")}
    goal_case = cases.get("1.3b")
    goals = {"peak_rss_above_baseline_bytes": GOAL_RSS_BYTES, "bytes_per_s": GOAL_BYTES_PER_S}
    if goal_case:
        goals["met"] = {
            d: {
                "rss": goal_case[d]["peak_rss_above_baseline_bytes"] <= GOAL_RSS_BYTES,
                "speed": goal_case[d]["float32_param_bytes_per_s"] >= GOAL_BYTES_PER_S,
            }
            for d in ("to_hf", "from_hf")
        }
    report = {
        "benchmark": "checkpoint conversion orbax <-> HF safetensors, one fresh process each",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "goals (case 1.3b)": goals,
        "cases": cases,
        "machine": _machine(),
        "versions": _versions(),
        "note": (
            "2 shared cores: other engineers' jobs ran at the same time (load average 3-6), so "
            "wall times and rates are noisy and pessimistic; peak RSS is not affected"
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
