"""Write the built-in Korean sample (konlpy's corpora + NSMC reviews when present) as jsonl."""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags

from polyglot_jax.data.sample import DEFAULT_NSMC_LIMIT, builtin_corpus_texts
from polyglot_jax.errors import ConfigError, InputError

_OUT = flags.DEFINE_string("out", None, "Output .jsonl file (field `text`).")
_NSMC = flags.DEFINE_integer("nsmc_limit", DEFAULT_NSMC_LIMIT, "NSMC reviews to include (0: none).")


def _check_out(out: pathlib.Path) -> None:
    """InputError for an --out that cannot become a file: a directory, or below a file."""
    if out.is_dir():
        raise InputError(f"--out={out} is a directory; give the path of a .jsonl file")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out={out}: {parent} is a file, not a directory")
            break


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    if not _OUT.value:
        raise ConfigError("--out is required")
    if _NSMC.value < 0:
        raise ConfigError(f"--nsmc_limit={_NSMC.value} must be an int >= 0")
    out = pathlib.Path(_OUT.value)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed when complete: a failed or interrupted run
    # leaves neither a half-written --out nor the temporary file.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in builtin_corpus_texts(_NSMC.value):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # Name the file asked for: a failed write (disk full) names none, a failed open the
        # temporary one.
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(out)) from e
        raise
    print(f"wrote {count} documents to {out}")
