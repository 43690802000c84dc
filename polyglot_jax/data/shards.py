"""Tokenized corpora on disk: ArrayRecord shards of token blocks plus `manifest.json`.

A tokenized directory holds:
- `shard-00000.array_record`, ... ArrayRecord files (`group_size:1`), one record per token block;
- `shard-00000.json`, ... the counts and settings of each finished shard (written after the shard
  file is in place, so a shard counts as finished exactly when its `.json` exists);
- `manifest.json`, written last: `documents`, `tokens` (eos included), `records`, `shards` (a list
  of `{file, documents, tokens, records}`), `tokenizer_sha256`, `eos_id`, `vocab_size`,
  `token_dtype`, `block_tokens` and what produced them (`tokenizer`: its absolute path).

Records are large on purpose (per-record cost dominates reading): a record is a run of whole
documents of one shard, each followed by eos, up to `block_tokens` tokens. A document longer than a
block is cut into whole blocks and a tail that starts the next record as a continuation (no
document starts at its offset 0). Record bytes, little-endian: uint32 header `[num_tokens,
num_starts, itemsize]`, the tokens (uint16 when the vocab fits, else uint32), then the uint32
offsets at which documents start. Those offsets are what packing needs to keep documents apart.

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

from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.data.tokenizer import load_tokenizer, tokenizer_json_path
from polyglot_jax.errors import ConfigError, InputError

FORMAT = "polyglot_jax.token_blocks/1"
MANIFEST = "manifest.json"
DEFAULT_BLOCK_TOKENS = 8192
DEFAULT_SHARD_CHARS = 16_000_000  # ~6-8 M tokens of Korean text per shard
_HEADER = np.dtype("<u4")
_ENCODE_BATCH = 4096  # documents per encode_batch call: bounds the memory held in Encodings
_TMP = ".tmp-"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_record(tokens: np.ndarray, starts: np.ndarray) -> bytes:
    """Bytes of one record: `tokens` [n] uint16|uint32, `starts` [m] document start offsets (< n)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise ValueError(f"tokens must be uint16 or uint32, got {tokens.dtype}")
    header = np.array([tokens.size, len(starts), tokens.dtype.itemsize], _HEADER)
    return header.tobytes() + tokens.tobytes() + np.asarray(starts, _HEADER).tobytes()


def decode_record(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n] uint16|uint32, starts [m] uint32) of a record written by `encode_record`."""
    n, m, itemsize = np.frombuffer(data, _HEADER, 3)
    offset = 3 * _HEADER.itemsize
    tokens = np.frombuffer(data, f"<u{itemsize}", int(n), offset)
    starts = np.frombuffer(data, _HEADER, int(m), offset + int(n) * int(itemsize))
    return tokens, starts


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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def _stats_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.json"


# ---------------------------------------------------------------- tokenize (multiprocess) ---

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tokenizer"] = Tokenizer.from_file(tokenizer_json)


def _tokenize_shard(
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

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            return True
        return True

    def remove_temporaries(warn: bool) -> None:
        """`NAME.tmp-PID` files of dead processes (and of this one: it calls this when failing)."""
        for stale in sorted(directory.glob(f"*{_TMP}*")):
            pid = stale.name.rpartition(_TMP)[2]
            if not pid.isdigit() or (int(pid) != os.getpid() and alive(int(pid))):
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
        settings = {
            "format": FORMAT,
            "tokenizer_sha256": loaded.sha256,
            "eos_id": loaded.eos_id,
            "vocab_size": loaded.vocab_size,
            "token_dtype": token_dtype(loaded.vocab_size).name,
            "block_tokens": block_tokens,
        }
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
                    stats = _tokenize_shard(
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
                    pending.append((index, pool.apply_async(_tokenize_shard, task)))
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
            **settings,
            "documents": sum(s["documents"] for s in ordered),
            "tokens": sum(s["tokens"] for s in ordered),
            "records": sum(s["records"] for s in ordered),
            "shards": [
                {k: s[k] for k in ("file", "documents", "tokens", "records")} for s in ordered
            ],
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


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Writes `manifest.json` atomically (for corpora assembled with `write_shard` directly)."""
    _replace_json(Path(directory) / MANIFEST, manifest)


_COUNTS = ("documents", "tokens", "records")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _bad_field(path: Path, field: str, value: Any, expected: str) -> InputError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{path}: field {field!r} is {shown}, expected {expected}")


