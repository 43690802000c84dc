"""bench/attention.py --smoke runs end to end on CPU (interpret mode) and writes its JSON record.

Run in-process with one implementation per kernel family (portable Pallas, Hopper Pallas, XLA)
and `time_call` replaced by one un-jitted call: interpret-mode kernels under jax.jit are slow to
compile (and the jitted Hopper interpret kernel has hung on 2 cores), and the timings of a smoke
run mean nothing anyway. What is checked is the record: its fields, shapes and derived numbers.
"""

import importlib.util
import json
import pathlib
import sys
import time

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
IMPLS = ("pallas+rope+segments", "pallas_hopper", "xla")


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_attention", REPO / "bench" / "attention.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def one_call(fn, args, *, iters, repeats):
        fn = getattr(fn, "__wrapped__", fn)  # the function jax.jit wrapped: run it eagerly
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    monkeypatch.setattr(module, "time_call", one_call)
    return module


def test_smoke_run_writes_results(bench, tmp_path, monkeypatch):
    out = tmp_path / "attention.json"
    monkeypatch.setattr(sys, "argv", ["attention.py", "--smoke", f"--out={out}", "--impls", *IMPLS])
    assert bench.main() == 0
    record = json.loads(out.read_text())
    for key in ("device", "device_kind", "jax_version", "lowering", "attention", "rope"):
        assert key in record
    assert record["lowering"] == "interpret" and record["interpret"] is True
    assert "goals" not in record  # interpret-mode timings are not judged
    rows = {(r["impl"], r["mode"]): r for r in record["attention"]}
    assert set(rows) == {(i, m) for i in IMPLS for m in ("fwd", "fwd_bwd")}
    for (_, mode), row in rows.items():
        assert "error" not in row, row
        assert (row["batch"], row["seq"], row["heads"], row["head_dim"]) == (1, 96, 2, 128)
        assert row["causal"] is True and row["dtype"] == "bfloat16"
        flops = bench.attention_flops(1, 96, 2, 128, True, mode == "fwd_bwd")
        assert row["time_ms"] > 0
        assert row["tflops"] == pytest.approx(flops / (row["time_ms"] * 1e-3 * 1e12), rel=1e-9)
    assert {r["impl"] for r in record["rope"]} == {
        "hbm_elementwise",
        "xla_jnp_rope",
        "pallas_rope",
        "pallas_rope_bwd",
    }
    for row in record["rope"]:
        assert "error" not in row, row
        assert row["shape"] == [1, 64, 2, 128] and row["time_ms"] > 0
        assert row["gbps"] == pytest.approx(row["bytes"] / (row["time_ms"] * 1e-3) / 1e9, rel=1e-9)
