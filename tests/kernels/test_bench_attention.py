"""bench/attention.py --smoke runs end to end on CPU (interpret mode) and writes its JSON record."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_smoke_run_writes_results(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "attention.py"), "--smoke", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    for key in ("device", "device_kind", "jax_version", "lowering", "attention", "rope"):
        assert key in record
    assert record["lowering"] == "interpret"
    rows = {(r["impl"], r["mode"]): r for r in record["attention"]}
    hopper = ("pallas_hopper", "pallas_hopper+rope", "pallas_hopper+rope+segments")
    for impl in ("pallas", "pallas+rope", "pallas+rope+segments", "xla", "xla+rope") + hopper:
        for mode in ("fwd", "fwd_bwd"):
            row = rows[(impl, mode)]
            assert "error" not in row, row
            assert row["tflops"] > 0 and row["seq"] == 96 and row["head_dim"] == 128
    assert {r["impl"] for r in record["rope"]} == {
        "hbm_elementwise",
        "xla_jnp_rope",
        "pallas_rope",
        "pallas_rope_bwd",
    }
    assert all(r["gbps"] > 0 for r in record["rope"])
