"""KoBEST scoring: metrics against a hand computation on fixed log-likelihoods, the harness's
few-shot draw and pair encoding, and `eval kobest` end to end against transformers' own
log-likelihoods of the harness's prompt text (written out here) on the real COPA file."""

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import random_hf_model, require_torch
from train_fixtures import REPO

from polyglot_jax.errors import InputError
from polyglot_jax.eval import kobest
from polyglot_jax.model import ModelConfig

torch = require_torch()


def _macro_f1(gold, pred):
    """Per-class F1 = 2 tp / (2 tp + fp + fn), averaged over the classes seen in gold or pred."""
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


def _fixed_scorer(table):
    """A loglikelihood function that answers from `table` (continuation text -> score) in order."""

    def score(requests):
        return [(table.pop(0), False) for _ in requests]

    return score


def test_metrics_from_fixed_loglikelihoods():
    t = kobest.TASKS["hellaswag"]
    docs = [
        {"context": "a", "ending_1": "x", "ending_2": "yyyy", "ending_3": "z", "ending_4": "w", "label": 1},
        {"context": "b", "ending_1": "xx", "ending_2": "y", "ending_3": "z", "ending_4": "w", "label": 0},
        {"context": "c", "ending_1": "x", "ending_2": "y", "ending_3": "z", "ending_4": "w", "label": 3},
    ]  # fmt: skip
    scores = [
        -4.0, -8.0, -9.0, -9.0,  # pred 0 (gold 1); per char: -4 -2 -9 -9 -> norm pred 1
        -3.0, -3.0, -5.0, -6.0,  # a tie: the first maximum (0) wins; per char -1.5 -3 -> norm 0
        -7.0, -6.0, -5.0, -1.0,  # pred 3
    ]  # fmt: skip
    out = kobest.score_task(t, docs, [], 0, lambda s: [ord(c) for c in s], _fixed_scorer(scores))
    preds = [p["pred"] for p in out["predictions"]]
    assert preds == [0, 0, 3]
    m = out["metrics"]
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_norm"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(_macro_f1([1, 0, 3], preds))
    assert m["documents"] == 3


def test_fewshot_draw_and_layout_as_the_harness():
    t = kobest.TASKS["boolq"]
    train = [{"paragraph": f"p{i}", "question": f"q{i}", "label": i % 2} for i in range(30)]
    docs = [{"paragraph": "P", "question": "Q", "label": 1}] * 3
    got = kobest.contexts(t, docs, train, 2)
    rnd = random.Random(1234)  # one generator, consumed by the documents in order
    for context in got:
        a, b = rnd.sample(range(30), 2)
        answer = lambda i: ["아니오", "예"][i % 2]  # noqa: E731
        want = (f"p{a} 질문: q{a} 답변:  {answer(a)}\n\np{b} 질문: q{b} 답변:  {answer(b)}\n\n"
                "P 질문: Q 답변: ")  # fmt: skip
        assert context == want
    assert len(set(got)) > 1  # the draws differ from document to document


def test_fewshot_answers_are_the_examples_own():
    """COPA's choices differ per document: each example block ends with that example's correct
    alternative, not the test document's (BoolQ's fixed 예/아니오 would not tell them apart)."""
    t = kobest.TASKS["copa"]
    train = [{"premise": f"p{i}", "question": "원인", "alternative_1": f"a{i}",
              "alternative_2": f"b{i}", "label": i % 2} for i in range(20)]  # fmt: skip
    docs = [{"premise": "P", "question": "결과", "alternative_1": "X", "alternative_2": "Y",
             "label": 0}] * 2  # fmt: skip
    rnd = random.Random(1234)
    for context in kobest.contexts(t, docs, train, 3):
        blocks = context.split("\n\n")
        for i, block in zip(rnd.sample(range(20), 3), blocks[:3], strict=True):
            assert block == f"p{i}  왜냐하면 {[f'a{i}', f'b{i}'][i % 2]}"
        assert blocks[3] == "P  그래서"


def test_encode_pair_moves_trailing_spaces():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    context, continuation = kobest.encode_pair(encode, "답변: ", " 예")
    assert context == encode("답변:") and continuation == encode("  예")
    context, continuation = kobest.encode_pair(encode, "x", " y")
    assert context == encode("x") and continuation == encode(" y")


def test_bad_files_are_named(tmp_path):
    t = kobest.TASKS["copa"]
    with pytest.raises(InputError, match="copa/test.jsonl does not exist"):
        kobest.read_split(tmp_path, t, "test")
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "test.jsonl").write_text(
        '{"premise": "a", "question": "원인", "alternative_1": "b", "alternative_2": "c", "label": 5}\n'
    )
    with pytest.raises(InputError, match=r"test.jsonl:1: label 5 is not a choice index"):
        kobest.read_split(tmp_path, t, "test")
    (tmp_path / "copa" / "test.jsonl").write_text('{"premise": "a"}\n')
    with pytest.raises(InputError, match="test.jsonl:1: missing field"):
        kobest.read_split(tmp_path, t, "test")


