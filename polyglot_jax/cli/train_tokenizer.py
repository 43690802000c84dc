"""Train the morpheme-aware byte-level BPE tokenizer (MeCab-ko boundaries; loads with AutoTokenizer)."""

from __future__ import annotations

import itertools
import os

from absl import flags

from polyglot_jax.data.sources import iter_texts, list_input_files
from polyglot_jax.data.tokenizer import train_tokenizer
from polyglot_jax.errors import ConfigError

_INPUT = flags.DEFINE_list(
    "input", None, "Text inputs (.txt/.jsonl[.gz|.zst], directories, globs)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the tokenizer to.")
_VOCAB_SIZE = flags.DEFINE_integer(
    "vocab_size", 30003, "Total ids, specials included (30003 = the released Polyglot-Ko layout)."
)
_FIELD = flags.DEFINE_string("field", "text", "JSON field holding the document in .jsonl inputs.")
_MIN_FREQUENCY = flags.DEFINE_integer("min_frequency", 2, "Minimum count of a pair to be merged.")
_MAX_DOCUMENTS = flags.DEFINE_integer(
    "max_documents", None, "Train on at most this many documents (default: all)."
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Processes running MeCab (default: the number of CPUs)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing, non-empty --output.")


def main(argv: list[str]) -> int | None:
    if not _INPUT.value:
        raise ConfigError("--input is required (comma-separated files, directories or globs)")
    if not _OUTPUT.value:
        raise ConfigError("--output is required")
    if _MAX_DOCUMENTS.value is not None and _MAX_DOCUMENTS.value <= 0:
        raise ConfigError(f"--max_documents={_MAX_DOCUMENTS.value} must be positive")
    files = list_input_files(_INPUT.value)
    texts = itertools.chain.from_iterable(iter_texts(f, _FIELD.value) for f in files)
    if _MAX_DOCUMENTS.value is not None:
        texts = itertools.islice(texts, _MAX_DOCUMENTS.value)
    result = train_tokenizer(
        texts,
        _OUTPUT.value,
        vocab_size=_VOCAB_SIZE.value,
        min_frequency=_MIN_FREQUENCY.value,
        num_workers=_NUM_WORKERS.value or os.cpu_count() or 1,
        overwrite=_OVERWRITE.value,
        inputs=[*_INPUT.value, *files],
    )
    print(
        f"tokenizer: {result.path} ({result.vocab_size} ids, eos {result.eos_token}={result.eos_id})"
    )
    return 0
