"""The clean stage (see steps.py): each rank reads its work units, applies local `clean`'s rules
and writes its cleaned documents with their exact-dedup keys, MinHash signatures and band hashes.

    ReadInputs -> ApplyRules -> Signatures    inputs -> work/texts, docs, sigs, exact, bands
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter

from polyglot_jax.data.clean import RULES, CleanConfig, RuleStats, clean_text
from polyglot_jax.data.dedup import MinHasher, exact_key
from polyglot_jax.data.engine import layout as lay
from polyglot_jax.data.engine.steps import Stage
from polyglot_jax.data.sources import iter_records, skip_summary

_SIGN_BATCH = 1024


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [bands, n]: a hash of each band (`rows` consecutive values) of each signature.

    h <- fmix64(h * K + v) per value: for a fixed prefix, distinct values give distinct hashes."""
    n = len(signatures)
    out = np.empty((bands, n), np.uint64)
    k = np.uint64(0x9E3779B97F4A7C15)
    for b in range(bands):
        block = signatures[:, b * rows : (b + 1) * rows].astype(np.uint64)
        h = np.full(n, np.uint64(b + 1), np.uint64)
        for j in range(rows):
            h = h * k + block[:, j]
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
        out[b] = h
    return out


def _rule_stats_json(stats: RuleStats) -> dict[str, Any]:
    return {
        "counts": {rule: dict(stats.counts[rule]) for rule in RULES},
        "examples": stats.examples,
    }


def rule_stats_from_json(obj: dict[str, Any], examples: int) -> RuleStats:
    stats = RuleStats(examples)
    for rule in RULES:
        stats.counts[rule].update(obj["counts"].get(rule, {}))
        for example in obj["examples"].get(rule, []):
            stats.example(rule, example)
    return stats


