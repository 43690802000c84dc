"""The tokenize job: documents -> ArrayRecord shards of token blocks + `manifest.json`.

The format it writes (records, shard files, the manifest) is described and read in `records.py`.

Records are large on purpose (per-record cost dominates reading): a record is a run of whole
documents of one shard, each followed by eos, up to `block_tokens` tokens. A document longer than a
block is cut into whole blocks and a tail that starts the next record as a continuation (no
document starts at its offset 0).

Shard k is the k-th run of input documents (in input order) whose text reaches `shard_chars`
characters, so a re-run over the same inputs re-creates the same shards and skips finished ones.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from polyglot_jax.data.records import FORMAT, MANIFEST, encode_record, shard_name, token_dtype
from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.data.tokenizer import LoadedTokenizer, load_tokenizer, tokenizer_json_path
from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.output_dir import process_alive

DEFAULT_BLOCK_TOKENS = 8192
DEFAULT_SHARD_CHARS = 16_000_000  # ~6-8 M tokens of Korean text per shard
_ENCODE_BATCH = 4096  # documents per encode_batch call: bounds the memory held in Encodings
_TMP = ".tmp-"


def block_boundaries(doc_lengths: Sequence[int], block_tokens: int) -> np.ndarray:
    """Record boundaries (int64 offsets into the shard's token stream, first 0, last the total).

    Documents (lengths include eos) are added to the current record while they fit; one that does
    not fit starts the next record; one longer than `block_tokens` fills whole records and its
    tail starts the next record."""
    bounds = [0]
    pos = fill = 0
    for n in doc_lengths:
        if fill + n <= block_tokens:
            fill += n
            pos += n
            continue
        if fill:
            bounds.append(pos)
            fill = 0
        if n > block_tokens:
            whole, tail = divmod(n, block_tokens)
            for _ in range(whole):
                pos += block_tokens
                bounds.append(pos)
            pos += tail
            fill = tail
        else:
            pos += n
            fill = n
    if fill:
        bounds.append(pos)
    return np.asarray(bounds, np.int64)


def iter_blocks(
    tokens: np.ndarray, doc_lengths: np.ndarray, block_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, starts) of each record of one shard: `tokens` is the shard's stream (documents with
    their eos, concatenated), `doc_lengths` [documents] their lengths."""
    doc_starts = np.cumsum(doc_lengths) - doc_lengths
    bounds = block_boundaries(doc_lengths.tolist(), block_tokens)
    cut = np.searchsorted(doc_starts, bounds)
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        yield tokens[lo:hi], (doc_starts[cut[k] : cut[k + 1]] - lo).astype(np.uint32)


def encode_documents(
    tokenizer: Any, texts: Sequence[str], eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [total] dtype, lengths [len(texts)] int64): each text's ids followed by `eos_id`.

    `tokenizer` is a `tokenizers.Tokenizer`."""
    parts, lengths = [], []
    for i in range(0, len(texts), _ENCODE_BATCH):
        ids = [
            e.ids
            for e in tokenizer.encode_batch_fast(
                texts[i : i + _ENCODE_BATCH], add_special_tokens=False
            )
        ]
        n = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
        ends = np.cumsum(n)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(ends[-1]) - len(ids))
        out = np.empty(int(ends[-1]), dtype)
        is_eos = np.zeros(out.size, bool)
        is_eos[ends - 1] = True
        out[is_eos] = eos_id
        out[~is_eos] = flat
        parts.append(out)
        lengths.append(n)
    if not parts:
        return np.empty(0, dtype), np.empty(0, np.int64)
    return np.concatenate(parts), np.concatenate(lengths)


def _replace_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_shard(
    path: str | os.PathLike, tokens: np.ndarray, doc_lengths: np.ndarray, block_tokens: int
) -> int:
    """Writes one shard file (via a temporary name, then rename); returns its record count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    records = 0
    try:
        for block, starts in iter_blocks(tokens, doc_lengths, block_tokens):
            writer.write(encode_record(block, starts))
            records += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    return records


def _stats_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.json"


def shard_settings(loaded: LoadedTokenizer, block_tokens: int) -> dict:
    """How a shard is made, as its stats record it (and the manifest repeats): a shard with other
    settings was made by another run."""
    return {
        "format": FORMAT,
        "tokenizer_sha256": loaded.sha256,
        "eos_id": loaded.eos_id,
        "vocab_size": loaded.vocab_size,
        "token_dtype": token_dtype(loaded.vocab_size).name,
        "block_tokens": block_tokens,
    }


def manifest_totals(settings: dict, ordered: Sequence[dict]) -> dict:
    """The manifest's settings, totals and shard list, from the shards' stats in shard order."""
    return {
        **settings,
        "documents": sum(s["documents"] for s in ordered),
        "tokens": sum(s["tokens"] for s in ordered),
        "records": sum(s["records"] for s in ordered),
        "shards": [{k: s[k] for k in ("file", "documents", "tokens", "records")} for s in ordered],
    }


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Writes `manifest.json` atomically (for corpora assembled with `write_shard` directly)."""
    _replace_json(Path(directory) / MANIFEST, manifest)


# ---------------------------------------------------------------- tokenize (multiprocess) ---

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tokenizer"] = Tokenizer.from_file(tokenizer_json)


def tokenize_shard(
    index: int, texts: list[str], chars: int, directory: str, settings: dict, tokenizer: Any = None
) -> dict:
    """Tokenizes one chunk of documents into shard `index`; returns (and writes) its stats."""
    tokenizer = tokenizer or _WORKER["tokenizer"]
    dtype = np.dtype(settings["token_dtype"])
    tokens, lengths = encode_documents(tokenizer, texts, settings["eos_id"], dtype)
    directory = Path(directory)
    records = write_shard(directory / shard_name(index), tokens, lengths, settings["block_tokens"])
    stats = {
        "file": shard_name(index),
        "documents": len(texts),
        "tokens": int(tokens.size),
        "records": records,
        "chars": chars,
        "settings": settings,
    }
    _replace_json(_stats_path(directory, index), stats)
    return stats


def _finished_stats(directory: Path, index: int, documents: int, chars: int, settings: dict):
    """The stats of shard `index` if it is finished and matches this run; InputError if it was
    made by another run (other tokenizer, settings or inputs)."""
    path = _stats_path(directory, index)
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # torn by a crash outside our rename discipline: redo it
    if stats.get("settings") != settings:
        raise InputError(
            f"{path}: shard made with other settings ({stats.get('settings')} vs {settings}); "
            "use a fresh --output"
        )
    if (stats.get("documents"), stats.get("chars")) != (documents, chars):
        raise InputError(
            f"{path}: shard made from other inputs or --shard_chars "
            f"({stats.get('documents')} documents / {stats.get('chars')} chars, now {documents} / "
            f"{chars}); use a fresh --output"
        )
    if not (directory / stats["file"]).is_file():
        return None
    return stats


def _document_chunks(
    files: Sequence[str], field: str, shard_chars: int, skipped: collections.Counter
) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    chars = 0
    for file in files:
        for text in iter_texts(file, field, skipped=skipped):
            if not text:
                skipped["empty"] += 1
                continue
            texts.append(text)
            chars += len(text)
            if chars >= shard_chars:
                yield texts, chars
                texts, chars = [], 0
    if texts:
        yield texts, chars


def tokenize_to_shards(
    tokenizer: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    field: str = "text",
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    shard_chars: int = DEFAULT_SHARD_CHARS,
    num_workers: int = 1,
    eos_token: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Tokenizes the documents of `inputs` into `output_dir` and returns the manifest.

    Each document becomes its token ids + eos (`load_tokenizer` picks the eos unless `eos_token`
    says). Shards already finished by an earlier run with the same inputs and settings are kept
    (InputError if the directory holds shards of another run). `num_workers > 1` tokenizes shards
    in that many processes, one core each.

    Temporary files (`NAME.tmp-PID`) that dead processes left in `output_dir` are removed with a
    warning; a live process's are left alone. A run that fails removes its own temporary files,
    and `output_dir` when this run created it (an interrupted one keeps its finished shards for
    the next run to resume). An I/O error (disk full, permission denied) is an OSError naming
    the file or directory."""
    import errno
    import re
    import shutil

    from absl import logging

    if block_tokens < 1:
        raise ConfigError(f"block_tokens={block_tokens} must be positive")
    if shard_chars < 1:
        raise ConfigError(f"shard_chars={shard_chars} must be positive")
    files = list_input_files(inputs)
    loaded = load_tokenizer(tokenizer, eos_token=eos_token)
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"output {directory} exists and is not a directory")
    created = None  # the topmost directory this run makes: removed again if the run fails
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"output {directory}: {parent} is a file, not a directory")
            break
        created = parent

    def remove_temporaries(warn: bool) -> None:
        """`NAME.tmp-PID` files of dead processes (and of this one: it calls this when failing)."""
        for stale in sorted(directory.glob(f"*{_TMP}*")):
            pid = stale.name.rpartition(_TMP)[2]
            if not pid.isdigit() or (int(pid) != os.getpid() and process_alive(int(pid))):
                continue  # not one of ours, or a live process's
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
            if warn:
                logging.warning("removed %s, left by an interrupted run (process %s)", stale, pid)

    def named(e: Exception) -> Exception:
        """I/O errors as OSErrors naming a path: the ArrayRecord writer raises RuntimeError with
        the system's message, and failed JSON writes carry no file name."""
        if isinstance(e, OSError) and not e.filename:
            return OSError(e.errno, e.strerror or str(e), str(directory))
        if isinstance(e, RuntimeError):
            for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS):
                if os.strerror(code) in str(e):
                    found = re.search(rf"writing (\S+?)(?:{re.escape(_TMP)}\d+)?;", str(e))
                    return OSError(code, os.strerror(code), found[1] if found else str(directory))
        return e

    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_temporaries(warn=True)
        settings = shard_settings(loaded, block_tokens)
        skipped: collections.Counter = collections.Counter()
        shards: dict[int, dict] = {}
        bar = tqdm(
            desc="tokenize", unit="doc", unit_scale=True, disable=None if show_progress else True
        )

        def done(stats: dict, index: int) -> None:
            shards[index] = stats
            bar.update(stats["documents"])

        chunks = enumerate(_document_chunks(files, field, shard_chars, skipped))
        if num_workers <= 1:
            for index, (texts, chars) in chunks:
                stats = _finished_stats(directory, index, len(texts), chars, settings)
                if stats is None:
                    stats = tokenize_shard(
                        index, texts, chars, str(directory), settings, loaded.tokenizer
                    )
                done(stats, index)
        else:
            ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX/threads run
            json_path = str(tokenizer_json_path(tokenizer))
            with contextlib.ExitStack() as stack:
                pool = None  # started at the first shard to do: a finished re-run needs none
                pending: collections.deque = collections.deque()
                for index, (texts, chars) in chunks:
                    stats = _finished_stats(directory, index, len(texts), chars, settings)
                    if stats is not None:
                        done(stats, index)
                        continue
                    if pool is None:
                        pool = stack.enter_context(
                            ctx.Pool(num_workers, initializer=_init_worker, initargs=(json_path,))
                        )
                    task = (index, texts, chars, str(directory), settings)
                    pending.append((index, pool.apply_async(tokenize_shard, task)))
                    while len(pending) >= 2 * num_workers:  # bounded: inputs may be huge
                        i, result = pending.popleft()
                        done(result.get(), i)
                while pending:
                    i, result = pending.popleft()
                    done(result.get(), i)
        bar.close()
        if not shards:
            raise InputError(f"no documents in {', '.join(map(str, files))}")
        ordered = [shards[i] for i in range(len(shards))]
        manifest = {
            **manifest_totals(settings, ordered),
            # Absolute: the tokens directory is what gets moved or copied (to a data disk, to
            # every host), usually without the tokenizer, which stays where it was made.
            "tokenizer": str(Path(loaded.path).resolve()),
            "inputs": [str(f) for f in files],
            "field": field,
            "shard_chars": shard_chars,
            "skipped": dict(sorted(skipped.items())),
        }
        _replace_json(directory / MANIFEST, manifest)
    except BaseException as e:
        if directory.is_dir():
            remove_temporaries(warn=False)  # the pool's workers have exited: theirs go too
        if created is not None and not isinstance(e, KeyboardInterrupt):
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, Exception) and (report := named(e)) is not e:
            raise report from e
        raise
    return manifest
