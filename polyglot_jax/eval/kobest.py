"""KoBEST as the Polyglot-Ko report scores it: lm-evaluation-harness 0.4's `kobest_*` tasks.

Each document becomes one (context, " " + choice) request per choice; the prediction is the
choice of highest summed log-likelihood. What the harness does, step by step, and we do too:
- prompts and choices of its kobest YAMLs and utils.py (`TASKS`; COPA's double space included);
- few-shot: `n` training documents drawn by one `random.Random(1234)` shared by the documents
  in order (`rnd.sample(train, n)` per document), each rendered `text + " " + answer + "\n\n"`;
- a context's trailing spaces move to the continuation before encoding, and the continuation's
  ids are those of the whole text after the context's (`_encode_pair`);
- metrics: `acc`, macro `f1` (sklearn), and for HellaSwag `acc_norm` (log-likelihood divided by
  the choice's length in characters).
The authors' modified SentiNeg prompt is `sentineg_prompt="authors"`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random
from collections.abc import Callable, Sequence
from typing import Any

from polyglot_jax.errors import ConfigError, InputError

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
SENTINEG_PROMPTS = ("harness", "authors")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]  # what each document must hold
    text: Callable[[dict], str]
    choices: Callable[[dict], list[str]]


def _copa_text(doc: dict) -> str:
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
    return f"{doc['premise']} {connector}"


TASKS: dict[str, Task] = {
    "boolq": Task(
        "boolq",
        ("paragraph", "question", "label"),
        lambda d: f"{d['paragraph']} 질문: {d['question']} 답변: ",
        lambda d: ["아니오", "예"],
    ),
    "copa": Task(
        "copa",
        ("premise", "question", "alternative_1", "alternative_2", "label"),
        _copa_text,
        lambda d: [d["alternative_1"], d["alternative_2"]],
    ),
    "hellaswag": Task(
        "hellaswag",
        ("context", "ending_1", "ending_2", "ending_3", "ending_4", "label"),
        lambda d: f"문장: {d['context']}",
        lambda d: [d[f"ending_{i}"] for i in range(1, 5)],
    ),
    "sentineg": Task(
        "sentineg",
        ("sentence", "label"),
        lambda d: f"문장: {d['sentence']} 긍부정:",
        lambda d: ["부정", "긍정"],
    ),
    "wic": Task(
        "wic",
        ("word", "context_1", "context_2", "label"),
        lambda d: (
            f"문장1: {d['context_1']} 문장2: {d['context_2']} 두 문장에서 {d['word']}가 같은 뜻으로 "
            "쓰였나?"
        ),
        lambda d: ["아니오", "예"],
    ),
}
AUTHORS_SENTINEG = Task(
    "sentineg",
    ("sentence", "label"),
    lambda d: f"다음 문장에서 느껴지는 감정을 답하시오.\n\n문장: {d['sentence']}\n정답:",
    lambda d: ["부정", "긍정"],
)


def task(name: str, sentineg_prompt: str = "harness") -> Task:
    if name not in TASKS:
        raise ConfigError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    if sentineg_prompt not in SENTINEG_PROMPTS:
        raise ConfigError(f"--sentineg_prompt={sentineg_prompt} is not one of {SENTINEG_PROMPTS}")
    return AUTHORS_SENTINEG if name == "sentineg" and sentineg_prompt == "authors" else TASKS[name]


def read_split(data_dir: str | pathlib.Path, t: Task, split: str) -> list[dict]:
    """The documents of `data_dir/<task>/<split>.jsonl`; InputError naming file:line."""
    path = pathlib.Path(data_dir) / t.name / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path} does not exist (expected KoBEST jsonl in --data/<task>/)")
    docs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
            missing = [k for k in t.fields if not isinstance(doc, dict) or k not in doc]
            if missing:
                raise InputError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
            if not isinstance(doc["label"], int) or not 0 <= doc["label"] < len(t.choices(doc)):
                raise InputError(f"{path}:{n}: label {doc['label']!r} is not a choice index")
            docs.append(doc)
    if not docs:
        raise InputError(f"{path}: holds no documents")
    return docs


def contexts(t: Task, docs: Sequence[dict], train: Sequence[dict], shots: int) -> list[str]:
    """The prompt of each document with `shots` examples, drawn as the harness draws them."""
    rnd = random.Random(FEWSHOT_SEED)
    out = []
    for doc in docs:
        examples = rnd.sample(list(train), shots) if shots else []
        prefix = "".join(f"{t.text(ex)} {t.choices(ex)[ex['label']]}\n\n" for ex in examples)
        out.append(prefix + t.text(doc))
    return out


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str):
    """(context ids, continuation ids) as the harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def score_task(
    t: Task,
    docs: Sequence[dict],
    train: Sequence[dict],
    shots: int,
    encode: Callable[[str], list[int]],
    loglikelihood: Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]],
) -> dict[str, Any]:
    """Metrics and per-document predictions of one task at one shot count."""
    from sklearn.metrics import f1_score

    requests, spans = [], []
    for doc, context in zip(docs, contexts(t, docs, train, shots), strict=True):
        start = len(requests)
        for choice in t.choices(doc):
            requests.append(encode_pair(encode, context, " " + choice))
        spans.append((start, len(requests)))
    scores = [ll for ll, _ in loglikelihood(requests)]
    predictions, golds, norm_hits = [], [], []
    for doc, (a, b) in zip(docs, spans, strict=True):
        lls = scores[a:b]
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))  # first maximum, as argmax
        lengths = [len(c) for c in t.choices(doc)]
        normed = [ll / n for ll, n in zip(lls, lengths, strict=True)]
        norm_pred = max(range(len(normed)), key=lambda i: (normed[i], -i))
        predictions.append({"pred": pred, "gold": doc["label"], "loglikelihoods": lls})
        golds.append(doc["label"])
        norm_hits.append(norm_pred == doc["label"])
    preds = [p["pred"] for p in predictions]
    metrics = {
        "acc": sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds),
        "f1": float(f1_score(golds, preds, average="macro")),
        "documents": len(golds),
    }
    if t.name == "hellaswag":
        metrics["acc_norm"] = sum(norm_hits) / len(norm_hits)
    return {"metrics": metrics, "predictions": predictions}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Macro F1 by task (rows) and shot count (columns), like the report's Tables 3-5."""
    shots = sorted({int(s) for per_task in results.values() for s in per_task})
    lines = [
        "| task | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for name, per_task in results.items():
        cells = [f"{per_task[str(s)]['f1']:.4f}" if str(s) in per_task else "" for s in shots]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
