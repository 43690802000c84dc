"""The output stages: the shard plan (cut where local `tokenize` cuts), the shards themselves
(`clean/part-K.jsonl` and, with a tokenizer, `tokens/shard-K.array_record`), and the manifest
and report that close a run.

    plan      PlanShards      work/kept -> work/shards.json
    write     WriteShards     shards.json, kept, texts -> clean/part-*, tokens/shard-*
    manifest  WriteManifest   -> tokens/manifest.json, clean/report.json
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datatrove.data import DocumentsPipeline

from polyglot_jax.data.clean import CleanConfig, RuleStats
from polyglot_jax.data.engine import layout as lay
from polyglot_jax.data.engine.layout import STAGES
from polyglot_jax.data.engine.merge import Records, merged
from polyglot_jax.data.engine.steps import Stage
from polyglot_jax.data.engine.steps_clean import rule_stats_from_json
from polyglot_jax.errors import InputError

if TYPE_CHECKING:
    from polyglot_jax.data.tokenizer import LoadedTokenizer

_MASKS = ("<|tel|>", "<|rrn|>", "<|acc|>")


# ----------------------------------------------------------------------------- stage: plan ---


class PlanShards(Stage):
    """One task: the output shards, cut exactly where local `tokenize` cuts them (shard k is the
    k-th run of non-empty kept documents, in input order, that reaches `shard_chars`), as gid
    ranges, and the rows of each rank's kept list that fall into each. Streams the kept lists
    (a chunk of each in memory), then reads them one at a time."""

    name = "🧭 shard plan"
    stage = "plan"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout = self.layout
        limit = int(self.plan["shard_chars"])
        streams = [Records(layout.kept(r)) for r in range(layout.tasks)]
        shards: list[dict[str, Any]] = []
        acc = count = empty = kept = 0
        for batch in merged(streams, "gid", ("gid",), rows=self.merge_rows):
            kept += len(batch)
            nonempty = batch["chars"] > 0
            empty += int((~nonempty).sum())
            gids = batch["gid"][nonempty]
            cum = np.cumsum(batch["chars"][nonempty].astype(np.int64)) + acc
            base, start = 0, 0
            while True:
                i = int(np.searchsorted(cum, base + limit, "left"))
                if i >= len(cum):
                    break
                shards.append(
                    {
                        "last": int(gids[i]),
                        "documents": count + i - start + 1,
                        "chars": int(cum[i] - base),
                    }
                )
                base, start, count = int(cum[i]), i + 1, 0
            if len(cum):
                acc = int(cum[-1]) - base
                count += len(cum) - start
        if count:
            shards.append({"last": None, "documents": count, "chars": acc})
        elif shards:
            shards[-1]["last"] = None  # empty documents after the last cut stay in the output
        elif kept:
            shards.append({"last": None, "documents": 0, "chars": 0})
        # Where each shard's documents are: [rank, first, end) rows of the ranks' kept lists.
        ranges = np.asarray(shard_ranges(shards), np.uint64).reshape(-1, 2)
        for shard in shards:
            shard["parts"] = []
        for r in range(layout.tasks):
            gids = lay.load_array(layout.kept(r))["gid"]
            firsts = np.searchsorted(gids, ranges[:, 0], "left")
            ends = np.searchsorted(gids, ranges[:, 1], "right")
            for k in np.flatnonzero(ends > firsts):
                shards[k]["parts"].append([r, int(firsts[k]), int(ends[k])])
        lay.write_json(layout.shard_plan, {"shards": shards, "empty": empty, "kept": kept})
        return {"kept": kept, "empty": empty, "shards": len(shards)}


# ---------------------------------------------------------------------------- stage: write ---


def worker_tokenizer(path: str, eos_token: str | None) -> LoadedTokenizer:
    """The tokenizer of `path`, loaded once per worker process (while its tokenizer.json stays the
    same file): tokenizers 0.23 keeps ~9 MB of every instance that has encoded 25k reviews after
    the instance is dropped, so loading one per task grew a worker by that much per task it ran."""
    from polyglot_jax.data.tokenizer import tokenizer_json_path

    stat = os.stat(tokenizer_json_path(path))
    return _load_tokenizer(str(path), eos_token, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _load_tokenizer(
    path: str, eos_token: str | None, _mtime_ns: int, _size: int
) -> LoadedTokenizer:
    from polyglot_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(path, eos_token=eos_token)


def shard_ranges(shards: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """[lo, hi] gid ranges (inclusive) of the planned shards."""
    out, lo = [], 0
    for shard in shards:
        hi = (1 << 64) - 1 if shard["last"] is None else int(shard["last"])
        out.append((lo, hi))
        lo = hi + 1
    return out


class WriteShards(Stage):
    """Task t writes shards t, t + T, ...: reads each shard's kept documents from the ranks that
    hold them (the rows the plan lists, in gid order), writes `clean/part-K.jsonl` as local
    `clean` writes its shards and, with a tokenizer, `tokens/shard-K.array_record` + its stats
    through tokenize.py (one thread: `TOKENIZERS_PARALLELISM=false`). Memory: one shard."""

    name = "📦 shards"
    stage = "write"

    def work(self, rank: int, world_size: int) -> dict[str, Any]:
        layout, plan = self.layout, self.plan
        shards = lay.read_json(layout.shard_plan)["shards"]
        tok = plan["tokenize"]
        loaded = settings = None
        if tok is not None:
            from polyglot_jax.data.tokenize import shard_settings

            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per task
            loaded = worker_tokenizer(tok["tokenizer"], tok["eos_token"])
            settings = shard_settings(loaded, int(tok["block_tokens"]))
            if settings["tokenizer_sha256"] != tok["sha256"]:
                raise InputError(f"{tok['tokenizer']}: tokenizer changed since the plan was made")
            layout.tokens_dir.mkdir(parents=True, exist_ok=True)
        layout.clean_dir.mkdir(parents=True, exist_ok=True)
        counts = collections.Counter()
        for k in range(rank, len(shards), world_size):
            texts = self._gather(shards[k]["parts"])
            self._write_clean(layout.clean_dir / f"part-{k:05d}.jsonl", texts)
            counts["shards"] += 1
            counts["documents"] += len(texts)
            counts["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
            counts["newlines"] += sum(t.count("\n") for t in texts)
            for mask in _MASKS:
                counts[f"masks_{mask[2:-2]}"] += sum(t.count(mask) for t in texts)
            nonempty = [t for t in texts if t]
            if nonempty and loaded is not None:
                from polyglot_jax.data.tokenize import tokenize_shard

                stats = tokenize_shard(
                    k,
                    nonempty,
                    sum(map(len, nonempty)),
                    str(layout.tokens_dir),
                    settings,
                    loaded.tokenizer,
                )
                counts["tokens"] += stats["tokens"]
                counts["records"] += stats["records"]
        return dict(counts)

    def _gather(self, parts: list[list[int]]) -> list[str]:
        """The texts of rows [first, end) of each [rank, first, end), in gid order."""
        found: list[tuple[np.ndarray, list[str]]] = []
        for r, first, end in parts:
            rows = Records(self.layout.kept(r)).read(first, end)
            base = int(rows["off"][0])
            with open(self.layout.texts(r), "rb") as f:
                f.seek(base)
                span = f.read(int(rows["end"][-1]) - base)
            offs, ends = (rows["off"] - base).tolist(), (rows["end"] - base).tolist()
            texts = [json.loads(span[o:e])["text"] for o, e in zip(offs, ends, strict=True)]
            found.append((rows["gid"], texts))
        if len(found) == 1:
            return found[0][1]
        gids = np.concatenate([g for g, _ in found]) if found else np.empty(0, np.uint64)
        texts = [t for _, ts in found for t in ts]
        return [texts[i] for i in np.argsort(gids, kind="stable")]

    @staticmethod
    def _write_clean(path: Path, texts: list[str]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


# ------------------------------------------------------------------------- stage: manifest ---


def _stage_stats(layout: lay.Layout, stage: str) -> list[dict[str, Any]]:
    directory = layout.stats(stage, 0).parent
    return (
        [lay.read_json(p) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    )


def summarize_stage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tasks, the slowest task, summed seconds, the largest peak RSS and summed counts."""
    out: dict[str, Any] = {"tasks": len(rows)}
    if not rows:
        return out
    out["seconds_max"] = max(r["seconds"] for r in rows)
    out["seconds_sum"] = round(sum(r["seconds"] for r in rows), 3)
    out["cpu_seconds_sum"] = round(sum(r.get("cpu_seconds", 0) for r in rows), 3)
    out["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in rows)
    out["peak_growth_mb_max"] = round(max(r["peak_rss_mb"] - r["rss_start_mb"] for r in rows), 1)
    skip = {"stage", "rank", "seconds", "cpu_seconds", "rss_start_mb", "peak_rss_mb", "band"}
    for key in rows[0]:
        if key in skip or not all(isinstance(r.get(key), int) for r in rows):
            continue
        if key.startswith("largest"):
            out[key] = max(r[key] for r in rows)
        else:
            out[key] = sum(r[key] for r in rows)
    return out


class WriteManifest(Stage):
    """One task: `tokens/manifest.json` (the fields and counts local `tokenize` writes) and
    `clean/report.json` (local `clean`'s report, plus every stage's summary); then removes work/
    unless the plan says to keep it."""

    name = "🧾 manifest + report"
    stage = "manifest"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        timer = self.begin()
        layout, plan = self.layout, self.plan
        if not layout.work.is_dir() and (layout.clean_dir / "report.json").is_file():
            self._remove_work()  # finished before, killed while removing work/
            return
        shard_plan = lay.read_json(layout.shard_plan)
        shards = shard_plan["shards"]
        parts = [f"part-{k:05d}.jsonl" for k in range(len(shards))]
        report = self._report(parts)
        if plan["tokenize"] is not None:
            manifest = self._manifest(shards, parts, shard_plan["empty"])
            report["engine"]["tokens"] = {
                k: manifest[k] for k in ("documents", "tokens", "records")
            } | {"shards": len(manifest["shards"])}
        lay.write_json(layout.clean_dir / "report.json", report)
        self.finish(rank, timer, {"shards": len(shards)})
        if not plan["keep_work"]:
            self._remove_work()
        return
        yield

    def _manifest(self, shards: list, parts: list[str], empty: int) -> dict[str, Any]:
        from polyglot_jax.data.records import shard_name
        from polyglot_jax.data.tokenize import manifest_totals, write_manifest

        layout, tok = self.layout, self.plan["tokenize"]
        ordered = []
        for k, shard in enumerate(shards):
            if not shard["documents"]:
                continue
            stats = lay.read_json(layout.tokens_dir / f"shard-{k:05d}.json")
            if stats["file"] != shard_name(k) or stats["documents"] != shard["documents"]:
                raise InputError(f"{layout.tokens_dir}: shard {k} does not match the shard plan")
            ordered.append(stats)
        if not ordered:
            raise InputError("no documents left to tokenize after cleaning")
        manifest = {
            **manifest_totals(ordered[0]["settings"], ordered),
            "tokenizer": str(Path(tok["path"]).resolve()),
            "inputs": [str(layout.clean_dir / p) for p in parts],
            "field": "text",
            "shard_chars": int(self.plan["shard_chars"]),
            "skipped": {"empty": empty} if empty else {},
        }
        write_manifest(layout.tokens_dir, manifest)
        return manifest

    def _report(self, parts: list[str]) -> dict[str, Any]:
        layout, plan = self.layout, self.plan
        config = CleanConfig(**plan["clean"])
        clean_rows = sorted(_stage_stats(layout, "clean"), key=lambda r: r["rank"])
        filter_rows = _stage_stats(layout, "filter")
        stats = RuleStats(config.examples)
        skipped: collections.Counter = collections.Counter()
        examples, bad_files = [], []
        for row in clean_rows:
            stats.merge(rule_stats_from_json(row["rules"], config.examples))
            skipped.update(row["skipped"])
            examples.extend(row["skipped_examples"])
            bad_files.extend(row["bad_files"])
        order = {f: i for i, f in enumerate(plan["files"])}
        examples.sort(key=lambda e: (order[e["file"]], e["record"]))
        bad_files = [line for _, line in sorted(bad_files, key=lambda entry: entry[0])]
        skipped_total = sum(skipped.values())
        read = sum(r["read"] for r in clean_rows)
        if bad_files and read <= skipped_total:  # as local clean: a wrong input, not a corpus
            more = f" (and {len(bad_files) - 1} more such files)" if len(bad_files) > 1 else ""
            raise InputError(f"no document could be read: {bad_files[0]}{more}")
        stats.counts["exact_dedup"]["dropped"] = sum(r["exact_dedup_dropped"] for r in filter_rows)
        stats.counts["minhash"]["dropped"] = sum(r["minhash_dropped"] for r in filter_rows)
        kept = sum(r["kept"] for r in filter_rows)
        bytes_in = sum(r["bytes_in"] for r in clean_rows)
        seconds = time.time() - float(plan["created"])
        stages = {s: summarize_stage(_stage_stats(layout, s)) for s in STAGES[:-1]}
        report = {
            "inputs": plan["files"],
            "output_shards": parts,
            "documents": {
                "read": read,
                "skipped": skipped_total,
                "dropped": read - skipped_total - kept,
                "kept": kept,
            },
            "bytes": {"in": bytes_in, "out": sum(r["bytes_kept"] for r in filter_rows)},
            "skipped": {
                "counts": dict(sorted(skipped.items())),
                "examples": examples[: max(config.examples, 10)],
                "files": bad_files,
            },
            "rules": stats.to_json(config),
            "seconds": round(seconds, 3),
            "workers": None,
            "docs_per_s": round(read / seconds, 1) if seconds else None,
            "mb_per_s": round(bytes_in / 1e6 / seconds, 3) if seconds else None,
            "config": plan["clean"],
            "engine": {
                "name": "datatrove",
                "version": _version("datatrove"),
                "tasks": layout.tasks,
                "newlines": {
                    "in": sum(r["newlines_in"] for r in clean_rows),
                    "after_rules": sum(r["newlines_cleaned"] for r in clean_rows),
                    "out": stages["write"].get("newlines", 0),
                },
                "stages": stages,
                "seconds_note": "wall time since the plan was made (queue waits included)",
            },
        }
        return report

    def _remove_work(self) -> None:
        work = self.layout.work
        doomed = work.with_name("work.removing")
        if work.is_dir():
            os.replace(work, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
