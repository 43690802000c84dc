"""The cleaning pipeline behind `polyglot-jax clean`: rules, parallel driver, shards and report.

Per document, in this order (each rule switchable in `CleanConfig`):
  empty -> short -> repeats -> broken_code -> html -> pii_rrn -> pii_acc -> pii_tel -> spaces
and then, across all inputs, exact_dedup -> minhash (near duplicates). Every rule only shortens a
text, so `short` runs first on the raw length and again at the end; a document that becomes empty
on the way is counted under `empty`. Repeats come before broken_code so that `;;;;;;;;` or a run
of backticks counts as a repeat, not as code; PII masking comes after repeat capping (the masks
would otherwise be capped as repeated words) and after HTML stripping (numbers split by tags).

Parallelism: the parent process streams the inputs in order (`sources.iter_records`) and hands
batches of documents to `workers` processes, which clean them and compute their dedup key and
MinHash signature. Results come back in input order; the parent alone holds the dedup indexes
(so the first occurrence across all inputs is the one kept) and writes the shards. At most
`2 * workers` batches are in flight, so memory is bounded apart from the dedup indexes. This
splits a single large input as well as many small ones. An input with bad records (truncated
`.gz`/`.zst`, binary junk, broken JSON lines) gets one warning line on stderr, from the parent,
naming the file and what was wrong; report.json counts them by reason.

Output: `DIR/part-00000.jsonl`, ... (one `{"text": ...}` object per line, `shard_docs` per shard)
and `DIR/report.json`, written into a temporary sibling directory renamed into place at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
from absl import logging

from polyglot_jax.data.dedup import ExactIndex, MinHasher, NearDuplicateIndex, exact_key
from polyglot_jax.data.markup import code_share, strip_html
from polyglot_jax.data.pii import mask_pii
from polyglot_jax.data.repetition import cap_repeats
from polyglot_jax.data.sources import (
    MAX_RECORD_BYTES,
    iter_records,
    list_input_files,
    skip_summary,
)
from polyglot_jax.data.whitespace import normalize_spaces
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.output_dir import check_output, staged

RULES = (
    "empty",
    "short",
    "repeats",
    "broken_code",
    "html",
    "pii_rrn",
    "pii_acc",
    "pii_tel",
    "spaces",
    "exact_dedup",
    "minhash",
)
_PII_RULES = {"pii_rrn": "rrn", "pii_acc": "acc", "pii_tel": "tel"}
_BATCH_DOCS = 512
_SNIPPET_CHARS = 160


def _option(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """Every switch and parameter of the pipeline; the `clean` CLI has one flag per field."""

    field: str = _option("text", "JSON field holding the text in .jsonl inputs")
    workers: int = _option(1, "worker processes (0: one per CPU core)")
    shard_docs: int = _option(100_000, "documents per output shard")
    max_record_bytes: int = _option(MAX_RECORD_BYTES, "longer input lines/blocks are skipped")
    examples: int = _option(3, "examples per rule kept in report.json")

    empty: bool = _option(True, "drop documents that are (or become) empty")
    broken_code: bool = _option(True, "drop documents that are mostly HTML/Markdown/JS/CSS")
    max_code_share: float = _option(0.5, "broken_code: drop above this share of code characters")
    html: bool = _option(True, "strip leftover HTML tags and decode entities")
    repeats: bool = _option(
        True, "cap repeated characters/units/words, drop docs dominated by them"
    )
    max_char_repeat: int = _option(3, "repeats: keep at most this many of a repeated character")
    max_unit_repeat: int = _option(3, "repeats: keep at most this many of a repeated 2-4 char unit")
    max_word_repeat: int = _option(3, "repeats: keep at most this many of a repeated word")
    max_repeat_share: float = _option(
        0.5, "repeats: drop when capping removes more than this share"
    )
    pii_rrn: bool = _option(True, "mask resident registration numbers as <|rrn|>")
    pii_acc: bool = _option(True, "mask bank account numbers as <|acc|>")
    pii_tel: bool = _option(True, "mask phone numbers as <|tel|>")
    spaces: bool = _option(True, "collapse spaces/tabs, trim lines; newlines are kept")
    max_blank_lines: int = _option(1, "spaces: at most this many blank lines in a row")
    short: bool = _option(True, "drop documents shorter than min_chars")
    min_chars: int = _option(10, "short: minimum length in characters after cleaning")
    exact_dedup: bool = _option(True, "drop exact duplicates (normalised text) across all inputs")
    minhash: bool = _option(True, "drop near duplicates (MinHash-LSH) across all inputs")
    minhash_threshold: float = _option(0.8, "minhash: Jaccard similarity that counts as duplicate")
    minhash_num_perm: int = _option(128, "minhash: permutations per signature")
    minhash_ngram: int = _option(5, "minhash: character n-gram length of the shingles")
    minhash_seed: int = _option(1, "minhash: seed of the permutations")

    def validate(self) -> None:
        """ConfigError naming the first field out of range."""
        checks = [
            ("field", bool(self.field)),
            ("workers", self.workers >= 0),
            ("shard_docs", self.shard_docs >= 1),
            ("max_record_bytes", self.max_record_bytes >= 1),
            ("examples", self.examples >= 0),
            ("max_code_share", 0.0 < self.max_code_share <= 1.0),
            ("max_char_repeat", self.max_char_repeat >= 1),
            ("max_unit_repeat", self.max_unit_repeat >= 1),
            ("max_word_repeat", self.max_word_repeat >= 1),
            ("max_repeat_share", 0.0 < self.max_repeat_share <= 1.0),
            ("max_blank_lines", self.max_blank_lines >= 0),
            ("min_chars", self.min_chars >= 0),
            ("minhash_threshold", 0.0 < self.minhash_threshold <= 1.0),
            ("minhash_num_perm", self.minhash_num_perm >= 2),
            ("minhash_ngram", self.minhash_ngram >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"clean config: {name}={getattr(self, name)!r} is out of range")

    def enabled(self, rule: str) -> bool:
        return bool(getattr(self, rule))


class RuleStats:
    """Per-rule counts (`dropped`, `changed`, `masked`) and a few examples; mergeable."""

    def __init__(self, examples: int) -> None:
        self.max_examples = examples
        self.counts: dict[str, collections.Counter] = {r: collections.Counter() for r in RULES}
        self.examples: dict[str, list] = {r: [] for r in RULES}

    def count(self, rule: str, what: str, n: int = 1) -> None:
        self.counts[rule][what] += n

    def wants_example(self, rule: str) -> bool:
        return len(self.examples[rule]) < self.max_examples

    def example(self, rule: str, example: Any) -> None:
        if self.wants_example(rule):
            self.examples[rule].append(example)

    def merge(self, other: RuleStats) -> None:
        for rule in RULES:
            self.counts[rule].update(other.counts[rule])
            for example in other.examples[rule]:
                self.example(rule, example)

    def to_json(self, config: CleanConfig) -> dict[str, Any]:
        out = {}
        for rule in RULES:
            entry: dict[str, Any] = {"enabled": config.enabled(rule)}
            if rule in ("html", "repeats", "spaces") or rule in _PII_RULES:
                entry["changed"] = self.counts[rule]["changed"]
            if rule in _PII_RULES:
                entry["masked"] = self.counts[rule]["masked"]
            if rule not in ("html", "spaces") and rule not in _PII_RULES:
                entry["dropped"] = self.counts[rule]["dropped"]
            entry["examples"] = self.examples[rule]
            out[rule] = entry
        return out


def _redact(text: str) -> str:
    # Examples go into report.json: never copy a PII number there, whichever rule they illustrate
    # (masked before cutting the snippet, so that no number is cut in half and left readable).
    return mask_pii(text)[0]


def _snippet(text: str, center: int = 0) -> str:
    start = max(0, center - _SNIPPET_CHARS // 2)
    piece = text[start : start + _SNIPPET_CHARS]
    return ("…" if start else "") + piece + ("…" if start + _SNIPPET_CHARS < len(text) else "")


def _change_example(before: str, after: str) -> dict[str, str]:
    before, after = _redact(before), _redact(after)
    common = zip(before, after, strict=False)
    first = next((i for i, (a, b) in enumerate(common) if a != b), min(len(before), len(after)))
    return {"before": _snippet(before, first), "after": _snippet(after, first)}


def clean_text(text: str, config: CleanConfig, stats: RuleStats | None = None) -> str | None:
    """The per-document rules of `config` applied to `text`: the cleaned text, or None if a rule
    drops the document. Counts and examples go to `stats` when given."""
    stats = stats if stats is not None else RuleStats(0)

    def drop(rule: str, example_text: str) -> None:
        stats.count(rule, "dropped")
        if stats.wants_example(rule):
            stats.example(rule, _snippet(_redact(example_text)))

    def changed(rule: str, before: str, after: str) -> None:
        stats.count(rule, "changed")
        if stats.wants_example(rule):
            stats.example(rule, _change_example(before, after))

    if config.empty and not text.strip():
        drop("empty", text)
        return None
    # Every later rule only shortens a text, so a text already too short can go now.
    if config.short and len(text) < config.min_chars:
        drop("short", text)
        return None
    if config.repeats:
        capped = cap_repeats(
            text, config.max_char_repeat, config.max_unit_repeat, config.max_word_repeat
        )
        if capped.removed_share > config.max_repeat_share:
            drop("repeats", text)
            return None
        if capped.runs:
            changed("repeats", text, capped.text)
            text = capped.text
    if config.broken_code:
        share = code_share(text)
        if share > config.max_code_share:
            drop("broken_code", text)
            return None
    if config.html:
        new, n = strip_html(text)
        if n:
            changed("html", text, new)
            text = new
    kinds = [kind for rule, kind in _PII_RULES.items() if config.enabled(rule)]
    if kinds:
        new, masked = mask_pii(text, kinds)
        for rule, kind in _PII_RULES.items():
            if masked.get(kind):
                stats.count(rule, "changed")
                stats.count(rule, "masked", masked[kind])
                if stats.wants_example(rule):
                    stats.example(rule, _snippet(new, new.find(f"<|{kind}|>")))
        text = new
    if config.spaces:
        new = normalize_spaces(text, config.max_blank_lines)
        if new != text:
            changed("spaces", text, new)
            text = new
    if config.empty and not text.strip():
        drop("empty", text)
        return None
    if config.short and len(text) < config.min_chars:
        drop("short", text)
        return None
    return text


@dataclasses.dataclass
class BatchResult:
    """What a worker sends back for one batch: kept texts in order, their exact-dedup keys and
    MinHash signatures (`uint32[kept, num_perm]`, or None when off), byte count and rule stats."""

    texts: list[str]
    keys: list[bytes] | None
    signatures: np.ndarray | None
    bytes_in: int
    stats: RuleStats


class BatchCleaner:
    """Cleans batches of documents; one per worker process (it holds the MinHasher, built from
    the parent's `permutations` when given so that workers need not import datasketch)."""

    def __init__(self, config: CleanConfig, permutations: np.ndarray | None = None) -> None:
        self.config = config
        self.minhasher = None
        if config.minhash:
            self.minhasher = MinHasher(
                config.minhash_num_perm,
                config.minhash_ngram,
                config.minhash_seed,
                permutations=permutations,
            )

    def __call__(self, texts: list[str]) -> BatchResult:
        config = self.config
        stats = RuleStats(config.examples)
        kept, bytes_in = [], 0
        for text in texts:
            bytes_in += len(text.encode("utf-8"))
            cleaned = clean_text(text, config, stats)
            if cleaned is not None:
                kept.append(cleaned)
        keys = [exact_key(t) for t in kept] if config.exact_dedup else None
        signatures = None
        if self.minhasher is not None:
            signatures = self.minhasher.signatures(kept)
        return BatchResult(kept, keys, signatures, bytes_in, stats)


_worker_cleaner: BatchCleaner | None = None


def _worker_init(config: CleanConfig, permutations: np.ndarray | None) -> None:
    global _worker_cleaner
    _worker_cleaner = BatchCleaner(config, permutations)


def _worker_clean(texts: list[str]) -> BatchResult:
    assert _worker_cleaner is not None, "worker not initialised"
    return _worker_cleaner(texts)


class _ShardWriter:
    """Writes `part-NNNNN.jsonl` files of `shard_docs` documents each into `directory`."""

    def __init__(self, directory: str, shard_docs: int) -> None:
        self.directory, self.shard_docs = directory, shard_docs
        self.shards: list[str] = []
        self.documents = 0
        self.bytes_out = 0
        self._file = None
        self._in_shard = 0

    def write(self, text: str) -> None:
        if self._file is None or self._in_shard == self.shard_docs:
            self.close()
            name = f"part-{len(self.shards):05d}.jsonl"
            self._file = open(os.path.join(self.directory, name), "w", encoding="utf-8")
            self.shards.append(name)
            self._in_shard = 0
        self._file.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self._in_shard += 1
        self.documents += 1
        self.bytes_out += len(text.encode("utf-8"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Tally:
    """Records read from the inputs, and the bad ones by reason with their positions."""

    def __init__(self, max_examples: int) -> None:
        self.read = 0
        self.skipped: collections.Counter = collections.Counter()
        self.examples: list[dict[str, Any]] = []
        self.max_examples = max_examples
        self.bad_files: list[str] = []  # one summary per input with skipped records


def _batches(
    files: Sequence[str], config: CleanConfig, tally: _Tally, progress: tqdm.tqdm
) -> Iterator[list[str]]:
    """Batches of document texts in input order; bad records are counted in `tally`, and each
    file that had any gets one warning line on stderr (from here, the parent: workers never
    read inputs)."""
    batch: list[str] = []
    for path in files:
        skipped: collections.Counter = collections.Counter()
        stream_errors: list[str] = []
        records = iter_records(
            path,
            config.field,
            max_record_bytes=config.max_record_bytes,
            stream_errors=stream_errors,
        )
        documents = 0
        for number, (text, reason) in enumerate(records, 1):
            tally.read += 1
            if text is None:
                tally.skipped[reason] += 1
                skipped[reason] += 1
                if len(tally.examples) < tally.max_examples:
                    tally.examples.append({"file": path, "record": number, "reason": reason})
                progress.update(1)
                continue
            documents += 1
            batch.append(text)
            if len(batch) == _BATCH_DOCS:
                progress.update(len(batch))
                yield batch
                batch = []
        if skipped:  # said once the bar is gone (clean_files), or as the error if nothing was read
            error = stream_errors[0] if stream_errors else None
            tally.bad_files.append(skip_summary(path, documents, skipped, error))
    if batch:
        progress.update(len(batch))
        yield batch


def _results(
    batches: Iterator[list[str]], config: CleanConfig, workers: int
) -> Iterator[BatchResult]:
    """BatchResults in input order, at most 2 * workers batches in flight."""
    cleaner = BatchCleaner(config)
    if workers == 1:
        yield from map(cleaner, batches)
        return
    permutations = cleaner.minhasher.permutations if cleaner.minhasher else None
    # spawn: no inherited locks or threads from the parent (tqdm's monitor, a host program's
    # pools). A worker that dies raises BrokenProcessPool here instead of hanging.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(config, permutations)
    ) as pool:
        pending: collections.deque = collections.deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_worker_clean, batch))
                while len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _existing_paths(specs: Sequence[str | os.PathLike]) -> list[str]:
    """The input specs that name real paths (globs are checked through the files they expand to)."""
    return [os.fspath(s) for s in specs if os.path.exists(s)]


