"""The `polyglot_jax` lm-evaluation-harness model against the harness's own `hf` model (HFLM) on one
small random GPT-NeoX with the real Polyglot-Ko tokenizer: log-likelihoods (trailing spaces, empty
context, left truncation), rolling log-likelihoods (also against an independent torch sum over the
documented windows), greedy generate_until with `until` strings; and KoBEST from the real files:
the harness's prompts and few-shot draws on our local-file tasks equal `eval/kobest.py`'s, and the
harness running HFLM picks the same answers, with the same per-choice log-likelihoods, as our
`score_task` with `Scorer` (what `polyglot-jax eval kobest` runs)."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing may be fetched: the tasks read local jsonl
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hf_reference import random_hf_model, require_torch  # noqa: E402

from polyglot_jax.model import ModelConfig  # noqa: E402

torch = require_torch()
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's HFLM (the reference) imports accelerate")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from polyglot_jax.eval import harness  # noqa: E402
from polyglot_jax.eval import kobest as kb  # noqa: E402

CFG = ModelConfig(
    vocab_size=30080, num_layers=2, d_model=64, d_ff=256, num_heads=4, rotary_dim=8, max_len=128
)
EOS = "<|endoftext|>"
SHOTS = (0, 5)
LIMITS = {"copa": 100, "boolq": 50}  # documents scored per task and shot count


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data):
    """A random HF model with the released tokenizer, its config naming <|endoftext|> (id 2) as
    eos as the released models' do (the 2022 file names <eos>, id 1)."""
    directory = tmp_path_factory.mktemp("hf")
    random_hf_model(CFG, seed=0, std=0.5).save_pretrained(directory)
    tokenizer = shared_data / "polyglot-ko-mbbpe-2022"
    shutil.copy(tokenizer / "tokenizer.json", directory)
    specials = json.loads((tokenizer / "special_tokens_map.json").read_text())
    extra = [t for t in specials["additional_special_tokens"] if t != EOS] + ["<eos>"]
    named = {"eos_token": EOS, "pad_token": "<pad>", "additional_special_tokens": extra}
    (directory / "special_tokens_map.json").write_text(json.dumps(named))
    config = {**named, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def hflm(model_dir):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=32)
    assert lm.prefix_token_id == lm.eot_token_id == 2 and lm.max_length == CFG.max_len
    return lm


@pytest.fixture(scope="module")
def ours(model_dir):
    """Built as the harness builds it from `--model_args`, with the arguments it adds."""
    from lm_eval.api.registry import get_model

    cls = get_model("polyglot_jax")
    assert cls is harness.PolyglotJaxLM
    lm = cls.create_from_arg_string(
        f"hf={model_dir},dtype=float32,mesh_data=1,batch_tokens=2048",
        {"batch_size": 32, "max_batch_size": None, "device": "cpu"},
    )
    assert lm.prefix_token_id == lm.eot_token_id == 2 and lm.max_length == CFG.max_len
    return lm


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("tasks")
    names = harness.write_kobest_tasks(
        shared_data / "kobest", out, cache_dir=tmp_path_factory.mktemp("datasets")
    )
    assert names == [f"kobest_{t}_local" for t in harness.KOBEST_TASKS]
    return out


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False)


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _paragraphs(shared_data, n):
    lines = (shared_data / "kobest" / "boolq" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["paragraph"] for line in lines[:n]]


# ---------------------------------------------------------------- the LM interface


def test_registered_with_the_harness():
    from lm_eval.api.registry import get_model

    assert get_model("polyglot_jax") is harness.PolyglotJaxLM
    assert get_model("hf").__name__ == "HFLM"  # the harness's own entries are still there


def _greedy_request(hflm, ours):
    """A (context, continuation) whose one continuation token is the model's argmax."""
    for context in ("오늘은", "한국어 언어 모델은", "문장: 새로 산 바지의 허리가 컸다.", "서울은"):
        ids = ours.tok_encode(context)
        with torch.no_grad():
            top = int(hflm.model(torch.tensor([ids])).logits[0, -1].argmax())
        continuation = ours.tok_decode([top])
        if continuation and ours.encode_request(context, continuation) == (ids, [top]):
            return context, continuation
    raise AssertionError("no candidate context has a round-tripping argmax token")