def _check_manifest(path: Path, manifest: Any) -> None:
    """InputError naming `path` and the first field of the wrong type or value."""
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object but a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in (*_COUNTS, "shards", "eos_id", "token_dtype"):
        if key not in manifest:
            raise InputError(f"{path}: missing field {key!r}")
    for key in (*_COUNTS, "eos_id"):
        if not _is_int(manifest[key], 0):
            raise _bad_field(path, key, manifest[key], "a non-negative integer")
    for key in ("vocab_size", "block_tokens"):  # not read by the pipeline: checked when present
        if key in manifest and not _is_int(manifest[key], 1):
            raise _bad_field(path, key, manifest[key], "a positive integer")
    if manifest["token_dtype"] not in ("uint16", "uint32"):
        raise _bad_field(path, "token_dtype", manifest["token_dtype"], "'uint16' or 'uint32'")
    for key in ("tokenizer", "tokenizer_sha256"):
        if key in manifest and not isinstance(manifest[key], str):
            raise _bad_field(path, key, manifest[key], "a string")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise _bad_field(path, "shards", shards, "a non-empty list of shard objects")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise _bad_field(path, f"shards[{i}]", shard, "an object")
        for key in ("file", *_COUNTS):
            if key not in shard:
                raise InputError(f"{path}: missing field 'shards[{i}].{key}'")
        if not isinstance(shard["file"], str) or not shard["file"]:
            raise _bad_field(path, f"shards[{i}].file", shard["file"], "a file name")
        for key in _COUNTS:
            if not _is_int(shard[key], 0):
                raise _bad_field(path, f"shards[{i}].{key}", shard[key], "a non-negative integer")
    for key in _COUNTS:  # the pipeline sizes shares by the totals and finds records by shard
        total = sum(shard[key] for shard in shards)
        if manifest[key] != total:
            raise InputError(
                f"{path}: field {key!r} is {manifest[key]}, but its shards add up to {total}"
            )


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a tokenized directory, checked: InputError if missing, not JSON, of another
    format, with a field missing or of the wrong type, or naming a shard file that is not there."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory}: no {MANIFEST} (not a tokenized directory; run tokenize)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    _check_manifest(path, manifest)
    for shard in manifest["shards"]:
        if not (directory / shard["file"]).is_file():
            raise InputError(f"{directory / shard['file']}: shard listed in {MANIFEST} is missing")
    return manifest


def manifest_tokenizer(directory: str | os.PathLike, recorded: str | None) -> Path | None:
    """Where the tokenizer a manifest records (`recorded`) is, or None if it is not found.

    Manifests record an absolute path; older ones the path as typed, relative to where tokenize
    ran: that is tried relative to the manifest's directory first, then as given (from the
    current directory)."""
    if not recorded:
        return None
    for candidate in (Path(directory) / recorded, Path(recorded)):
        if candidate.is_dir():  # a tokenizer directory, or (as load_tokenizer takes) its file
            found = (candidate / "tokenizer.json").is_file()
        else:
            found = candidate.is_file()
        if found:
            return candidate
    return None


def _stats_name(file: str) -> str:
    return file.removesuffix(".array_record") + ".json"


def _documents(manifest: dict, k: int) -> str:
    """Shard k's documents, numbered in input order across the directory."""
    first = sum(s["documents"] for s in manifest["shards"][:k])
    return f"documents {first}-{first + manifest['shards'][k]['documents'] - 1}"


def check_shards(directory: str | os.PathLike, manifest: dict | None = None) -> None:
    """InputError naming the first shard that cannot be opened (truncated or damaged) or holds
    another number of records than `manifest.json` lists. Cheap: reads each file's index only."""
    from array_record.python.array_record_module import ArrayRecordReader

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    for k, shard in enumerate(manifest["shards"]):
        path = directory / shard["file"]
        listed = shard["records"]
        redo = f"delete it and {_stats_name(shard['file'])}, then re-run tokenize to rewrite it"
        try:
            reader = ArrayRecordReader(str(path))
            ok, count = reader.ok(), reader.num_records()
            reader.close()  # a reader that is not ok raises its error here
            reason = None
        except Exception as e:  # array_record raises RuntimeError with Riegeli's message
            ok, reason = False, str(e)
        if not ok:
            raise InputError(
                f"{path}: truncated or damaged ArrayRecord shard ({reason or 'unreadable'}); "
                f"none of its {listed} records ({_documents(manifest, k)} of {directory}) can be "
                f"read; {redo}"
            )
        if count != listed:
            lost = f"records from index {count} on" if count < listed else "its records"
            raise InputError(
                f"{path}: holds {count} records but {MANIFEST} lists {listed}, so {lost} "
                f"(among {_documents(manifest, k)} of {directory}) cannot be read as listed; "
                f"{redo}"
            )


def unreadable_record_error(
    directory: str | os.PathLike, manifest: dict, index: int, error: Exception
) -> InputError:
    """The InputError for record `index` of a directory (counted across its shards) whose read
    failed with `error`: names the shard, the record in it and the documents at stake."""
    first = 0
    for k, shard in enumerate(manifest["shards"]):
        if index < first + shard["records"]:
            return InputError(
                f"{Path(directory) / shard['file']}: record {index - first} of "
                f"{shard['records']} cannot be read ({error}); the documents in it (among "
                f"{_documents(manifest, k)} of {directory}) are lost; delete the shard and "
                f"{_stats_name(shard['file'])}, then re-run tokenize to rewrite it"
            )
        first += shard["records"]
    return InputError(f"{directory}: record {index} cannot be read ({error})")


def shard_files(directory: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Paths of the shard files of a tokenized directory, in order."""
    manifest = manifest or read_manifest(directory)
    return [str(Path(directory) / s["file"]) for s in manifest["shards"]]