def clean_files(
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    config: CleanConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Cleans `inputs` (files, directories or glob patterns of .txt/.jsonl[.gz|.zst]) into shards
    under `output_dir` and returns the report, also written as `output_dir/report.json`.

    InputError for a missing input or an output directory that is not empty (unless
    `overwrite`); ConfigError for a config out of range. On any error nothing is left behind.
    """
    config = config or CleanConfig()
    config.validate()
    output_dir = os.fspath(output_dir)
    files = list_input_files(inputs)
    if not files:
        raise InputError("clean: no input files given")
    check_output(output_dir, [*_existing_paths(inputs), *files], overwrite=overwrite)
    workers = config.workers or os.cpu_count() or 1
    with staged(output_dir) as tmp_dir:
        report = _run(files, os.fspath(tmp_dir), config, workers, progress)
        bad_files = report["skipped"]["files"]
        if bad_files and report["documents"]["read"] <= sum(report["skipped"]["counts"].values()):
            # Nothing readable at all is a wrong input, not a corpus that cleaned down to nothing.
            more = f" (and {len(bad_files) - 1} more such files)" if len(bad_files) > 1 else ""
            raise InputError(f"no document could be read: {bad_files[0]}{more}")
        for summary in bad_files:
            logging.warning("clean: %s", summary)
        with open(tmp_dir / "report.json", "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return report


def _run(
    files: list[str], out_dir: str, config: CleanConfig, workers: int, progress: bool
) -> dict[str, Any]:
    start = time.perf_counter()
    stats = RuleStats(config.examples)
    tally = _Tally(max(config.examples, 10))
    exact = ExactIndex() if config.exact_dedup else None
    near = None
    if config.minhash:
        try:
            near = NearDuplicateIndex(config.minhash_threshold, config.minhash_num_perm)
        except ValueError as e:  # datasketch finds no band layout for these values
            raise ConfigError(
                f"clean config: minhash_threshold={config.minhash_threshold} with "
                f"minhash_num_perm={config.minhash_num_perm}: {e}"
            ) from e
    writer = _ShardWriter(out_dir, config.shard_docs)
    bytes_in = 0
    bar = tqdm.tqdm(
        desc="clean",
        unit="doc",
        file=sys.stderr,
        disable=None if progress else True,
        mininterval=0.5,
        smoothing=0.1,
    )
    try:
        for result in _results(_batches(files, config, tally, bar), config, workers):
            stats.merge(result.stats)
            bytes_in += result.bytes_in
            for i, text in enumerate(result.texts):
                if exact is not None and not exact.add(result.keys[i]):
                    stats.count("exact_dedup", "dropped")
                    stats.example("exact_dedup", _snippet(text))
                    continue
                if near is not None and not near.add(result.signatures[i]):
                    stats.count("minhash", "dropped")
                    stats.example("minhash", _snippet(text))
                    continue
                writer.write(text)
            bar.set_postfix(kept=writer.documents, refresh=False)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start
    skipped_total = sum(tally.skipped.values())
    return {
        "inputs": files,
        "output_shards": writer.shards,
        "documents": {
            "read": tally.read,
            "skipped": skipped_total,
            "dropped": tally.read - skipped_total - writer.documents,
            "kept": writer.documents,
        },
        "bytes": {"in": bytes_in, "out": writer.bytes_out},
        "skipped": {
            "counts": dict(sorted(tally.skipped.items())),
            "examples": tally.examples,
            "files": tally.bad_files,
        },
        "rules": stats.to_json(config),
        "seconds": round(seconds, 3),
        "workers": workers,
        "docs_per_s": round(tally.read / seconds, 1) if seconds else None,
        "mb_per_s": round(bytes_in / 1e6 / seconds, 3) if seconds else None,
        "config": dataclasses.asdict(config),
    }
