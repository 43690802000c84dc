"""bench/device_suite.sh --rehearse: the GPU suite's steps at tiny sizes on CPU, run as the GPU
machine would run them, so that nothing fails there for a reason a CPU could have caught.

The packages that machine's image lacks and the suite does not carry in bench/wheels are made
unimportable (`sys.modules[name] = None` from a sitecustomize: `import` fails and
`importlib.util.find_spec` says absent), so a GPU path that imported seqio, datatrove, lm_eval
or tensorboardX fails here. Every step must pass and write its record with the device and versions.
"""

import gzip
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# What our environment has and that image does not (the device library's KINDS.md package list,
# 2026-11-17), less what the suite carries (Makefile's BENCH_WHEELS: grain, array_record,
# ml_collections, zstandard, pytest).
ABSENT_ON_THE_GPU_IMAGE = (
    "seqio", "tensorflow", "datatrove", "lm_eval", "tensorboardX", "konlpy", "mecab",
    "datasketch", "datasets", "nltk", "rouge_score", "pydantic",
)  # fmt: skip


def _within_the_device_tools_limits(dest: pathlib.Path) -> None:
    """What the device tool brings back from $OUT: at most 8 files, 16 MiB each and 64 MiB in
    all, at most 2 folders down, named in letters, digits, '.', '_' and '-'."""
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(p.name for p in files)
    assert all(p.stat().st_size <= 16 << 20 for p in files)
    assert sum(p.stat().st_size for p in files) <= 64 << 20
    for path in files:
        parts = path.relative_to(dest).parts
        assert len(parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", x) for x in parts), path


def test_rehearsal_passes_every_step_without_the_packages_the_gpu_image_lacks(tmp_path):
    blocker = tmp_path / "absent"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in ABSENT_ON_THE_GPU_IMAGE)
    )
    dest, out = tmp_path / "OUT", tmp_path / "suite"
    env = {**os.environ, "PYTHONPATH": str(blocker), "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the suite's own processes would see
    done = subprocess.run(
        ["bash", "bench/device_suite.sh", "--rehearse", "--pack", str(dest)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    # As the device tool runs it: everything comes back, in two files.
    _within_the_device_tools_limits(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["suite.tar.gz", "summary.json"]
    with tarfile.open(dest / "suite.tar.gz") as tar:
        tar.extractall(out, filter="data")
    assert (out / "summary.json").read_text() == (dest / "summary.json").read_text()
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.log"))
    )
    assert done.returncode == 0, done.stdout + done.stderr + logs
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == [
        "device", "kernels", "train_step_xla", "attention", "generate", "train_step_pallas"
    ]  # fmt: skip
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        torch_here = True
    except ImportError:  # the 3.12 line: no CPU torch wheel here
        torch_here = False
    skipped = {"generate"} if not torch_here else set()
    assert all(s["status"] == "passed" for k, s in steps.items() if k not in skipped), steps
    assert all(steps[k]["status"] == "skipped" and steps[k]["reason"] for k in skipped)
    assert summary["rehearsal"] is True and summary["passed"] is True
    assert [g["met"] for g in summary["goals"]] == [None] * 4  # no GPU figures on a CPU
    assert summary["device"]["backend"] == "cpu" and summary["device"]["jax"]
    assert all((out / s["log"]).is_file() for s in steps.values() if "log" in s)
    assert all((out / name).is_file() for name in summary["results"])
    assert done.stdout.rstrip().endswith(f"steps passed; {dest / 'suite.tar.gz'}")

    # The blocker worked: the suite's processes could not import what the GPU image lacks.
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('lm_eval'))"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr

    # The on-device kernel tests were collected and skipped, saying why (no GPU here).
    suite = ET.parse(out / "kernels.xml").getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests >= 10 and skipped == tests - 1  # all but the GPU-presence check
    assert int(suite.get("errors")) == 0 and int(suite.get("failures")) == 0
    assert "needs a GPU" in (out / "logs" / "kernels.log").read_text()

    pallas = json.loads((out / "train_step_tiny_pallas.json").read_text())
    assert pallas["model"]["attention_impl"] == "pallas" and pallas["torch_step_time_s"] is None
    step = json.loads((out / "train_step_tiny_xla.json").read_text())
    assert step["platform"] == "cpu" and step["model"]["attention_impl"] == "xla"
    assert step["versions"]["jax"] and step["step_time_s"] > 0
    assert step["matmul_peak"]["flop_per_s"] > 0 and step["mfu_of_measured_matmul_peak"] > 0
    # transformers ran beside ours, or the record says why not (the 3.12 line has no torch)
    assert step["torch_step_time_s"] or "torch" in step["skipped"]
    # The traced steps: on CPU no device track, which the summary says; the trace is packed.
    assert step["profile"]["steps"] == 2 and step["profile"]["devices"] == {}
    assert "no device" in step["profile"]["note"] and step["profile"]["host"]["dispatches"] >= 2
    assert (out / "traces" / step["profile"]["trace"]).stat().st_size == step["profile"][
        "trace_bytes"
    ]
    attention = json.loads((out / "attention.json").read_text())
    assert {r["impl"] for r in attention["attention"]} == {"pallas", "xla"}
    if torch_here:
        assert json.loads((out / "generate.json").read_text())["batches"]


def test_only_torch_compile_failures_fall_back_to_eager():
    """bench/train_step.py times eager torch when torch.compile fails, but an error of anything
    else (our shapes, memory) must propagate: told apart by where it was raised."""
    probe = (
        "import sys; sys.argv = ['train_step']; sys.path.insert(0, 'bench')\n"
        "import train_step\n"
        "def raised(filename, error):\n"
        "    try:\n"
        "        exec(compile(f'raise {error}', filename, 'exec'))\n"
        "    except Exception as e:\n"
        "        return train_step._raised_by_torch_compile(e)\n"
        "print(raised('/site-packages/torch/_inductor/codegen.py', 'AssertionError()'),\n"
        "      raised('/site-packages/torch/_dynamo/eval_frame.py', 'RuntimeError()'),\n"
        "      raised('/site-packages/torch/nn/functional.py', 'RuntimeError()'),\n"
        "      raised('/repo/bench/train_step.py', 'AssertionError()'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False", "False"]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite_record():
    return _bench_module("suite_record")


def test_the_pack_keeps_a_long_logs_tail_and_every_other_byte(tmp_path, suite_record):
    out = tmp_path / "suite"
    (out / "logs").mkdir(parents=True)
    long_log = b"".join(b"line %07d\n" % i for i in range(200_000))  # 2.4 MB
    (out / "logs" / "train_step_xla.log").write_bytes(long_log)
    (out / "attention.json").write_text('{"attention": []}')
    (out / "big.json").write_bytes(b"7" * (2 << 20))  # results are never cut
    suite_record.pack(out, tmp_path)
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(members) == {"logs/train_step_xla.log", "attention.json", "big.json"}
    assert members["big.json"] == b"7" * (2 << 20)
    kept = members["logs/train_step_xla.log"]
    cut = len(long_log) - suite_record.LOG_TAIL
    head, tail = kept.split(b"\n", 1)
    assert head == b"[suite_record: the first %d bytes of this log were left out of the pack]" % cut
    assert tail == long_log[cut:] and tail.endswith(b"line 0199999\n")


def test_a_pack_over_the_limit_leaves_the_previous_one(tmp_path, suite_record, monkeypatch):
    out = tmp_path / "suite"
    out.mkdir()
    (out / "steps.jsonl").write_text(json.dumps({"step": "device", "status": "passed"}) + "\n")
    assert suite_record.main([str(out), "0", "--pack", str(tmp_path / "dest")]) == 0
    before = (tmp_path / "dest" / "suite.tar.gz").read_bytes()
    (out / "noise.json").write_bytes(os.urandom(64 << 10))  # incompressible
    monkeypatch.setattr(suite_record, "PACK_LIMIT", 32 << 10)
    assert suite_record.main([str(out), "0", "--pack", str(tmp_path / "dest"), "--final"]) == 0
    assert (tmp_path / "dest" / "suite.tar.gz").read_bytes() == before
    summary = json.loads((tmp_path / "dest" / "summary.json").read_text())
    assert summary["passed"] and summary["results"] == ["noise.json"]  # the summary is current
    (out / "steps.jsonl").write_text(json.dumps({"step": "x", "status": "failed (exit 1)"}))
    assert suite_record.main([str(out), "0", "--final"]) == 1


def test_a_pack_over_the_limit_leaves_out_traces_first(tmp_path, suite_record, monkeypatch):
    out = tmp_path / "suite"
    (out / "traces").mkdir(parents=True)
    (out / "train_step_x.json").write_text("{}")
    (out / "traces" / "a.trace.json.gz").write_bytes(os.urandom(40 << 10))
    (out / "traces" / "b.trace.json.gz").write_bytes(os.urandom(20 << 10))
    monkeypatch.setattr(suite_record, "PACK_LIMIT", 50 << 10)
    suite_record.pack(out, tmp_path)
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert set(members) == {"train_step_x.json", "traces/b.trace.json.gz", "left_out.txt"}
    assert members["left_out.txt"] == f"traces/a.trace.json.gz ({40 << 10} bytes)\n".encode()


def _gpu_like_trace(with_streams: bool) -> list[dict]:
    """A device with two CUDA streams (or, without, an `XLA Ops` line) and a per-program line,
    and a host dispatching twice. Times in microseconds."""
    ops = ["Stream #13(Compute)", "Stream #20(Collectives)"] if with_streams else ["XLA Ops"] * 2

    def meta(kind, pid, name, tid=0):
        return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}

    def op(name, tid, ts, dur, pid=1):
        return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}

    return [
        meta("process_name", 1, "/device:GPU:0"),
        meta("thread_name", 1, ops[0], 10),
        meta("thread_name", 1, ops[1], 11),
        meta("thread_name", 1, "XLA Modules", 12),
        meta("process_name", 2, "/host:CPU"),
        meta("thread_name", 2, "python", 1),
        op("sm90_xmma_gemm_bf16bf16_bf16f32", 10, 0, 100),
        op("cudnn_generated_fort_native_sdpa_sm90_knob_7", 10, 100, 50),
        op("loop_add_fusion", 10, 200, 10),
        op("ncclDevKernel_AllReduce_Sum_f32", 11, 120, 70),  # overlaps the attention kernel
        op("jit_train_step", 12, 0, 210),  # the whole program: not a kernel
        op("PjitFunction(train_step)", 1, -30, 5, pid=2),
        op("PjitFunction(train_step)", 1, 215, 7, pid=2),
    ]