def test_eval_kobest_cli_against_transformers(tmp_path, shared_data):
    """COPA 0-shot on a random model with the released tokenizer: every choice's log-likelihood in
    the JSON is transformers' on the harness's prompt text, and the prediction its argmax."""
    from transformers import AutoTokenizer

    cfg = ModelConfig(vocab_size=30080, num_layers=2, d_model=64, d_ff=128, num_heads=4,
                      rotary_dim=8, max_len=128)  # fmt: skip
    hf = random_hf_model(cfg, seed=0, std=0.3)
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shared_data / "polyglot-ko-mbbpe-2022" / name, tmp_path / "hf")
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "eval", "kobest", f"--hf={tmp_path / 'hf'}",
         f"--data={shared_data / 'kobest'}", "--tasks=copa", "--shots=0", "--limit=6",
         "--dtype=float32", f"--out={tmp_path / 'r.json'}"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert "| copa |" in (tmp_path / "r.md").read_text()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    docs = [json.loads(x) for x in (shared_data / "kobest/copa/test.jsonl").open()][:6]
    predictions = report["predictions"]["copa"]["0"]
    for doc, got in zip(docs, predictions, strict=True):
        connector = {"원인": "왜냐하면", "결과": "그래서"}[doc["question"]]
        context = f"{doc['premise']}  {connector}"  # the harness's template has two spaces
        lls = []
        for choice in (doc["alternative_1"], doc["alternative_2"]):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        np.testing.assert_allclose(got["loglikelihoods"], lls, atol=1e-3)
        assert got["pred"] == int(np.argmax(lls)) and got["gold"] == doc["label"]
    gold = [d["label"] for d in docs]
    pred = [p["pred"] for p in predictions]
    assert report["results"]["copa"]["0"]["f1"] == pytest.approx(_macro_f1(gold, pred))


def test_acc_norm_divides_by_characters_not_bytes():
    """lm-eval's acc_norm: log-likelihood / len(choice) in characters. Korean characters are 3
    UTF-8 bytes each, so a byte count would pick the other ending here (checked below)."""
    t = kobest.TASKS["hellaswag"]
    doc = {"context": "c", "ending_1": "가나", "ending_2": "abcdef", "ending_3": "z", "ending_4": "w",
           "label": 1}  # fmt: skip
    scores = [-3.0, -6.0, -100.0, -100.0]
    choices = t.choices(doc)
    by_chars = int(np.argmax([s / len(c) for s, c in zip(scores, choices, strict=True)]))
    by_bytes = int(np.argmax([s / len(c.encode()) for s, c in zip(scores, choices, strict=True)]))
    assert (by_chars, by_bytes) == (1, 0)  # the premise: the two counts disagree
    out = kobest.score_task(t, [doc], [], 0, lambda s: [ord(c) for c in s], _fixed_scorer(scores))
    assert out["metrics"]["acc_norm"] == 1.0 and out["metrics"]["acc"] == 0.0


def test_macro_f1_of_imbalanced_classes_equals_sklearn():
    """Macro, not weighted: with classes of unequal support the two differ."""
    from sklearn.metrics import f1_score

    t = kobest.TASKS["copa"]
    golds = [0, 0, 0, 0, 0, 1, 1, 0]
    preds = [0, 0, 0, 0, 1, 1, 0, 0]
    docs = [{"premise": "p", "question": "원인", "alternative_1": "a", "alternative_2": "b",
             "label": g} for g in golds]  # fmt: skip
    scores = [x for p in preds for x in ((-1.0, -2.0) if p == 0 else (-2.0, -1.0))]
    out = kobest.score_task(t, docs, [], 0, lambda s: [ord(c) for c in s], _fixed_scorer(scores))
    assert [p["pred"] for p in out["predictions"]] == preds
    macro, weighted = (f1_score(golds, preds, average=a) for a in ("macro", "weighted"))
    assert abs(macro - weighted) > 0.05
    assert out["metrics"]["f1"] == pytest.approx(macro)


def test_encode_pair_splits_the_whole_encoding_as_the_harness():
    """The continuation's ids are the tail of the whole text's encoding (lm-eval's _encode_pair),
    not the continuation encoded alone: with a tokenizer that marks the start of every text
    (a BOS id here) the two differ."""
    encode = lambda s: [0] + [ord(c) for c in s]  # noqa: E731
    context, continuation = kobest.encode_pair(encode, "답변:", " 예")
    assert context == [0, ord("답"), ord("변"), ord(":")]
    assert continuation == [ord(" "), ord("예")] != encode(" 예")
