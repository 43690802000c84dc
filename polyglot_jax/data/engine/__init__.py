"""Clean, deduplicate and tokenize at corpus scale on datatrove (local, Slurm or Ray executors).

The rules are local `clean`'s (`polyglot_jax.data.clean.clean_text`, dedup.py's keys, MinHash and
`NearDuplicateIndex`, tokenize.py's shard writer), run as datatrove pipeline steps in stages that
scale out: see `steps.py` for the stages and why they keep exactly the documents local `clean`
keeps (the steps are in `steps_clean.py`, `steps_dedup.py`, `steps_output.py`), `layout.py` for
the plan and the files, `driver.py` to run them (`preprocess`).

datatrove is an optional dependency (`pip install -e '.[scale]'`): importing this package does
not import it; `preprocess` and `SlurmOptions` load the driver on first use.
"""

from typing import Any

from polyglot_jax.data.engine.layout import EXECUTORS, STAGES

__all__ = ["EXECUTORS", "STAGES", "SlurmOptions", "preprocess"]


def __getattr__(name: str) -> Any:
    if name in ("preprocess", "SlurmOptions"):
        from polyglot_jax.data.engine import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
