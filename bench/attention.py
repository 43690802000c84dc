"""Benchmark the Pallas attention and RoPE kernels against XLA and cuDNN; write JSON to bench/results/.

    python bench/attention.py                      # GPU/TPU: the issue's shapes (seq 2048-8192)
    python bench/attention.py --smoke              # CPU: tiny shapes in interpret mode (script check)
    python bench/attention.py --triton-resources   # no GPU needed: compile the Triton kernels
                                                   # offline (needs a `triton` package on the path)

Attention: causal, bf16, 16 heads, head_dim 128 and 256, batch * seq = --tokens; forward and
forward+backward TFLOP/s by the usual model-FLOP count (forward 4*B*H*T^2*D, halved when causal;
backward 2.5x the forward). Implementations: this package's kernels (without and with fused RoPE, and
with packed segments), the same as Hopper (Mosaic GPU) kernels, jax.nn.dot_product_attention's XLA
and cuDNN paths, and XLA/cuDNN after a separate jnp RoPE (what the fused kernel replaces). RoPE: the
standalone kernel's GB/s (bytes read and written) against XLA's fused jnp RoPE and against a plain
XLA elementwise pass (the HBM bandwidth reached in practice). Imports only jax, numpy, the standard
library, polyglot_jax.kernels and polyglot_jax.rope (the model's jnp RoPE, what XLA fuses on its own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from polyglot_jax import jax_compat  # noqa: E402
from polyglot_jax.kernels import Tiling, flash_attention, rope  # noqa: E402
from polyglot_jax.kernels import backend as backend_lib  # noqa: E402
from polyglot_jax.rope import apply_rope  # noqa: E402

ROTARY_DIM = 64
ROPE_BASE = 10000.0  # the kernels' default rope_base
GOAL_FORWARD_TFLOPS = 400.0  # H100, seq 2048, head_dim 128, causal, bf16
GOAL_FWD_BWD_VS_CUDNN = 0.9
GOAL_ROPE_VS_HBM = 0.8
OURS = ("pallas", "pallas_hopper")  # the kernels the speed goals are about


# ---------------------------------------------------------------------------------------- timing


def time_call(fn, args, *, iters: int, repeats: int) -> float:
    """Median seconds per call of a jitted ``fn`` (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def attention_flops(b: int, t: int, h: int, d: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


# -------------------------------------------------------------------------------- implementations


def attention_impls(interpret: bool):
    """name -> fn(q, k, v, positions, segment_ids) for every implementation to time."""
    kernel = dict(interpret=interpret)
    if interpret:  # tiny tiles so the CPU smoke run walks several of them
        kernel["tiling"] = Tiling(
            block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, block_q_dq=32, block_k_dq=32
        )
    hopper = dict(kernel, backend="mosaic_gpu")

    def xla(implementation, rotary):
        def fn(q, k, v, positions, segment_ids):
            if rotary:
                q, k = (apply_rope(x, positions, ROTARY_DIM, ROPE_BASE) for x in (q, k))
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )

        return fn

    return {
        "pallas": lambda q, k, v, p, s: flash_attention(q, k, v, **kernel),
        "pallas+rope": lambda q, k, v, p, s: flash_attention(
            q, k, v, positions=p, rotary_dim=ROTARY_DIM, **kernel
        ),
        "pallas+rope+segments": lambda q, k, v, p, s: flash_attention(
            q, k, v, segment_ids=s, positions=p, rotary_dim=ROTARY_DIM, **kernel
        ),
        # The Hopper (Mosaic GPU) kernels: H100 only, an error row elsewhere.
        "pallas_hopper": lambda q, k, v, p, s: flash_attention(q, k, v, **hopper),
        "pallas_hopper+rope": lambda q, k, v, p, s: flash_attention(
            q, k, v, positions=p, rotary_dim=ROTARY_DIM, **hopper
        ),
        "pallas_hopper+rope+segments": lambda q, k, v, p, s: flash_attention(
            q, k, v, segment_ids=s, positions=p, rotary_dim=ROTARY_DIM, **hopper
        ),
        "xla": xla("xla", False),
        "xla+rope": xla("xla", True),
        "cudnn": xla("cudnn", False),
        "cudnn+rope": xla("cudnn", True),
    }


def packed_inputs(b: int, t: int, doc_len: int):
    """Segment ids of doc_len-token documents and positions restarting in each."""
    index = jnp.arange(t, dtype=jnp.int32)
    segment_ids = jnp.broadcast_to(index // doc_len, (b, t))
    positions = jnp.broadcast_to(index % doc_len, (b, t))
    return positions, segment_ids


def bench_attention(args, interpret: bool) -> list[dict]:
    results = []
    for d in args.head_dims:
        for t in args.seqs:
            b = max(1, args.tokens // t)
            key = jax.random.split(jax.random.key(0), 4)
            q, k, v, ct = (jax.random.normal(kk, (b, t, args.heads, d), jnp.bfloat16) for kk in key)
            positions, segment_ids = packed_inputs(b, t, args.doc_len)
            for name, fn in attention_impls(interpret).items():
                if args.impls and name not in args.impls:
                    continue
                for backward in (False, True):
                    row = dict(
                        impl=name,
                        batch=b,
                        seq=t,
                        heads=args.heads,
                        head_dim=d,
                        causal=True,
                        dtype="bfloat16",
                        mode="fwd_bwd" if backward else "fwd",
                    )
                    if backward:

                        def run(q, k, v, p, s, ct, fn=fn):
                            out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, p, s), q, k, v)
                            return out, pullback(ct)
                    else:

                        def run(q, k, v, p, s, ct, fn=fn):
                            return fn(q, k, v, p, s)

                    try:
                        seconds = time_call(
                            jax.jit(run),
                            (q, k, v, positions, segment_ids, ct),
                            iters=args.iters,
                            repeats=args.repeats,
                        )
                    except Exception as err:  # e.g. cuDNN off-GPU or out of memory: record it
                        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    else:
                        row["time_ms"] = seconds * 1e3
                        row["tflops"] = attention_flops(b, t, args.heads, d, True, backward) / (
                            seconds * 1e12
                        )
                    results.append(row)
                    print(json.dumps(row), flush=True)
    return results


def bench_rope(args, interpret: bool) -> list[dict]:
    results = []
    b, t, h, d = args.rope_shape
    x = jax.random.normal(jax.random.key(1), (b, t, h, d), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_bytes = x.size * x.dtype.itemsize
    table_bytes = 2 * b * t * (ROTARY_DIM // 2) * 4
    cases = {
        "hbm_elementwise": (lambda x, p: x + jnp.ones((), x.dtype), 2 * x_bytes),
        "xla_jnp_rope": (lambda x, p: apply_rope(x, p, ROTARY_DIM, ROPE_BASE), 2 * x_bytes),
        "pallas_rope": (
            lambda x, p: rope(x, p, rotary_dim=ROTARY_DIM, interpret=interpret),
            2 * x_bytes + table_bytes,
        ),
        "pallas_rope_bwd": (
            lambda x, p: jax.vjp(
                lambda y: rope(y, p, rotary_dim=ROTARY_DIM, interpret=interpret), x
            )[1](x)[0],
            2 * x_bytes + table_bytes,
        ),
    }
    for name, (fn, moved) in cases.items():
        row = dict(
            impl=name, shape=[b, t, h, d], rotary_dim=ROTARY_DIM, dtype="bfloat16", bytes=moved
        )
        try:
            seconds = time_call(jax.jit(fn), (x, positions), iters=args.iters, repeats=args.repeats)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            row["time_ms"] = seconds * 1e3
            row["gbps"] = moved / seconds / 1e9
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def goals(attention: list[dict], rope_rows: list[dict]) -> dict:
    """The issue's targets, evaluated where the needed numbers exist (meaningful on an H100)."""

    def find(rows, **match):
        for row in rows:
            if all(row.get(k) == v for k, v in match.items()) and "error" not in row:
                return row
        return None

    def fastest(mode):  # either of our kernels counts: the model can run either
        rows = [find(attention, impl=i, seq=2048, head_dim=128, mode=mode) for i in OURS]
        rows = [r for r in rows if r]
        return max(rows, key=lambda r: r["tflops"]) if rows else None

    out = {}
    ours = fastest("fwd")
    if ours:
        out["forward_tflops"] = {
            "value": ours["tflops"],
            "impl": ours["impl"],
            "goal": GOAL_FORWARD_TFLOPS,
            "met": ours["tflops"] >= GOAL_FORWARD_TFLOPS,
        }
    ours = fastest("fwd_bwd")
    cudnn = find(attention, impl="cudnn", seq=2048, head_dim=128, mode="fwd_bwd")
    if ours and cudnn:
        ratio = ours["tflops"] / cudnn["tflops"]
        out["fwd_bwd_vs_cudnn"] = {
            "value": ratio,
            "impl": ours["impl"],
            "goal": GOAL_FWD_BWD_VS_CUDNN,
            "met": ratio >= GOAL_FWD_BWD_VS_CUDNN,
        }
    kernel, hbm = find(rope_rows, impl="pallas_rope"), find(rope_rows, impl="hbm_elementwise")
    if kernel and hbm:
        ratio = kernel["gbps"] / hbm["gbps"]
        out["rope_vs_hbm"] = {
            "value": ratio,
            "goal": GOAL_ROPE_VS_HBM,
            "met": ratio >= GOAL_ROPE_VS_HBM,
        }
    return out


# ----------------------------------------------------------------- offline Triton resource check


def triton_resources(args) -> list[dict]:
    """Compile each Triton kernel for sm_80 and sm_90 with a pip ``triton`` (no GPU needed) and report
    shared memory, registers and spills of the default tilings. Taps the private Pallas Triton
    lowering to get the Triton IR, so it may need updating with jax."""
    if args.triton_path:
        sys.path.insert(0, args.triton_path)
    import triton
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.pallas.triton import pallas_call_registration
    from triton.backends.compiler import GPUTarget

    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = original(*a, **kw)
        captured.append((result.module.operation.get_asm(), result.grid))
        return result

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    smem_limit = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100, H100
    rows = []
    variants = {"plain": (0, False), "rope+segments": (ROTARY_DIM, True)}
    for d in args.head_dims:
        for sm in (80, 90):
            tiling = Tiling.default(d, "triton", sm)
            launch = [
                (tiling.num_warps, tiling.num_stages),
                (tiling.num_warps_dkv, tiling.num_stages_dkv),
                (tiling.num_warps_dq, tiling.num_stages_dq),
            ]
            qkv = jax.ShapeDtypeStruct((1, 2048, 2, d), jnp.bfloat16)
            ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
            for variant, (rotary_dim, segmented) in variants.items():

                def loss(q, k, v, s, p, tiling=tiling, rotary_dim=rotary_dim, segmented=segmented):
                    out = flash_attention(
                        q,
                        k,
                        v,
                        segment_ids=s if segmented else None,
                        positions=p,
                        rotary_dim=rotary_dim,
                        backend="triton",
                        tiling=tiling,
                    )
                    return jnp.sum(out.astype(jnp.float32))

                captured.clear()
                with jax_compat.gpu_lowering_target(sm):
                    jax.jit(jax.grad(loss, (0, 1, 2))).trace(qkv, qkv, qkv, ids, ids).lower(
                        lowering_platforms=("cuda",)
                    )
                kernels = zip(captured, ("fwd", "dkdv", "dq"), launch, strict=True)
                for (ir, _), name, (warps, stages) in kernels:
                    row = dict(
                        head_dim=d,
                        sm=sm,
                        variant=variant,
                        kernel=name,
                        num_warps=warps,
                        num_stages=stages,
                        **_compile_offline(triton, GPUTarget, ptxas, ir, sm, warps, stages),
                    )
                    row["fits_shared"] = row["shared_bytes"] <= smem_limit[sm]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    x = jax.ShapeDtypeStruct((2, 2048, 16, 128), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((2, 2048), jnp.int32)
    for sm in (80, 90):

        def rope_loss(x, p):
            return jnp.sum(rope(x, p, rotary_dim=ROTARY_DIM, backend="triton").astype(jnp.float32))

        captured.clear()
        # value_and_grad: with grad alone jax 0.12 drops the (unused) forward kernel.
        with jax_compat.gpu_lowering_target(sm):
            jax.jit(jax.value_and_grad(rope_loss)).trace(x, positions).lower(
                lowering_platforms=("cuda",)
            )
        for (ir, _), name in zip(captured, ("rope_fwd", "rope_bwd"), strict=True):
            row = dict(
                head_dim=128,
                sm=sm,
                variant="rope",
                kernel=name,
                num_warps=4,
                num_stages=1,
                **_compile_offline(triton, GPUTarget, ptxas, ir, sm, 4, 1),
            )
            row["fits_shared"] = row["shared_bytes"] <= smem_limit[sm]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _compile_offline(triton, gpu_target, ptxas, ir: str, sm: int, warps: int, stages: int) -> dict:
    """Triton IR -> PTX with the given triton package; shared memory, registers and spills by ptxas."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ttir"
        path.write_text(ir)
        compiled = triton.compile(
            str(path),
            target=gpu_target("cuda", sm, 32),
            options=dict(num_warps=warps, num_stages=stages),
        )
        ptx = pathlib.Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = "sm_90a" if sm == 90 else f"sm_{sm}"
        report = subprocess.run(
            [str(ptxas), "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return dict(
        shared_bytes=compiled.metadata.shared,
        registers=int(regs.group(1)) if regs else None,
        spill_store_bytes=int(spills.group(1)) if spills else None,
    )


# -------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, on CPU")
    parser.add_argument("--triton-resources", action="store_true")
    parser.add_argument("--triton-path", default="", help="directory holding a pip triton package")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
    parser.add_argument("--doc-len", type=int, default=512, help="document length when packed")
    parser.add_argument("--impls", nargs="*", default=[], help="subset of implementations")
    parser.add_argument("--rope-shape", type=int, nargs=4, default=[8, 2048, 16, 128])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="", help="JSON path (default bench/results/<auto>.json)")
    args = parser.parse_args()

    interpret = False
    if args.smoke:
        interpret = True
        args.seqs, args.head_dims, args.heads, args.tokens, args.doc_len = [96], [128], 2, 96, 40
        args.rope_shape, args.iters, args.repeats = [1, 64, 2, 128], 1, 1
    device = jax.devices()[0]
    record = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "device": str(device),
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "interpret": interpret,
        "rotary_dim": ROTARY_DIM,
        "argv": sys.argv[1:],
    }
    if args.triton_resources:
        record["triton_resources"] = triton_resources(args)
        record["triton_version"] = sys.modules["triton"].__version__
        kind = "triton-resources"
    else:
        if not interpret and jax.default_backend() == "cpu":
            print("no GPU/TPU: use --smoke (interpret mode) or --triton-resources", file=sys.stderr)
            return 2
        record["lowering"] = backend_lib.resolve_backend(interpret)
        record["attention"] = bench_attention(args, interpret)
        record["rope"] = bench_rope(args, interpret)
        if not interpret:  # interpret-mode timings say nothing about the kernels' speed
            record["goals"] = goals(record["attention"], record["rope"])
        kind = "smoke" if interpret else device.device_kind.lower().replace(" ", "-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out or REPO / "bench" / "results" / f"attention-{kind}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    if "goals" in record:
        print(json.dumps(record["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
