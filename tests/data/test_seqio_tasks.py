"""seqio vocabulary/tasks: checked against the tokenizer itself, source texts and the jsonl files."""

import collections
import json
import subprocess
import sys

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed")
tf = pytest.importorskip("tensorflow", reason="the seqio extra is not installed")

from polyglot_jax.data import seqio_tasks  # noqa: E402
from polyglot_jax.data.records import read_manifest  # noqa: E402
from polyglot_jax.data.tokenize import tokenize_to_shards  # noqa: E402
from polyglot_jax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from polyglot_jax.errors import ConfigError  # noqa: E402

TEXTS = [
    "안녕하세요. 오늘은 날씨가 맑습니다.",
    "한국어 형태소 분석기는 문장을 형태소로 나눕니다.\n줄바꿈도 그대로 남아야 합니다.",
    "영화가 정말 재미있었어요 ㅋㅋㅋ 10점 만점에 10점!",
    "전화번호는 <|tel|> 이고 계좌는 <|acc|> 입니다.",
    "짧은 글",
    # Long enough to span several 16-token records.
    "서울은 대한민국의 수도이며 가장 큰 도시이다. " * 6,
    "mixed English and 한국어 text, with   spaces\tand tabs.",
    "마지막 문서입니다.",
]
ROUND_TRIP = TEXTS + ["", " ", "\n\n", "😀 이모지와 é 악센트", "<|sep|> 구분자"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A small morpheme-aware BBPE trained on TEXTS (needs MeCab, not the shared data)."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS * 3, out, vocab_size=400, min_frequency=1, show_progress=False)
    return out


def _check_vocabulary(path):
    vocab = seqio_tasks.PolyglotVocabulary(path)
    loaded = load_tokenizer(path)
    assert (vocab.eos_id, vocab.pad_id, vocab.unk_id) == (loaded.eos_id, 0, None)
    assert vocab.vocab_size == loaded.tokenizer.get_vocab_size(with_added_tokens=True)
    for text in ROUND_TRIP:
        ids = vocab.encode(text)
        assert ids == loaded.tokenizer.encode(text, add_special_tokens=False).ids
        assert vocab.decode(ids) == text
        tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
        assert tf_ids == ids
        assert vocab.decode_tf(tf.constant(ids + [vocab.eos_id], tf.int32)).numpy() == (
            text.encode("utf-8")
        )
    # Batched decode inside a graph: stops at the first eos, padding dropped.
    rows = [vocab.encode(t) for t in TEXTS[:3]]
    width = max(map(len, rows)) + 3
    batch = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    batch[0, len(rows[0])] = vocab.eos_id
    batch[0, len(rows[0]) + 1] = rows[1][0]  # after eos: must not be decoded
    decoded = tf.function(vocab.decode_tf)(tf.constant(batch)).numpy()
    assert [d.decode("utf-8") for d in decoded] == TEXTS[:3]
    assert vocab.decode(batch[0].tolist()) == TEXTS[0]
    # encode_tf inside tf.data (graph mode) agrees with python encode.
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).map(vocab.encode_tf)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == [vocab.encode(t) for t in TEXTS]


def test_vocabulary_matches_tiny_tokenizer(tiny_tokenizer):
    _check_vocabulary(tiny_tokenizer)


def test_vocabulary_matches_released_tokenizer(shared_data):
    _check_vocabulary(shared_data / "polyglot-ko-mbbpe-2022")


def test_vocabulary_rejects_nonzero_pad(tiny_tokenizer, tmp_path):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_bytes((tiny_tokenizer / "tokenizer.json").read_bytes())
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|sep|>"}))
    with pytest.raises(ConfigError, match="pad"):
        seqio_tasks.PolyglotVocabulary(bad)