class ReadInputs(Stage):
    """Reads this rank's work units with `sources.iter_records` (the reader of local `clean`):
    one Document per readable record, `metadata["gid"]` its global id. Bad records are counted
    (by the unit's part 0 only, which reads them like every part does)."""

    type = "📖 - READER"
    name = "🇰🇷 polyglot inputs"
    stage = "clean"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        self.timer = self.begin()
        plan = self.plan
        block = int(plan["block_docs"])
        clean = plan["clean"]
        max_examples = max(int(clean["examples"]), 10)
        self.tally = {"read": 0, "skipped": {}, "examples": [], "files": []}
        skipped_all: collections.Counter = collections.Counter()
        for file_index, owned, parts in self.layout.units_of(rank):
            first = 0 in owned  # part 0 counts the file's bad records
            path = plan["files"][file_index]
            stream_errors: list[str] = []
            skipped: collections.Counter = collections.Counter()
            documents = 0
            records = iter_records(
                path,
                clean["field"],
                max_record_bytes=int(clean["max_record_bytes"]),
                stream_errors=stream_errors,
            )
            for number, (text, reason) in enumerate(records, 1):
                if text is None:
                    if first:
                        self.tally["read"] += 1
                        skipped[reason] += 1
                        if len(self.tally["examples"]) < max_examples:
                            self.tally["examples"].append(
                                {"file": path, "record": number, "reason": reason}
                            )
                    continue
                index = documents
                documents += 1
                if (index // block) % parts not in owned:
                    continue
                self.tally["read"] += 1
                self.stat_update("documents")
                yield Document(
                    text=text,
                    id=f"{file_index}/{index}",
                    metadata={"gid": lay.make_gid(file_index, index)},
                )
            if first and skipped:
                error = stream_errors[0] if stream_errors else None
                self.tally["files"].append(
                    [file_index, skip_summary(path, documents, skipped, error)]
                )
                skipped_all.update(skipped)
                self.stat_update("skipped_records", value=sum(skipped.values()))
        self.tally["skipped"] = dict(sorted(skipped_all.items()))


class _RuleStatsWithReason(RuleStats):
    """RuleStats that also remembers which rule dropped the last dropped document."""

    last_drop = ""

    def count(self, rule: str, what: str, n: int = 1) -> None:
        super().count(rule, what, n)
        if what == "dropped":
            self.last_drop = rule


class ApplyRules(BaseFilter):
    """The per-document rules of local `clean` (`clean_text`: empty, short, repeats, broken_code,
    html, PII masks, newline-preserving spaces) as a datatrove filter: a dropped document's
    reason is the rule that dropped it, a kept one's text is the cleaned text."""

    name = "🧹 polyglot rules"

    def __init__(self, config: CleanConfig) -> None:
        super().__init__()
        self.config = config

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        raw = doc.text
        self.bytes_in += len(raw.encode("utf-8"))
        self.newlines_in += raw.count("\n")
        cleaned = clean_text(raw, self.config, self.rule_stats)
        if cleaned is None:
            return False, self.rule_stats.last_drop
        doc.text = cleaned
        self.newlines_out += cleaned.count("\n")
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        self.rule_stats = _RuleStatsWithReason(self.config.examples)
        self.bytes_in = self.newlines_in = self.newlines_out = 0
        yield from super().run(data, rank, world_size)


class Signatures(Stage):
    """Writes this rank's cleaned documents (work/texts, work/docs) with their exact-dedup keys
    and MinHash signatures, and each key and band hash as a sorted run (work/exact,
    work/bands/BAND) for the shuffle of the dedup stages. Memory: this rank's keys and bands."""

    name = "✍️ polyglot signatures"
    stage = "clean"

    def __init__(self, output: str, plan: dict, reader: ReadInputs, rules: ApplyRules) -> None:
        super().__init__(output, plan)
        self.reader, self.rules = reader, rules

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        layout, plan = self.layout, self.plan
        config = CleanConfig(**plan["clean"])
        minhash = plan["minhash"]
        hasher = None
        if minhash is not None:
            hasher = MinHasher(
                config.minhash_num_perm,
                config.minhash_ngram,
                config.minhash_seed,
                permutations=np.asarray(minhash["permutations"], np.uint32),
            )
        texts_path, sigs_path = layout.texts(rank), layout.sigs(rank)
        for path in (texts_path, sigs_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        texts_tmp = texts_path.with_name(texts_path.name + ".tmp")
        sigs_tmp = sigs_path.with_name(sigs_path.name + ".tmp")
        docs_parts, exact_parts, band_parts = [], [], []
        offset = 0
        with open(texts_tmp, "wb") as texts_file, open(sigs_tmp, "wb") as sigs_file:

            def flush(batch: list[Document]) -> None:
                nonlocal offset
                texts = [d.text for d in batch]
                gids = np.fromiter((d.metadata["gid"] for d in batch), np.uint64, len(batch))
                lines = [
                    (json.dumps({"text": t}, ensure_ascii=False) + "\n").encode("utf-8")
                    for t in texts
                ]
                sizes = np.fromiter(map(len, lines), np.uint64, len(lines))
                ends = offset + np.cumsum(sizes, dtype=np.uint64)
                docs = np.empty(len(batch), lay.DOCS_DTYPE)
                docs["gid"], docs["end"], docs["off"] = gids, ends, ends - sizes
                docs["chars"] = np.fromiter(map(len, texts), np.uint64, len(texts))
                docs["nbytes"] = np.fromiter(
                    (len(t.encode("utf-8")) for t in texts), np.uint64, len(texts)
                )
                texts_file.write(b"".join(lines))
                offset = int(ends[-1])
                docs_parts.append(docs)
                if config.exact_dedup:
                    keys = np.frombuffer(b"".join(map(exact_key, texts)), ">u8").reshape(-1, 2)
                    rows = np.empty(len(batch), lay.EXACT_DTYPE)
                    rows["hi"], rows["lo"], rows["gid"] = keys[:, 0], keys[:, 1], gids
                    exact_parts.append(rows)
                if hasher is not None:
                    signatures = hasher.signatures(texts)
                    sigs_file.write(np.ascontiguousarray(signatures, "<u4").tobytes())
                    band_parts.append(
                        (band_hashes(signatures, minhash["bands"], minhash["rows"]), gids)
                    )

            batch: list[Document] = []
            for doc in data:
                batch.append(doc)
                if len(batch) == _SIGN_BATCH:
                    with self.track_time("batch"):
                        flush(batch)
                    batch = []
            if batch:
                flush(batch)
        docs = np.concatenate(docs_parts) if docs_parts else np.empty(0, lay.DOCS_DTYPE)
        if len(docs) > 1 and not (docs["gid"][1:] > docs["gid"][:-1]).all():
            raise AssertionError(f"rank {rank}: documents not in input order (a plan bug)")
        if config.exact_dedup:
            exact = np.concatenate(exact_parts) if exact_parts else np.empty(0, lay.EXACT_DTYPE)
            exact = exact[np.lexsort((exact["gid"], exact["lo"], exact["hi"]))]
            lay.save_array(layout.exact(rank), exact)
            del exact, exact_parts
        if hasher is not None:
            for b in range(minhash["bands"]):
                rows = np.empty(len(docs), lay.BAND_DTYPE)
                if band_parts:
                    rows["h"] = np.concatenate([h[b] for h, _ in band_parts])
                    rows["gid"] = np.concatenate([g for _, g in band_parts])
                    rows["row"] = np.arange(len(docs), dtype=np.uint64)
                rows = rows[np.lexsort((rows["gid"], rows["h"]))]
                lay.save_array(layout.band(b, rank), rows)
        lay.save_array(layout.docs(rank), docs)
        os.replace(sigs_tmp, sigs_path)
        os.replace(texts_tmp, texts_path)
        rules = self.rules
        self.finish(
            rank,
            self.reader.timer,
            {
                "read": self.reader.tally["read"],
                "skipped": self.reader.tally["skipped"],
                "skipped_examples": self.reader.tally["examples"],
                "bad_files": self.reader.tally["files"],
                "cleaned": len(docs),
                "bytes_in": rules.bytes_in,
                "bytes_cleaned": int(docs["nbytes"].sum()),
                "newlines_in": rules.newlines_in,
                "newlines_cleaned": rules.newlines_out,
                "rules": _rule_stats_json(rules.rule_stats),
            },
        )
        return
        yield  # a generator, as datatrove expects