@pytest.mark.parametrize("with_streams", [True, False], ids=["streams", "xla-ops-line"])
def test_trace_summary_counts_overlapping_kernels_once(tmp_path, with_streams):
    """Busy = the union of the kernel intervals [0, 190) and [200, 210) = 200 us of a 210 us span;
    the per-program line would have covered the 10 us gap."""
    summary_module = _bench_module("trace_summary")
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _gpu_like_trace(with_streams)}, f)
    summary = summary_module.summarize(summary_module.load_events(path), top=2)
    device = summary["devices"]["/device:GPU:0"]
    assert device["kernels"] == 4
    assert device["busy_ms"] == pytest.approx(0.200) and device["span_ms"] == pytest.approx(0.210)
    assert device["idle_ms"] == pytest.approx(0.010)
    assert device["idle_fraction"] == pytest.approx(10 / 210)
    want = {"matmul": 0.100, "attention": 0.050, "collective": 0.070, "fusion": 0.010}
    assert device["by_category_ms"] == pytest.approx(want)
    assert device["by_category_share"]["matmul"] == pytest.approx(100 / 230)
    top = device["top_kernels"]
    assert [k["category"] for k in top] == ["matmul", "collective"]
    assert (
        top[0]["count"] == 1
        and top[0]["mean_us"] == 100
        and top[1]["share"] == pytest.approx(70 / 230)
    )
    assert summary["host"] == {
        "dispatches": 2,
        "dispatch_ms": pytest.approx(0.012),
        "threads": ["python"],
    }
    assert "note" not in summary


