"""Evaluate a model: `eval kobest` (lm-evaluation-harness' KoBEST) or `eval generation` (repetition).

    polyglot-jax eval kobest --hf=DIR --data=../shared/data/kobest --tasks=copa,boolq --shots=0,5
        [--limit=N] [--dtype=float32] [--sentineg_prompt=authors] --out=results.json
    polyglot-jax eval generation --workdir=RUN --prompts=prompts.jsonl [--max_new_tokens=128]
        [--out=repetition.json]

kobest writes FILE (per task and shot count: acc, macro f1, acc_norm for HellaSwag, and every
document's prediction) and FILE with `.md` (F1 by task and shots, laid out like the report's
tables). generation decodes each prompt greedily and reports seq-rep-n, rep-w, distinct-n and the
longest repeated span, per prompt and on average; prompts are jsonl (`prompt` or `prompt_ids`).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

from absl import flags

from polyglot_jax.cli import _inputs as inputs
from polyglot_jax.errors import ConfigError, InputError

WHATS = ("kobest", "generation")
TAKES_WORDS = True  # kobest | generation

_DATA = flags.DEFINE_string("data", None, "kobest: directory with <task>/{train,test}.jsonl.")
_TASKS = flags.DEFINE_list("tasks", "boolq,copa,hellaswag,sentineg,wic", "kobest: tasks to run.")
_SHOTS = flags.DEFINE_list("shots", "0", "kobest: shot counts, e.g. 0,5,10,50.")
_LIMIT = flags.DEFINE_integer("limit", None, "kobest: the first N test documents of each task.")
_SENTINEG = flags.DEFINE_enum(
    "sentineg_prompt", "harness", ["harness", "authors"], "kobest: SentiNeg's prompt."
)
_BATCH_TOKENS = flags.DEFINE_integer(
    "batch_tokens", 2048, "kobest: rows x padded length per forward pass."
)
_PROMPTS = flags.DEFINE_string("prompts", None, "generation: jsonl of prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generation: tokens per continuation.")
_OUT = flags.DEFINE_string("out", None, "Result JSON (kobest: required; generation: else stdout).")


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """`text` at `path`, whole or not at all (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _shots() -> list[int]:
    try:
        shots = [int(s) for s in _SHOTS.value]
    except ValueError:
        raise ConfigError(f"--shots={','.join(_SHOTS.value)} must be integers") from None
    if not shots or any(s < 0 for s in shots):
        raise ConfigError(f"--shots={','.join(_SHOTS.value)} must be ints >= 0")
    return shots


def kobest() -> None:
    from polyglot_jax.eval import kobest as kb
    from polyglot_jax.eval.loglikelihood import Scorer

    if not _DATA.value:
        raise ConfigError("--data is required (the KoBEST directory)")
    if not _OUT.value:
        raise ConfigError("--out is required (the result JSON)")
    if _LIMIT.value is not None and _LIMIT.value < 1:
        raise ConfigError(f"--limit={_LIMIT.value} must be a positive int")
    if _BATCH_TOKENS.value < 1:
        raise ConfigError(f"--batch_tokens={_BATCH_TOKENS.value} must be a positive int")
    shots = _shots()
    tasks = [kb.task(name, _SENTINEG.value) for name in _TASKS.value]
    out = pathlib.Path(_OUT.value)
    if out.is_dir():
        raise InputError(f"--out={out} is a directory; give a file name")
    # Every input is read before the model is loaded: a bad file fails in a second.
    data = {t.name: (kb.read_split(_DATA.value, t, "test"), None) for t in tasks}
    if max(shots) > 0:
        data = {t.name: (data[t.name][0], kb.read_split(_DATA.value, t, "train")) for t in tasks}
    inputs.check()
    cfg, params, tokenizer, mesh, rules = inputs.load()
    if tokenizer is None:
        raise ConfigError("this model has no known tokenizer (KoBEST is text)")
    scorer = Scorer(params, cfg, mesh=mesh, rules=rules, batch_tokens=_BATCH_TOKENS.value)
    results: dict = {}
    predictions: dict = {}
    for t in tasks:
        docs, train = data[t.name]
        docs = docs[: _LIMIT.value] if _LIMIT.value else docs
        for n in shots:
            print(f"kobest {t.name} {n}-shot: {len(docs)} documents", file=sys.stderr)
            scored = kb.score_task(
                t, docs, train or [], n, tokenizer.encode,
                lambda r: scorer.loglikelihood(r, progress=True),
            )  # fmt: skip
            results.setdefault(t.name, {})[str(n)] = scored["metrics"]
            predictions.setdefault(t.name, {})[str(n)] = scored["predictions"]
    report = {
        "model": inputs.describe(),
        "dtype": cfg.dtype,
        "sentineg_prompt": _SENTINEG.value,
        "results": results,
        "predictions": predictions,
    }
    table = kb.markdown_table(results)
    _write_atomically(out, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    _write_atomically(out.with_suffix(".md"), table)
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def generation() -> None:
    from polyglot_jax.eval import repetition
    from polyglot_jax.generate import Generator, Sampling

    if not _PROMPTS.value:
        raise ConfigError("--prompts is required (jsonl of prompts)")
    if _MAX_NEW.value < 1:
        raise ConfigError(f"--max_new_tokens={_MAX_NEW.value} must be a positive int")
    inputs.check()
    prompts = inputs.read_prompts_file(_PROMPTS.value)
    cfg, params, tokenizer, mesh, rules = inputs.load()
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise ConfigError("this model has no known tokenizer for text prompts: use prompt_ids")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    sampling = Sampling(max_new_tokens=_MAX_NEW.value, greedy=True)
    results = Generator(params, cfg, mesh=mesh, rules=rules).generate(ids, sampling, progress=True)
    seqs = [samples[0].ids for samples in results]
    report = {
        "model": inputs.describe(),
        "max_new_tokens": _MAX_NEW.value,
        "thresholds": repetition.THRESHOLDS,
        "summary": repetition.summary(seqs),
        "continuations": [
            {
                "ids": s,
                "text": None if tokenizer is None else tokenizer.decode(s),
                **repetition.metrics(s),
            }
            for s in seqs
        ],
    }
    text = json.dumps(report, ensure_ascii=False, indent=1) + "\n"
    if _OUT.value:
        _write_atomically(pathlib.Path(_OUT.value), text)
        print(json.dumps(report["summary"]))
    else:
        print(text, end="")


def main(argv: list[str]) -> None:
    words = argv[1:]
    if len(words) != 1 or words[0] not in WHATS:
        raise ConfigError(f"say what to evaluate: polyglot-jax eval {{{'|'.join(WHATS)}}} --flags")
    {"kobest": kobest, "generation": generation}[words[0]]()
