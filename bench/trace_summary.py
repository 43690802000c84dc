"""Where a traced step's device time went, from a `jax.profiler` Perfetto trace (Chrome JSON).

    python bench/trace_summary.py TRACE.json.gz [--top 25]

Per device (processes named `/device:...`): its kernels' busy time (the union of their
intervals, so overlapping streams count once), the span from the first kernel's start to the
last one's end, the idle time between (host work, syncs, launch gaps), the kernels' time by
category (attention, matmul, collective, memory, fusion, other: from the kernel name) and the
kernels that took longest. Kernels are the events of the device's CUDA streams (threads named
`Stream...`); a trace without such threads counts every device thread but the per-program and
per-step lines (`XLA Modules`, `Steps`, ...), which would cover the gaps. The host side: the jit
dispatches (`PjitFunction(...)` events) and their time. A CPU trace has no device: XLA:CPU runs
on host threads, and the summary says so.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from typing import Any

CATEGORIES = (  # first match wins: a "gemm_fusion" is a matmul, a cuDNN SDPA kernel attention
    ("collective", r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|collective|all[-_]to[-_]all"),
    ("attention", r"flash|fmha|attention|attn|sdpa|mha|mosaic|_dq_kernel|_dkdv_kernel|rope"),
    ("matmul", r"gemm|cublas|cutlass|xmma|nvjet|matmul|wgmma|\bdot"),
    ("memory", r"memcpy|memset|copy|transpose|dynamic[-_]update[-_]slice"),
    ("fusion", r"fusion|reduce|loop_|input_"),
)  # fmt: skip
AGGREGATE_LINES = re.compile(r"module|step|framework|source|launch", re.IGNORECASE)


def category(name: str) -> str:
    """The kernel's category from its name (CATEGORIES), else 'other'."""
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def load_events(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The trace's events: `{"traceEvents": [...]}` or a bare list, gzipped or not."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals, overlaps counted once."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def summarize(events: list[dict[str, Any]], top: int = 25) -> dict[str, Any]:
    """The summary described in the module docstring; times in milliseconds."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {}
    device_pids = {pid for pid, name in processes.items() if str(name).startswith("/device:")}
    for pid, name in sorted(processes.items(), key=lambda item: str(item[1])):
        if pid not in device_pids:
            continue
        lines = {tid: n for (p, tid), n in threads.items() if p == pid}
        streams = {tid for tid, n in lines.items() if n.lower().startswith("stream")}
        kernel_lines = streams or {tid for tid, n in lines.items() if not AGGREGATE_LINES.search(n)}
        kernels = [e for e in complete if e["pid"] == pid and e["tid"] in kernel_lines]
        if not kernels:
            devices[name] = {"kernels": 0}
            continue
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels]
        busy = union_length(intervals)
        span = max(end for _, end in intervals) - min(start for start, _ in intervals)
        by_category: dict[str, float] = collections.Counter()
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in kernels:
            by_category[category(e["name"])] += float(e["dur"])
            by_name[e["name"]].append(float(e["dur"]))
        kernel_time = sum(by_category.values())
        longest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
        devices[name] = {
            "kernel_lines": sorted(lines[t] for t in kernel_lines),
            "kernels": len(kernels),
            "busy_ms": busy / 1e3,
            "span_ms": span / 1e3,
            "idle_ms": (span - busy) / 1e3,
            "idle_fraction": (span - busy) / span if span else 0.0,
            "by_category_ms": {k: v / 1e3 for k, v in sorted(by_category.items())},
            "by_category_share": {k: v / kernel_time for k, v in sorted(by_category.items())},
            "top_kernels": [
                {
                    "name": n[:200],
                    "category": category(n),
                    "count": len(d),
                    "total_ms": sum(d) / 1e3,
                    "mean_us": sum(d) / len(d),
                    "share": sum(d) / kernel_time,
                }
                for n, d in longest
            ],
        }
    dispatches = [e for e in complete if str(e["name"]).startswith("PjitFunction")]
    summary = {
        "devices": devices,
        "host": {
            "dispatches": len(dispatches),
            "dispatch_ms": sum(float(e["dur"]) for e in dispatches) / 1e3,
            "threads": sorted({n for (p, _), n in threads.items() if p not in device_pids}),
        },
    }
    if not devices:
        summary["note"] = "no device in the trace (on CPU, XLA runs on host threads)"
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    try:
        events = load_events(args.trace)
    except (OSError, ValueError, KeyError) as e:
        print(f"trace_summary: cannot read {args.trace}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summarize(events, args.top), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