@pytest.mark.parametrize(
    "name, want",
    [
        ("gemm_fusion_dot_123", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("input_reduce_fusion_4", "fusion"),
        ("_dkdv_kernel", "attention"),
        ("flash_attention_fwd", "attention"),
        ("all-gather-start", "collective"),
        ("memcpy32_post", "memory"),
        ("custom_call_thing", "other"),
    ],
)
def test_kernel_categories(name, want):
    assert _bench_module("trace_summary").category(name) == want


def _gpu_step(impl, step_s, mfu, torch_s=None):
    return {
        "platform": "gpu", "device": "NVIDIA H200", "model": {"attention_impl": impl},
        "step_time_s": step_s, "tokens_per_s": 16384 / step_s, "mfu": mfu,
        "torch_step_time_s": torch_s, "speed_ratio": torch_s / step_s if torch_s else None,
        "torch_compiled": True if torch_s else None, "matmul_peak": {"flop_per_s": 780e12},
    }  # fmt: skip


def _row(impl, mode, tflops, seq=2048, head_dim=128):
    return {"impl": impl, "mode": mode, "tflops": tflops, "seq": seq, "head_dim": head_dim,
            "causal": True}  # fmt: skip


def test_goals_are_read_off_the_best_implementation(tmp_path):
    """The best implementation by tokens/s carries the MFU goal and, against the torch time of
    the process that ran it, the transformers goal; only our kernels count for attention, at seq
    2048 and head_dim 128 only."""
    goals_module = _bench_module("goals")
    records = {
        "cudnn": _gpu_step("cudnn", 0.50, 0.51, torch_s=0.95),
        "pallas_hopper": _gpu_step("pallas_hopper", 0.45, 0.566),
        "xla": _gpu_step("xla", 0.80, 0.32),
    }
    for impl, record in records.items():
        (tmp_path / f"train_step_1_3b_{impl}.json").write_text(json.dumps(record))
    rows = [
        _row("pallas", "fwd", 350.0), _row("pallas_hopper+rope", "fwd", 420.0),
        _row("cudnn", "fwd", 600.0),  # not ours
        _row("pallas_hopper", "fwd", 900.0, head_dim=256),  # another shape
        _row("pallas_hopper", "fwd_bwd", 300.0), _row("cudnn", "fwd_bwd", 400.0),
    ]  # fmt: skip
    (tmp_path / "attention.json").write_text(json.dumps({"platform": "gpu", "attention": rows}))
    mfu, torch, forward, backward = goals_module.evaluate(tmp_path)
    assert (mfu["value"], mfu["met"], mfu["impl"]) == (0.566, True, "pallas_hopper")
    assert torch["value"] == pytest.approx(0.95 / 0.45) and torch["met"] is True
    assert torch["same_process_ratio"] == pytest.approx(1.9)
    assert torch["same_process_impl"] == "cudnn"
    assert (forward["value"], forward["met"], forward["impl"]) == (
        420.0,
        True,
        "pallas_hopper+rope",
    )
    assert forward["share_of_measured_matmul_peak"] == pytest.approx(420 / 780)
    assert backward["value"] == pytest.approx(0.75) and backward["met"] is False
    assert goals_module.line(backward).startswith("MISSED  attention fwd+bwd vs cuDNN: 0.75")


def test_goals_unknown_without_gpu_records_say_why(tmp_path):
    goals_module = _bench_module("goals")
    (tmp_path / "train_step_1_3b_xla.json").write_text(json.dumps({"platform": "cpu"}))
    goals = goals_module.evaluate(tmp_path)
    assert [g["met"] for g in goals] == [None] * 4 and all(g["why"] for g in goals)


def test_a_result_record_missing_a_field_still_leaves_a_summary(tmp_path, suite_record):
    out = tmp_path / "suite"
    out.mkdir()
    (out / "steps.jsonl").write_text(json.dumps({"step": "train_step_x", "status": "passed"}))
    (out / "train_step_1_3b_x.json").write_text(json.dumps({"platform": "gpu"}))  # no timings
    assert suite_record.main([str(out), "0", "--final"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and "KeyError" in summary["goals"][0]["error"]
