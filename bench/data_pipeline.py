"""Data throughput on NSMC, one core: tokenize (documents/s, MB/s) and the grain pipeline
(tokens/s from ArrayRecord shards to global batches), saved as JSON.

    python bench/data_pipeline.py --out=bench/results/data_pipeline_cpu.json

Tokenizing runs in this process with HF tokenizers' own thread pool off (TOKENIZERS_PARALLELISM
=false), so the rates are per core. The pipeline runs without its prefetch thread, one batch after
another, and each batch is turned into `jax.Array`s on a one-device mesh (`train.make_global_batch`).
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: one core
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py)

from polyglot_jax.data.pipeline import default_data_config, make_pipeline  # noqa: E402
from polyglot_jax.data.sources import iter_texts  # noqa: E402
from polyglot_jax.data.tokenize import tokenize_to_shards  # noqa: E402
from polyglot_jax.train import make_global_batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _versions() -> dict[str, str]:
    names = ("jax", "jaxlib", "grain", "array_record", "tokenizers", "numpy")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _device() -> dict:
    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def bench_tokenize(tokenizer: Path, nsmc: Path, out_dir: Path) -> dict:
    text_bytes = sum(len(t.encode("utf-8")) for t in iter_texts(nsmc))
    start = time.perf_counter()
    manifest = tokenize_to_shards(tokenizer, [nsmc], out_dir, num_workers=1, show_progress=False)
    seconds = time.perf_counter() - start
    return {
        "documents": manifest["documents"],
        "tokens": manifest["tokens"],
        "text_megabytes": text_bytes / 1e6,
        "seconds": seconds,
        "documents_per_s": manifest["documents"] / seconds,
        "megabytes_per_s": text_bytes / 1e6 / seconds,
        "tokens_per_s": manifest["tokens"] / seconds,
        "shards": len(manifest["shards"]),
        "records": manifest["records"],
        "note": "one process, one thread; includes reading the .jsonl.gz and writing ArrayRecord",
    }


def bench_pipeline(shards: Path, mode: str, seq_len: int, batch: int, batches: int) -> dict:
    config = default_data_config()
    config.shards = (str(shards),)
    config.mode = mode
    config.prefetch = 0
    it = make_pipeline(
        config, seq_len=seq_len, global_batch_size=batch, process_index=0, process_count=1
    )
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    jax.block_until_ready(make_global_batch(next(it).batch, sharding))  # warm-up (first window)
    tokens = real = 0
    start = time.perf_counter()
    for _ in range(batches):
        local = next(it)
        rows = local.batch
        jax.block_until_ready(make_global_batch(rows, sharding))
        tokens += rows.tokens.size
        real += int((rows.segment_ids != 0).sum()) if mode == "packed" else rows.tokens.size
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "seq_len": seq_len,
        "global_batch": batch,
        "batches": batches,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "non_padding_tokens_per_s": real / seconds,
        "padding_share": 1 - real / tokens,
        "epoch_reached": float(local.epoch),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench/results/data_pipeline_cpu.json"))
    parser.add_argument("--nsmc", default=str(SHARED / "nsmc/reviews.jsonl.gz"))
    parser.add_argument(
        "--tokenizer", default=str(SHARED / "polyglot-ko-mbbpe-2022"), help="HF tokenizer dir"
    )
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=256, help="timed batches per mode")
    args = parser.parse_args()
    nsmc, tokenizer = Path(args.nsmc), Path(args.tokenizer)
    for path in (nsmc, tokenizer):
        if not path.exists():
            print(f"missing {path} (NSMC and the released tokenizer live in ../shared/data)")
            return 2
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        print("tokenizing NSMC (one core)...", flush=True)
        tokenize = bench_tokenize(tokenizer, nsmc, work / "tokens")
        print(json.dumps(tokenize, indent=1), flush=True)
        pipeline = []
        for mode in ("concat", "packed"):
            result = bench_pipeline(work / "tokens", mode, args.seq_len, args.batch, args.batches)
            print(json.dumps(result, indent=1), flush=True)
            pipeline.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "data_pipeline",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device(),
        "versions": _versions(),
        "corpus": str(nsmc),
        "tokenizer": str(tokenizer),
        "tokenize": tokenize,
        "pipeline": pipeline,
        "pipeline_note": "one thread, no prefetch; shards -> shuffled records -> rows -> "
        "batches -> jax.Array (make_global_batch, one CPU device)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