@pytest.fixture(scope="module")
def tiny_corpus(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    out = root / "tokenized"
    # Tiny records and shards: documents cross record boundaries, several shards.
    tokenize_to_shards(
        tiny_tokenizer, [src], out, block_tokens=16, shard_chars=60, show_progress=False
    )
    return out


def test_corpus_task_yields_each_document(tiny_tokenizer, tiny_corpus):
    manifest = read_manifest(tiny_corpus)
    assert len(manifest["shards"]) > 1 and manifest["records"] > manifest["documents"]
    vocab = seqio_tasks.PolyglotVocabulary(tiny_tokenizer)
    loaded = load_tokenizer(tiny_tokenizer)
    expected = [loaded.encode(t) for t in TEXTS]

    task = seqio_tasks.register_corpus_task("test_seqio_corpus", tiny_corpus, vocabulary=vocab)
    assert seqio.get_mixture_or_task("test_seqio_corpus") is task
    assert task.num_input_examples("train") == len(TEXTS)
    got = [
        ex["targets"].tolist()
        for ex in task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()
    ]
    assert got == [e + [vocab.eos_id] for e in expected]
    assert [vocab.decode(g) for g in got] == TEXTS

    # With a sequence length: trimmed to length - 1, then eos appended.
    trimmed = task.get_dataset({"targets": 6}, split="train", shuffle=False)
    got = [ex["targets"].tolist() for ex in trimmed.as_numpy_iterator()]
    assert got == [e[:5] + [vocab.eos_id] for e in expected]

    # Shuffling the shard files keeps every document exactly once.
    shuffled = task.source.get_dataset("train", shuffle=True, seed=3)
    got = [tuple(ex["targets"].tolist()) for ex in shuffled.as_numpy_iterator()]
    assert collections.Counter(got) == collections.Counter(map(tuple, expected))

    # Re-registration under the same name replaces the task; the manifest's tokenizer is the default.
    again = seqio_tasks.register_corpus_task("test_seqio_corpus", {"validation": tiny_corpus})
    assert list(again.splits) == ["validation"]
    assert again.output_features["targets"].vocabulary == vocab


def _hand_rendered(task, doc):
    """The harness templates of REFERENCE.md, filled in by hand for one document."""
    yes_no = [" 아니오", " 예"]
    if task == "boolq":
        return doc["paragraph"] + " 질문: " + doc["question"] + " 답변: ", yes_no[doc["label"]]
    if task == "copa":
        word = "왜냐하면" if doc["question"] == "원인" else "그래서"
        return doc["premise"] + " " + word, " " + doc["alternative_" + str(doc["label"] + 1)]
    if task == "wic":
        prompt = (
            "문장1: "
            + doc["context_1"]
            + " 문장2: "
            + doc["context_2"]
            + " 두 문장에서 "
            + doc["word"]
            + "가 같은 뜻으로 쓰였나?"
        )
        return prompt, yes_no[doc["label"]]
    if task == "hellaswag":
        return "문장: " + doc["context"], " " + doc["ending_" + str(doc["label"] + 1)]
    if task == "sentineg":
        return "문장: " + doc["sentence"] + " 긍부정:", [" 부정", " 긍정"][doc["label"]]
    raise AssertionError(task)


def test_kobest_tasks_and_mixture(shared_data):
    vocab = seqio_tasks.PolyglotVocabulary(shared_data / "polyglot-ko-mbbpe-2022")
    loaded = load_tokenizer(shared_data / "polyglot-ko-mbbpe-2022")
    kobest = shared_data / "kobest"
    mixture = seqio_tasks.register_kobest_tasks(kobest, vocab, prefix="test_kobest")
    assert seqio.get_mixture_or_task("test_kobest") is mixture
    assert sorted(t.name for t in mixture.tasks) == sorted(
        f"test_kobest_{t}" for t in seqio_tasks.KOBEST_TASKS
    )
    assert len({mixture.get_rate(t) for t in mixture.tasks}) == 1

    for name in seqio_tasks.KOBEST_TASKS:
        task = seqio.get_mixture_or_task(f"test_kobest_{name}")
        files = sorted((kobest / name).glob("*.jsonl"))
        assert sorted(task.splits) == sorted(f.stem for f in files)
        assert {"train", "validation", "test"} <= set(task.splits)
        for file in files:
            lines = file.read_text(encoding="utf-8").splitlines()
            n = task.source.get_dataset(file.stem, shuffle=False).reduce(0, lambda c, _: c + 1)
            assert int(n) == len(lines) == task.num_input_examples(file.stem), file
        # One rendered and tokenized example (the full Task pipeline) against the hand-filled
        # template and the tokenizer itself.
        doc = json.loads((kobest / name / "validation.jsonl").open(encoding="utf-8").readline())
        prompt, target = _hand_rendered(name, doc)
        ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
        assert ex["inputs_pretokenized"].decode("utf-8") == prompt
        assert ex["targets_pretokenized"].decode("utf-8") == target
        assert ex["inputs"].tolist() == loaded.encode(prompt)
        assert ex["targets"].tolist() == loaded.encode(target)
        assert int(ex["label"]) == doc["label"]

    # The whole validation split of the smallest task through the tokenizing pipeline.
    task = seqio.get_mixture_or_task("test_kobest_sentineg")
    count = task.get_dataset(None, split="validation", shuffle=False).reduce(0, lambda c, _: c + 1)
    assert int(count) == task.num_input_examples("validation")


def test_core_modules_do_not_import_tensorflow():
    code = (
        "import sys, polyglot_jax, polyglot_jax.data, polyglot_jax.data.pipeline, "
        "polyglot_jax.train; "
        "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
