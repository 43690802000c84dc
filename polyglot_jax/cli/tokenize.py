"""Tokenize documents into ArrayRecord shards of token blocks + manifest.json (re-runs resume)."""

from __future__ import annotations

import os
import sys

from absl import flags

from polyglot_jax.data.tokenize import DEFAULT_BLOCK_TOKENS, DEFAULT_SHARD_CHARS, tokenize_to_shards
from polyglot_jax.errors import ConfigError

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory (any HF tokenizer.json).")
_INPUT = flags.DEFINE_list("input", None, "Cleaned inputs (.jsonl/.txt[.gz|.zst], dirs, globs).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the shards and manifest.json.")
_FIELD = flags.DEFINE_string("field", "text", "JSON field holding the document in .jsonl inputs.")
_BLOCK_TOKENS = flags.DEFINE_integer(
    "block_tokens", DEFAULT_BLOCK_TOKENS, "Tokens per ArrayRecord record (whole documents)."
)
_SHARD_CHARS = flags.DEFINE_integer(
    "shard_chars", DEFAULT_SHARD_CHARS, "Characters of text per shard (the unit of work)."
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Tokenizing processes (default: the number of CPUs)."
)
_EOS_TOKEN = flags.DEFINE_string(
    "eos_token", None, "Token appended to each document (default: <|endoftext|> if in the vocab)."
)
_PROGRESS = flags.DEFINE_bool(
    "progress", None, "Show a progress bar on stderr (default: when stderr is a terminal)."
)


def main(argv: list[str]) -> int | None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    for flag in (_TOKENIZER, _INPUT, _OUTPUT):
        if not flag.value:
            raise ConfigError(f"--{flag.name} is required")
    manifest = tokenize_to_shards(
        _TOKENIZER.value,
        _INPUT.value,
        _OUTPUT.value,
        field=_FIELD.value,
        block_tokens=_BLOCK_TOKENS.value,
        shard_chars=_SHARD_CHARS.value,
        num_workers=_NUM_WORKERS.value or os.cpu_count() or 1,
        eos_token=_EOS_TOKEN.value,
        show_progress=sys.stderr.isatty() if _PROGRESS.value is None else _PROGRESS.value,
    )
    print(
        f"{_OUTPUT.value}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
        f"in {len(manifest['shards'])} shards ({manifest['token_dtype']}, eos {manifest['eos_id']})"
    )
    return 0