def test_loglikelihood_equals_hflm(hflm, ours, shared_data):
    paragraph = " ".join(_paragraphs(shared_data, 3))
    assert len(ours.tok_encode(paragraph)) > 2 * CFG.max_len  # left truncation happens
    greedy = _greedy_request(hflm, ours)
    args = [
        ("안녕하세요 ", "반갑습니다"),  # the trailing space moves to the continuation
        ("문장: 오늘은 날씨가  ", " 좋다"),
        ("문장: 오늘은 날씨가", " 좋다.\n\n그래서"),
        ("", "반갑습니다"),  # empty context: eos as context
        ("", f"{EOS}반갑습니다"),  # ... unless the continuation starts with it
        (f"{paragraph} 질문: 맞나? 답변: ", "예"),
        (paragraph, " " + paragraph[:60]),
        greedy,
    ]
    want = hflm.loglikelihood(_instances("loglikelihood", args), disable_tqdm=True)
    got = ours.loglikelihood(_instances("loglikelihood", args), disable_tqdm=True)
    np.testing.assert_allclose([g for g, _ in got], [w for w, _ in want], atol=1e-4, rtol=0)
    assert [g for _, g in got] == [w for _, w in want]
    assert got[-1][1] is True  # a True is_greedy is compared too
    assert ours.tok_decode(ours.encode_request(*args[0])[1]) == " 반갑습니다"
    assert ours.encode_request(*args[3])[0] == [2] and ours.encode_request(*args[4])[0] == [2]


def _rolling_reference(model, ids, window, prefix):
    """Sum of log p(token | all before it, at most `window` inputs): the first window predicts
    ids[:window] from [prefix] + ids, each next one predicts the next `window` tokens from the
    `window` tokens before its last target (a full context for the last, shorter one)."""
    seq = [prefix, *ids]
    total, done = 0.0, 0
    while done < len(ids):
        end = min(len(ids), done + window)  # predicts seq[done + 1 : end + 1]
        inputs = seq[max(0, end - window) : end]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)[-(end - done) :]
        targets = torch.tensor(seq[done + 1 : end + 1])
        total += logprobs[torch.arange(end - done), targets].sum().item()
        done = end
    return total


def _text_of_length(ours, text, n):
    """A prefix of `text` that encodes to exactly n tokens."""
    for cut in range(len(text)):
        if len(ours.tok_encode(text[:cut])) == n:
            return text[:cut]
    raise AssertionError(f"no prefix of {n} tokens")


def test_loglikelihood_rolling(hflm, ours, shared_data):
    long = " ".join(_paragraphs(shared_data, 6))
    docs = [
        "안녕하세요, 반갑습니다.",
        _text_of_length(ours, long, CFG.max_len),  # one full window
        _text_of_length(ours, long, CFG.max_len + 1),  # and one token more
        long,  # several windows, the last one short
    ]
    lengths = [len(ours.tok_encode(d)) for d in docs]
    assert lengths[1:3] == [CFG.max_len, CFG.max_len + 1] and lengths[3] > 3 * CFG.max_len + 10
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]))
    want = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]))
    reference = [_rolling_reference(hflm.model, ours.tok_encode(d), CFG.max_len, 2) for d in docs]
    np.testing.assert_allclose(got, reference, atol=1e-3, rtol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-6)


PROMPTS = [
    "오늘은 날씨가",
    "문장: 새로 산 바지의 허리가 컸다. 그래서",
    "한국어 언어 모델은 무엇을 배우나?",
    "질문: 서울은 어디에 있나? 답변:",
]


def test_generate_until_greedy_equals_hflm(hflm, ours, shared_data):
    free = {"until": [], "max_gen_toks": 24, "do_sample": False}
    requests = [(p, free) for p in PROMPTS] + [(" ".join(_paragraphs(shared_data, 2)), free)]
    prompts = []
    generate = ours.generator.generate
    with pytest.MonkeyPatch.context() as patch:  # record what the generator is given
        patch.setattr(
            ours.generator, "generate", lambda p, *a, **k: prompts.extend(p) or generate(p, *a, **k)
        )
        full = ours.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    # The long context is left-truncated to max_len - max_gen_toks, as HFLM's batch encoding does.
    ids, _ = hflm.tok_batch_encode([requests[-1][0]], left_truncate_len=CFG.max_len - 24)
    assert prompts[-1] == ids[0].tolist() and len(prompts[-1]) == CFG.max_len - 24
    assert full == hflm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    # `until` strings that first occur inside the generations: a generated token's own text
    # (so the token-level early stop is taken too), one list for all requests (one compile).
    until = []
    for text in full[: len(PROMPTS)]:
        pieces = [ours.tok_decode([t]) for t in ours.tok_encode(text)[2:]]
        until.append(next(p for p in pieces if p.strip() and text.find(p) > 0))
    cut = {"until": [*until, "\n\n"], "max_gen_toks": 24}
    sampling, _ = ours.sampling(cut)
    assert sampling.greedy and {tuple(ours.tok_encode(u)) for u in until} <= set(sampling.stop)
    requests = [(p, cut) for p in PROMPTS]
    got = ours.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got == hflm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    expected = []
    for text in full[: len(PROMPTS)]:
        for u in cut["until"]:
            text = text.split(u)[0]
        expected.append(text)
    assert got == expected and all(len(g) < len(t) for g, t in zip(got, full, strict=False))
    assert any(got)


