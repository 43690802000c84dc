"""Scaling of `polyglot-jax preprocess` (datatrove stages) on the NSMC reviews: 1 vs 2 workers,
and peak memory per worker as the corpus grows 4x.

    python bench/data_scale.py [--docs 150000] [--file_docs 25000] [--long_docs 10000]
        [--out bench/results/data_scale_cpu.json]

The corpus is the first `--docs` reviews (N) written as `.jsonl` files of `--file_docs` reviews
(the layout a large corpus has: many files, one task each; output shards of 250k characters, so
shards outnumber tasks as at scale), and the first 4N for the memory run
(NSMC holds 712,404; past that the reviews repeat with a counter appended, so they stay
distinct). Every run is the whole pipeline with the released tokenizer: clean rules, exact and
MinHash dedup across all files, tokenize to ArrayRecord shards and the manifest.

- throughput: N with tasks = files, `--workers 1` then `--workers 2` (the ratio is the scaling,
  goal >= 1.7x on 2 cores; the fastest of `--repeats` runs of each), beside local `clean` +
  `tokenize` with one worker on the same files;
- memory: N and 4N with tasks = files (so a task's shard stays the same size) on 2 workers: the
  largest peak RSS of any task of each stage (the process's VmHWM, reset at the task's start),
  and its growth above the process's RSS at that start. Goal: flat from N to 4N (`memory_flat`:
  within 10%). Every engine run merges `--merge_rows` records per round (32k, below N's 150k per
  band): a merge task's memory is bounded by that, not the corpus; with the default bound (4M
  rows, ~100 MB) a corpus this small fits in one round and its memory would grow with it;
- per-core MB/s of longer documents (`--long_docs` of 16 reviews joined by newlines, ~1.4 kB),
  one worker: reviews are 87 bytes, where per-document costs dominate.

The machine may be shared: the load average before and after each run is recorded. Skips
(exit 0) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# One thread per tokenizer everywhere: local tokenize too (tokenizers' batch encode would use
# every core, which is not the one-worker rate).
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # runnable from a checkout without installing

from machine import cpu_model  # noqa: E402  (bench/machine.py)

from polyglot_jax.data.clean import CleanConfig, clean_files  # noqa: E402
from polyglot_jax.data.engine import preprocess  # noqa: E402
from polyglot_jax.data.tokenize import tokenize_to_shards  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
NSMC = SHARED / "nsmc" / "reviews.jsonl.gz"
TOKENIZER = SHARED / "polyglot-ko-mbbpe-2022"
GOAL_RATIO = 1.7
SHARD_CHARS = 250_000  # shards >> tasks, as at scale (1.2 TB / 16M chars ~ 25k shards)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("numpy", "datatrove", "datasketch", "tokenizers", "scipy", "polyglot_jax"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _reviews() -> itertools.chain:
    """NSMC review lines, then again with a counter appended (distinct texts), forever."""
    with gzip.open(NSMC, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    yield from lines
    for round_ in itertools.count(1):
        for line in lines:
            obj = json.loads(line)
            obj["text"] = f"{obj['text']} ({round_})"
            yield json.dumps(obj, ensure_ascii=False) + "\n"


def _write_corpus(directory: pathlib.Path, docs: int, file_docs: int) -> list[pathlib.Path]:
    directory.mkdir(parents=True)
    files, reviews = [], _reviews()
    for i in range(0, docs, file_docs):
        path = directory / f"reviews-{i // file_docs:04d}.jsonl"
        path.write_text("".join(itertools.islice(reviews, min(file_docs, docs - i))))
        files.append(path)
    return files


def _write_long_corpus(directory: pathlib.Path, docs: int, join: int, files: int) -> list:
    """`docs` documents of `join` consecutive reviews joined by newlines (~1.4 kB at 16: the
    per-byte rate of longer, web-like documents), in `files` files."""
    directory.mkdir(parents=True)
    reviews = (json.loads(line)["text"] for line in _reviews())
    out = []
    per_file = -(-docs // files)
    for i in range(files):
        path = directory / f"long-{i:04d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(min(per_file, docs - i * per_file)):
                text = "\n".join(itertools.islice(reviews, join))
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        out.append(path)
    return out


def _loaded(fn, *args, **kw) -> tuple[dict, float, tuple[float, float]]:
    before = os.getloadavg()[0]
    start = time.perf_counter()
    result = fn(*args, **kw)
    seconds = time.perf_counter() - start
    return result, seconds, (round(before, 2), round(os.getloadavg()[0], 2))


def _engine_run(files, out: pathlib.Path, workers: int, merge_rows: int) -> dict:
    result, seconds, load = _loaded(
        preprocess,
        files,
        out,
        CleanConfig(),
        tasks=len(files),
        workers=workers,
        tokenizer=TOKENIZER,
        shard_chars=SHARD_CHARS,
        merge_rows=merge_rows,
        progress=False,
    )
    report = result["report"]
    engine = report["engine"]
    megabytes = report["bytes"]["in"] / 1e6
    docs = report["documents"]["read"]
    stages = engine["stages"]
    shutil.rmtree(out)
    return {
        "workers": workers,
        "tasks": len(files),
        "documents": docs,
        "megabytes": round(megabytes, 3),
        "kept": report["documents"]["kept"],
        "exact_dedup_dropped": report["rules"]["exact_dedup"]["dropped"],
        "minhash_dropped": report["rules"]["minhash"]["dropped"],
        "tokens": engine["tokens"]["tokens"],
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 4),
        "stage_wall_seconds": result["stages_seconds"],
        "task_cpu_seconds": round(sum(s.get("cpu_seconds_sum", 0) for s in stages.values()), 3),
        # CPU seconds per wall second of the tasks: 1.0 when each had a core to itself; lower
        # when they waited for one (other processes on the machine).
        "cpu_share_of_tasks": {
            k: round(s["cpu_seconds_sum"] / s["seconds_sum"], 3)
            for k, s in stages.items()
            if s.get("seconds_sum")
        },
        "load_average_before_after": load,
        "peak_rss_mb_per_stage": {k: s.get("peak_rss_mb_max") for k, s in stages.items()},
        "peak_growth_mb_per_stage": {k: s.get("peak_growth_mb_max") for k, s in stages.items()},
        "stages": stages,
    }


def _local_run(files, tmp: pathlib.Path) -> dict:
    report, clean_s, load = _loaded(clean_files, files, tmp / "local", CleanConfig(workers=1))
    manifest, tok_s, _ = _loaded(
        tokenize_to_shards,
        TOKENIZER,
        [tmp / "local"],
        tmp / "local_tokens",
        shard_chars=SHARD_CHARS,
        num_workers=1,
        show_progress=False,
    )
    shutil.rmtree(tmp / "local")
    shutil.rmtree(tmp / "local_tokens")
    docs, megabytes = report["documents"]["read"], report["bytes"]["in"] / 1e6
    return {
        "workers": 1,
        "documents": docs,
        "kept": report["documents"]["kept"],
        "tokens": manifest["tokens"],
        "clean_seconds": round(clean_s, 3),
        "tokenize_seconds": round(tok_s, 3),
        "seconds": round(clean_s + tok_s, 3),
        "docs_per_s": round(docs / (clean_s + tok_s), 1),
        "mb_per_s": round(megabytes / (clean_s + tok_s), 4),
        "load_average_before_after": load,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=150_000, help="N: reviews of the base corpus")
    parser.add_argument("--file_docs", type=int, default=25_000, help="reviews per input file")
    parser.add_argument(
        "--long_docs", type=int, default=10_000, help="documents of 16 joined reviews (1 worker)"
    )
    parser.add_argument(
        "--merge_rows",
        type=int,
        default=1 << 15,
        help="preprocess --merge_rows: below N's records, so the memory run shows the bound",
    )
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs (the fastest kept)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON here")
    args = parser.parse_args()
    if not NSMC.is_file() or not TOKENIZER.is_dir():
        print(f"skipped: {SHARED} not present (only inside the polyglot_jax workplace)")
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        small = _write_corpus(tmp / "n", args.docs, args.file_docs)
        big = _write_corpus(tmp / "4n", 4 * args.docs, args.file_docs)
        # datatrove starts a process pool per stage from one forkserver, which imports the
        # stages once (~1-2 s, once per command): started here, outside the timed runs.
        warm = _write_corpus(tmp / "warm", 400, 200)
        preprocess(warm, tmp / "warm_out", tasks=2, workers=2, tokenizer=TOKENIZER, progress=False)
        long_files = _write_long_corpus(tmp / "long", args.long_docs, 16, 4)
        local = _local_run(small, tmp)
        # Throughput: the faster of --repeats runs each (a shared machine's load comes and goes).
        one = min(
            (_engine_run(small, tmp / "e1", 1, args.merge_rows) for _ in range(args.repeats)),
            key=lambda r: r["seconds"],
        )
        two = min(
            (_engine_run(small, tmp / "e2", 2, args.merge_rows) for _ in range(args.repeats)),
            key=lambda r: r["seconds"],
        )
        four = _engine_run(big, tmp / "e4n", 2, args.merge_rows)
        long_one = _engine_run(long_files, tmp / "elong", 1, args.merge_rows)
    if not (one["kept"] == two["kept"] == local["kept"]) or not (
        one["tokens"] == two["tokens"] == local["tokens"]
    ):
        raise SystemExit("the engine kept other documents than local clean: a bug")
    ratio = round(two["docs_per_s"] / one["docs_per_s"], 3)
    parallel = dict(one["stage_wall_seconds"])
    memory = {}
    for stage, peak in two["peak_rss_mb_per_stage"].items():
        big_peak = four["peak_rss_mb_per_stage"].get(stage)
        growth, big_growth = (
            two["peak_growth_mb_per_stage"][stage],
            four["peak_growth_mb_per_stage"][stage],
        )
        memory[stage] = {
            "peak_rss_mb_N": peak,
            "peak_rss_mb_4N": big_peak,
            "growth_mb_N": growth,
            "growth_mb_4N": big_growth,
            "peak_ratio_4N_over_N": round(big_peak / peak, 3) if peak and big_peak else None,
        }
    result = {
        "benchmark": "data_scale",
        "device": "cpu",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "command": " ".join(["python", "bench/data_scale.py", *sys.argv[1:]]),
        "input": "shared/data/nsmc/reviews.jsonl.gz",
        "tokenizer": "shared/data/polyglot-ko-mbbpe-2022",
        "corpus": {
            "N_documents": args.docs,
            "4N_documents": 4 * args.docs,
            "file_documents": args.file_docs,
            "files_N": len(small),
            "files_4N": len(big),
            "shard_chars": SHARD_CHARS,
            "merge_rows": args.merge_rows,
            "throughput_repeats": args.repeats,
        },
        "local_clean_plus_tokenize_1_worker": local,
        "engine_N_1_worker": one,
        "engine_N_2_workers": two,
        "engine_4N_2_workers": four,
        "engine_long_documents_1_worker": long_one,
        "per_core_mb_per_s": {
            "reviews_whole_pipeline": one["mb_per_s"],
            "reviews_clean_stage": round(one["megabytes"] / one["stage_wall_seconds"]["clean"], 3),
            "reviews_write_stage": round(one["megabytes"] / one["stage_wall_seconds"]["write"], 3),
            "long_whole_pipeline": long_one["mb_per_s"],
            "long_clean_stage": round(
                long_one["megabytes"] / long_one["stage_wall_seconds"]["clean"], 3
            ),
            "long_write_stage": round(
                long_one["megabytes"] / long_one["stage_wall_seconds"]["write"], 3
            ),
            "note": "one worker; write = read kept texts + clean parts + tokenize + shards",
        },
        "scaling": {
            "docs_per_s_1_worker": one["docs_per_s"],
            "docs_per_s_2_workers": two["docs_per_s"],
            "ratio": ratio,
            "goal": GOAL_RATIO,
            "met": ratio >= GOAL_RATIO,
            "engine_1_worker_over_local": round(one["docs_per_s"] / local["docs_per_s"], 3),
            "stage_wall_seconds_1_worker": parallel,
            "stage_wall_seconds_2_workers": two["stage_wall_seconds"],
        },
        "memory_per_worker": memory,
        # Flat: no stage's largest task peak grows by more than 10% from N to 4N.
        "memory_flat": all(
            m["peak_ratio_4N_over_N"] is not None and m["peak_ratio_4N_over_N"] <= 1.1
            for m in memory.values()
        ),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_suffix(".tmp")
        tmp_out.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
