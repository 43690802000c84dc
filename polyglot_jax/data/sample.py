"""The built-in Korean sample: real text that needs no download, tokenized once into a cache.

Documents: konlpy's bundled corpora (the Korean constitution, `kolaw`, and ten National Assembly
bills, `kobill`; one document per file, read from the installed package folder), then, when the
workplace data is present beside the repository, the first `nsmc_limit` NSMC movie reviews from
`../shared/data/nsmc/reviews.jsonl.gz`. `prepare_builtin_sample` trains a small morpheme-aware
tokenizer on them and tokenizes them (no cleaning), which is what the tiny config trains on.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from polyglot_jax.data.records import MANIFEST
from polyglot_jax.data.sources import iter_texts
from polyglot_jax.data.tokenize import tokenize_to_shards
from polyglot_jax.data.tokenizer import train_tokenizer
from polyglot_jax.errors import InputError

KONLPY_CORPORA = ("kolaw", "kobill")
REPO_ROOT = Path(__file__).resolve().parents[2]
NSMC_PATH = REPO_ROOT.parent / "shared" / "data" / "nsmc" / "reviews.jsonl.gz"
DEFAULT_NSMC_LIMIT = 30_000
SAMPLE_VOCAB_SIZE = 4096
SAMPLE_BLOCK_TOKENS = 2048  # smaller records than usual: more of them to shuffle and share out
_VERSION = 1  # bump when what goes into the sample changes, so old caches are not reused


def konlpy_corpus_files() -> list[Path]:
    """The .txt files of konlpy's bundled corpora, sorted; InputError if konlpy is absent."""
    spec = importlib.util.find_spec("konlpy")  # no import: konlpy pulls in its Java bridge
    if spec is None or not spec.submodule_search_locations:
        raise InputError("konlpy is not installed (pip install konlpy); it ships the sample text")
    root = Path(next(iter(spec.submodule_search_locations))) / "data" / "corpus"
    files = sorted(p for name in KONLPY_CORPORA for p in (root / name).glob("*.txt"))
    if not files:
        raise InputError(f"{root}: konlpy's corpora ({', '.join(KONLPY_CORPORA)}) are missing")
    return files


def nsmc_path() -> Path | None:
    """NSMC reviews beside the repository (only inside the polyglot_jax workplace), else None."""
    return NSMC_PATH if NSMC_PATH.is_file() else None


def builtin_corpus_texts(nsmc_limit: int | None = DEFAULT_NSMC_LIMIT) -> Iterator[str]:
    """Documents of the sample: each konlpy corpus file whole, then up to `nsmc_limit` NSMC
    reviews (all with None; none when the file is absent)."""
    for file in konlpy_corpus_files():
        text = file.read_text(encoding="utf-8").strip()
        if text:
            yield text
    nsmc = nsmc_path()
    if nsmc is not None and nsmc_limit != 0:
        yield from itertools.islice(iter_texts(nsmc), nsmc_limit)


def default_cache_dir() -> Path:
    """$POLYGLOT_JAX_CACHE, else `.cache/` at the repository root of a source checkout, else
    ~/.cache/polyglot_jax."""
    if env := os.environ.get("POLYGLOT_JAX_CACHE"):
        return Path(env)
    if (REPO_ROOT / "setup.cfg").is_file() and os.access(REPO_ROOT, os.W_OK):
        return REPO_ROOT / ".cache"
    return Path.home() / ".cache" / "polyglot_jax"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialises preparation between processes of one machine (e.g. a 2-process training run)."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_builtin_sample(
    cache_dir: str | os.PathLike | None = None,
    *,
    nsmc_limit: int = DEFAULT_NSMC_LIMIT,
    vocab_size: int = SAMPLE_VOCAB_SIZE,
    show_progress: bool = False,
) -> Path:
    """Path of the tokenized built-in sample (a directory with manifest.json), made on first use.

    Writes the documents to `corpus.jsonl`, trains a `vocab_size` tokenizer on them and tokenizes
    them, under `cache_dir/builtin-...`; later calls (and concurrent ones) reuse the result."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    with_nsmc = nsmc_path() is not None and nsmc_limit != 0
    name = f"builtin-v{_VERSION}-vocab{vocab_size}-nsmc{nsmc_limit if with_nsmc else 0}"
    root = cache_dir / name
    tokens_dir = root / "tokens"
    if (tokens_dir / MANIFEST).is_file():
        return tokens_dir
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_dir / f"{name}.lock"):
        if (tokens_dir / MANIFEST).is_file():  # another process finished it while we waited
            return tokens_dir
        corpus = root / "corpus.jsonl"
        if not corpus.is_file():
            tmp = root / f"corpus.jsonl.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                for text in builtin_corpus_texts(nsmc_limit if with_nsmc else 0):
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            os.replace(tmp, corpus)
        tokenizer_dir = root / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            train_tokenizer(
                iter_texts(corpus),
                tokenizer_dir,
                vocab_size=vocab_size,
                overwrite=True,
                show_progress=show_progress,
            )
        tokenize_to_shards(
            tokenizer_dir,
            [corpus],
            tokens_dir,
            block_tokens=SAMPLE_BLOCK_TOKENS,
            show_progress=show_progress,
        )
    return tokens_dir
