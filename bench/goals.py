"""Issue #18's speed goals, read off a device suite's results: met, missed, or why not known.

    python bench/goals.py DIR        # DIR: a suite's output (unpacked suite.tar.gz)

1. training MFU: our 1.3B step at seq 2048, the best `attention_impl`, >= 55% of the datasheet
   bf16 peak (`mfu` of train_step_1_3b_IMPL.json);
2. against transformers: the same step >= 1.5x transformers' tokens/s. Measured in one process
   with the first implementation (`speed_ratio`); the best implementation's ratio uses that
   process's torch step time (same machine, same suite run);
3. attention forward, causal, seq 2048, head_dim 128, bf16: our best kernel (`pallas*` rows of
   attention.json) >= 400 TFLOP/s. The issue's figure is an H100's; the H200 has the same
   tensor cores and datasheet bf16 peak (989 TFLOP/s dense), so it stands unscaled, and the
   record gives the share of the matmul rate the same suite measured;
4. attention forward + backward at the same shape >= 0.9x cuDNN's TFLOP/s.

A goal is `met: null` with a reason when its numbers are not there (a CPU rehearsal, a step that
failed or was not run).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

MFU_GOAL, TORCH_GOAL, FORWARD_GOAL_TFLOPS, CUDNN_GOAL = 0.55, 1.5, 400.0, 0.9
SEQ, HEAD_DIM = 2048, 128


def _load(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _goal(goal: str, value: float | None, threshold: float, why: str = "", **extra) -> dict:
    return {
        "goal": goal,
        "value": value,
        "threshold": threshold,
        "met": None if value is None else value >= threshold,
        **({"why": why} if value is None else {}),
        **extra,
    }


def evaluate(out: str | pathlib.Path) -> list[dict]:
    """The four goals (module docstring) from the result files in `out`."""
    out = pathlib.Path(out)
    steps = [
        r
        for p in sorted(out.glob("train_step_1_3b_*.json"))
        if (r := _load(p)) and r.get("platform") == "gpu"
    ]
    goals = []
    if steps:
        best = max(steps, key=lambda r: r["tokens_per_s"])
        impl = best["model"]["attention_impl"]
        mfu = best.get("mfu")
        why = "" if mfu is not None else f"no datasheet peak for {best['device']!r}"
        goals.append(_goal("1.3B step MFU (datasheet bf16 peak)", mfu, MFU_GOAL, why, impl=impl))
        paired = next((r for r in steps if r.get("torch_step_time_s")), None)
        if paired is None:
            goals.append(_goal("tokens/s vs transformers", None, TORCH_GOAL, "no torch timing"))
        else:
            ratio = paired["torch_step_time_s"] / best["step_time_s"]
            goals.append(
                _goal(
                    "tokens/s vs transformers",
                    ratio,
                    TORCH_GOAL,
                    impl=impl,
                    same_process_ratio=paired["speed_ratio"],
                    same_process_impl=paired["model"]["attention_impl"],
                    torch_compiled=paired.get("torch_compiled"),
                )
            )
    else:
        why = "no GPU train_step_1_3b_*.json (a CPU rehearsal, or the step failed)"
        goals.append(_goal("1.3B step MFU (datasheet bf16 peak)", None, MFU_GOAL, why))
        goals.append(_goal("tokens/s vs transformers", None, TORCH_GOAL, why))

    attention = _load(out / "attention.json")
    rows = []
    if attention and attention.get("platform") == "gpu":
        rows = [
            r
            for r in attention.get("attention", [])
            if r.get("seq") == SEQ and r.get("head_dim") == HEAD_DIM and r.get("causal")
        ]
    why = "no GPU attention.json rows at seq 2048, head_dim 128"

    def best(mode: str, ours: bool) -> dict | None:
        pick = [
            r
            for r in rows
            if r["mode"] == mode
            and (r["impl"].startswith("pallas") if ours else r["impl"] == "cudnn")
        ]
        return max(pick, key=lambda r: r["tflops"], default=None)

    forward = best("fwd", True)
    peak = max(
        (r["matmul_peak"]["flop_per_s"] for r in steps if r.get("matmul_peak")), default=None
    )
    goals.append(
        _goal(
            "attention forward TFLOP/s",
            forward["tflops"] if forward else None,
            FORWARD_GOAL_TFLOPS,
            why,
            **({"impl": forward["impl"]} if forward else {}),
            **(
                {"share_of_measured_matmul_peak": forward["tflops"] * 1e12 / peak}
                if forward and peak
                else {}
            ),
        )
    )
    ours, cudnn = best("fwd_bwd", True), best("fwd_bwd", False)
    if ours and cudnn:
        goals.append(
            _goal(
                "attention fwd+bwd vs cuDNN",
                ours["tflops"] / cudnn["tflops"],
                CUDNN_GOAL,
                impl=ours["impl"],
                tflops=ours["tflops"],
                cudnn_tflops=cudnn["tflops"],
            )
        )
    else:
        goals.append(_goal("attention fwd+bwd vs cuDNN", None, CUDNN_GOAL, why + " for both"))
    return goals


def line(goal: dict) -> str:
    """`met|MISSED|unknown  GOAL: VALUE (goal THRESHOLD)`, the value or why it is unknown."""
    state = {True: "met", False: "MISSED", None: "unknown"}[goal["met"]]
    value = f"{goal['value']:.3g}" if goal["value"] is not None else goal.get("why", "")
    return f"{state:7} {goal['goal']}: {value} (goal {goal['threshold']:g})"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not pathlib.Path(argv[0]).is_dir():
        print("usage: python bench/goals.py SUITE_OUTPUT_DIR", file=sys.stderr)
        return 2
    print("\n".join(line(goal) for goal in evaluate(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
