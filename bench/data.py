"""The data benchmarks in one run: clean, tokenize and the grain pipeline on the NSMC reviews.

    python bench/data.py [--out bench/results/data_cpu.json]

Runs `bench/data_clean.py` (clean: documents/s and MB/s, one worker) and `bench/data_pipeline.py`
(tokenize: documents/s and MB/s on one core; pipeline: tokens/s on one core, shards to global
batches, both modes), each in its own process, then checks the issue's goal (the pipeline above
1M tokens/s per core) and writes one JSON with both reports.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
GOAL_TOKENS_PER_S = 1_000_000


def _run(script: str, out: pathlib.Path) -> dict:
    subprocess.run([sys.executable, str(BENCH / script), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=BENCH / "results" / "data_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clean = _run("data_clean.py", pathlib.Path(tmp) / "clean.json")
        pipeline = _run("data_pipeline.py", pathlib.Path(tmp) / "pipeline.json")
    rates = {r["mode"]: r["tokens_per_s"] for r in pipeline["pipeline"]}
    report = {
        "benchmark": "data",
        "clean": clean,
        "tokenize_and_pipeline": pipeline,
        "goal": {"pipeline_tokens_per_s_per_core": GOAL_TOKENS_PER_S, "measured": rates,
                 "met": all(rate > GOAL_TOKENS_PER_S for rate in rates.values())},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(report["goal"], indent=1))
    print(f"wrote {args.out}")
    return 0 if report["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
