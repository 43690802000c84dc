"""Write the built-in Korean sample (konlpy's corpora + NSMC reviews when present) as jsonl."""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags

from polyglot_jax.data.sample import DEFAULT_NSMC_LIMIT, builtin_corpus_texts
from polyglot_jax.errors import ConfigError

_OUT = flags.DEFINE_string("out", None, "Output .jsonl file (field `text`).")
_NSMC = flags.DEFINE_integer("nsmc_limit", DEFAULT_NSMC_LIMIT, "NSMC reviews to include (0: none).")


def main(argv):
    if not _OUT.value:
        raise ConfigError("--out is required")
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text in builtin_corpus_texts(_NSMC.value):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out)
    print(f"wrote {count} documents to {out}")