# ---------------------------------------------------------------- KoBEST on local files


def _functions_by_name(value):
    """A config with each unresolved `!function` (a path to module.function) as its file name."""
    if isinstance(value, dict):
        return {k: _functions_by_name(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_functions_by_name(v) for v in value]
    return os.path.basename(value) if isinstance(value, str) and os.sep in value else value


def test_task_templates_are_the_harness_yamls(task_dir):
    """Each written task, includes resolved, is the harness's kobest YAML but for the dataset
    (local json) and f1's hf_evaluate flag (see the templates' header)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "kobest")
    for name in harness.KOBEST_TASKS:
        ours_cfg = load_yaml(task_dir / f"kobest_{name}_local.yaml", resolve_func=False)
        theirs = load_yaml(os.path.join(theirs_dir, f"kobest_{name}.yaml"), resolve_func=False)
        assert (
            ours_cfg.pop("task") == f"kobest_{name}_local"
            and ours_cfg.pop("dataset_path") == "json"
        )
        files = ours_cfg.pop("dataset_kwargs")["data_files"]
        assert sorted(files) == ["test", "train", "validation"]
        for metric in ours_cfg["metric_list"] + theirs["metric_list"]:
            metric.pop("hf_evaluate", None)
        ours_cfg, theirs = _functions_by_name(ours_cfg), _functions_by_name(theirs)
        for key in ("task", "dataset_path", "dataset_name"):
            theirs.pop(key)
        assert ours_cfg == theirs, name


class _Recorder(LM):
    """Records the harness's loglikelihood requests (and answers 0)."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def loglikelihood(self, requests, disable_tqdm=False):
        self.requests.extend(requests)
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def _by_doc(requests_or_samples, task):
    out = {}
    for r in requests_or_samples:
        if r.task_name == task:
            out.setdefault(r.doc_id, []).append(r.args)
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize("shots", SHOTS)
def test_kobest_prompts_and_fewshot_draws_equal_the_harness(task_manager, shared_data, shots):
    """Every request the harness builds on the local tasks (first 200 documents of all five) is
    ours: prompt, few-shot examples (one Random(1234) drawn doc by doc), choices, delimiters."""
    import lm_eval

    recorder = _Recorder()
    names = [f"kobest_{t}_local" for t in harness.KOBEST_TASKS]
    lm_eval.simple_evaluate(
        model=recorder, tasks=names, num_fewshot=shots, limit=200, task_manager=task_manager,
        log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    for name in harness.KOBEST_TASKS:
        t = kb.task(name)
        docs = kb.read_split(shared_data / "kobest", t, "test")[:200]
        train = kb.read_split(shared_data / "kobest", t, "train")
        theirs = _by_doc(recorder.requests, f"kobest_{name}_local")
        mine = [
            [(context, " " + c) for c in t.choices(doc)]
            for doc, context in zip(docs, kb.contexts(t, docs, train, shots), strict=True)
        ]
        assert len(theirs) == len(mine) == 200
        bad = [i for i in range(200) if theirs[i] != mine[i]]
        assert not bad, f"{name} {shots}-shot: documents {bad[:5]} differ, e.g. {theirs[bad[0]]}"


@pytest.fixture(scope="module")
def harness_runs(hflm, task_manager):
    """simple_evaluate's results and samples of HFLM per (task, shots)."""
    import lm_eval

    runs = {}
    for name in LIMITS:
        for shots in SHOTS:
            runs[name, shots] = lm_eval.simple_evaluate(
                model=hflm, tasks=[f"kobest_{name}_local"], num_fewshot=shots,
                limit=LIMITS[name], log_samples=True, task_manager=task_manager,
                bootstrap_iters=0,
            )  # fmt: skip
    return runs


def _samples(samples):
    """Per document (in order), the log-likelihood of each choice."""
    return [
        [float(ll) for ll, _ in s["filtered_resps"]]
        for s in sorted(samples, key=lambda s: s["doc_id"])
    ]


@pytest.mark.parametrize("name", ["copa", "boolq"])
@pytest.mark.parametrize("shots", SHOTS)
def test_kobest_scores_equal_the_harness(harness_runs, ours, shared_data, name, shots):
    """Our score_task (Scorer on tokenizer.encode, as `eval kobest`) = the harness's run of its
    own HFLM: per-choice log-likelihoods, the chosen answer of each document, acc and macro F1."""
    t = kb.task(name)
    docs = kb.read_split(shared_data / "kobest", t, "test")[: LIMITS[name]]
    train = kb.read_split(shared_data / "kobest", t, "train")
    scored = kb.score_task(t, docs, train, shots, ours.tok_encode, ours.scorer.loglikelihood)
    run = harness_runs[name, shots]
    theirs = _samples(run["samples"][f"kobest_{name}_local"])
    mine = [p["loglikelihoods"] for p in scored["predictions"]]
    assert len(theirs) == len(mine) == LIMITS[name]
    np.testing.assert_allclose(np.concatenate(mine), np.concatenate(theirs), atol=1e-3, rtol=0)
    preds = [int(np.argmax(lls)) for lls in theirs]
    assert [p["pred"] for p in scored["predictions"]] == preds
    result = run["results"][f"kobest_{name}_local"]
    assert scored["metrics"]["acc"] == pytest.approx(result["acc,none"], abs=1e-9)
    assert scored["metrics"]["f1"] == pytest.approx(result["f1,none"], abs=1e-9)


def test_cli_runs_the_harness_with_our_model(model_dir, tmp_path, shared_data, harness_runs,
                                            monkeypatch):  # fmt: skip
    """`python -m polyglot_jax.eval.harness write_kobest_tasks` writes the tasks; its `main` runs
    lm-eval's own CLI with `--model polyglot_jax`: the same choices' log-likelihoods as HFLM's."""
    tasks = tmp_path / "tasks"
    write = subprocess.run(
        [sys.executable, "-m", "polyglot_jax.eval.harness", "write_kobest_tasks",
         f"--data={shared_data / 'kobest'}", f"--out={tasks}", "--tasks=copa",
         f"--cache_dir={tmp_path / 'datasets'}"], capture_output=True, text=True,
    )  # fmt: skip
    assert write.returncode == 0, write.stderr
    assert sorted(p.name for p in tasks.iterdir()) == [
        "_kobest_local.yaml",
        "kobest_copa_local.yaml",
    ]
    monkeypatch.setattr(sys, "argv", ["polyglot_jax.eval.harness"])  # restored after the test
    harness.main(
        ["run", "--model", "polyglot_jax", "--model_args", f"hf={model_dir},mesh_data=1",
         "--include_path", str(tasks), "--tasks", "kobest_copa_local", "--limit", "8",
         "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"]
    )  # fmt: skip
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["results"]["kobest_copa_local"]["sample_len"] == 8
    (samples,) = (tmp_path / "out").rglob("samples_kobest_copa_local_*.jsonl")
    got = _samples(json.loads(line) for line in samples.read_text().splitlines())
    want = _samples(harness_runs["copa", 0]["samples"]["kobest_copa_local"])[:8]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_task_functions_are_the_harness_functions(shared_data):
    """tasks/utils.py computes what lm_eval/tasks/kobest/utils.py does, on real documents."""
    import importlib.util

    import datasets
    import lm_eval

    def load(path):
        spec = importlib.util.spec_from_file_location(f"kobest_utils_{len(path)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    theirs = load(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "kobest", "utils.py"))
    mine = load(str(harness.TASKS_DIR / "utils.py"))
    functions = {
        "copa": ("copa_doc_to_text", "copa_doc_to_target", "copa_doc_to_choice"),
        "sentineg": ("sentineg_doc_to_text",),
        "wic": ("wic_doc_to_text",),
    }
    for name, fns in functions.items():
        docs = kb.read_split(shared_data / "kobest", kb.task(name), "train")[:300]
        for fn in fns:
            assert [getattr(mine, fn)(d) for d in docs] == [getattr(theirs, fn)(d) for d in docs]
    docs = datasets.Dataset.from_list(
        kb.read_split(shared_data / "kobest", kb.task("hellaswag"), "train")[:50]
    )
    assert (
        mine.hellaswag_process_doc(docs).to_list() == theirs.hellaswag_process_doc(docs).to_list()
    )
    items = list(zip(np.arange(40) % 3, (np.arange(40) * 7) % 3, strict=True))
    assert mine.macro_f1_score(items) == theirs.macro_f1_score(items)
