"""Throughput of `polyglot-jax clean` on the NSMC reviews with one worker (documents/s, MB/s).

    python bench/data_clean.py [--limit N] [--workers 1] [--out bench/results/data_clean_cpu.json]

Runs the whole pipeline (gzip reading, every rule, exact and MinHash dedup, shard writing) into a
temporary directory, then times the main per-document stages alone on the first 50k reviews.
MB are millions of UTF-8 bytes of input text. Skips (exit 0, with a message) when the workplace
data at ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from importlib import metadata

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from machine import cpu_model  # noqa: E402  (bench/machine.py)

from polyglot_jax.data.clean import CleanConfig, clean_files, clean_text  # noqa: E402
from polyglot_jax.data.dedup import MinHasher, NearDuplicateIndex, exact_key  # noqa: E402

MinHasher()  # imports datasketch (and scipy, ~1 s) now, outside the timed region

NSMC = REPO.parent / "shared" / "data" / "nsmc" / "reviews.jsonl.gz"
_STAGE_DOCS = 50_000


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("numpy", "datasketch", "zstandard", "polyglot_jax"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _stage_timings(path: pathlib.Path, docs: int) -> dict[str, float]:
    """Microseconds per document of each stage alone, one process."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, docs)]
    config = CleanConfig()
    timings = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round((time.perf_counter() - start) / len(texts) * 1e6, 2)
        return result

    cleaned = timed("rules_us_per_doc", lambda: [clean_text(t, config) for t in texts])
    kept = [t for t in cleaned if t is not None]
    timed("exact_key_us_per_doc", lambda: [exact_key(t) for t in kept])
    hasher = MinHasher()
    signatures = timed("minhash_us_per_doc", lambda: hasher.signatures(kept))
    index = NearDuplicateIndex()
    timed("lsh_index_us_per_doc", lambda: [index.add(s) for s in signatures])
    return timings


def bench_clean(path: pathlib.Path, limit: int | None, workers: int = 1) -> dict:
    """Cleans the first `limit` reviews of `path` (all when None) and returns the numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        source = path
        if limit is not None:
            source = pathlib.Path(tmp) / "input.jsonl"
            with gzip.open(path, "rb") as f, open(source, "wb") as g:
                g.writelines(itertools.islice(f, limit))
        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        report = clean_files([source], pathlib.Path(tmp) / "out", CleanConfig(workers=workers))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    docs = report["documents"]["read"]
    megabytes = report["bytes"]["in"] / 1e6
    return {
        "benchmark": "clean",
        "device": "cpu",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "input": str(path.relative_to(REPO.parent))
        if path.is_relative_to(REPO.parent)
        else str(path),
        "limit": limit,
        "workers": workers,
        "documents": docs,
        "megabytes": round(megabytes, 3),
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 4),
        "docs_per_s_per_worker": round(docs / seconds / workers, 1),
        "mb_per_s_per_worker": round(megabytes / seconds / workers, 4),
        # The machine may be shared: the load average, and with one worker the rate per CPU
        # second of this process, which contention from other processes does not lower.
        "load_average_before": round(load_before, 2),
        "cpu_seconds_main_process": round(cpu_seconds, 3),
        "docs_per_cpu_s": round(docs / cpu_seconds, 1) if workers == 1 else None,
        "mb_per_cpu_s": round(megabytes / cpu_seconds, 4) if workers == 1 else None,
        "stages_first_50k": _stage_timings(path, min(limit or _STAGE_DOCS, _STAGE_DOCS)),
        "counts": {
            "documents": report["documents"],
            "skipped": report["skipped"]["counts"],
            "rules": {
                rule: {k: v for k, v in entry.items() if k != "examples"}
                for rule, entry in report["rules"].items()
            },
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N reviews (default: all)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    if not NSMC.is_file():
        print(f"skipped: {NSMC} not present (only inside the polyglot_jax workplace)")
        return 0
    result = bench_clean(NSMC, args.limit, args.workers)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
