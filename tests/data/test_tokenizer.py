"""Morpheme-aware BPE: marking, training, layout, round trips, loading (ours and the released one)."""

import hashlib
import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from polyglot_jax.data.sample import builtin_corpus_texts
from polyglot_jax.data.tokenizer import (
    LEADING_SPECIAL_TOKENS,
    MORPHEME_BOUNDARY,
    SPECIAL_TOKENS,
    TRAILING_SPECIAL_TOKENS,
    MorphemeMarker,
    load_tokenizer,
    train_tokenizer,
    training_pre_tokenizer,
    training_text,
)
from polyglot_jax.errors import InputError

VOCAB = 1200

ADVERSARIAL = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    "\r\n",
    " leading space",
    "trailing space ",
    "a  b   c    d",
    "대한민국은 민주공화국이다.\n\n대한민국의 주권은 국민에게 있고,  모든 권력은 국민으로부터 나온다.",
    "  앞에 공백 그리고 뒤에도  ",
    "ㅋㅋㅋㅋㅋㅋㅋ ㅠㅠ ㅎㅎ",
    "ㅋ" * 300,
    "1234567890 3.14159 1,000,000원 010-1234-5678",
    "The quick brown fox jumps over the lazy dog. It's 'quoted' and \"double\".",
    "😀 👍🏽 👨‍👩‍👧 🇰🇷",
    "e\u0301 café naïve",
    "大韓民國 日本語 テスト русский العربية",
    "\u00a0nbsp\u200bzwsp\ufeffbom\u3000ideographic\u2028line-sep",
    "\x00\x01\x1f\x7f control",
    "<|endoftext|>문서 경계<|endoftext|>",
    "전화 <|tel|>, 계좌 <|acc|>, 주민번호 <|rrn|> <|sep|> <pad> <eos>",
    f"marker {MORPHEME_BOUNDARY} inside 안녕{MORPHEME_BOUNDARY}하세요",
    "mixed한국어English123😀\n\t 끝",
]


def _fuzz_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = (
        [chr(c) for c in range(0xAC00, 0xAC00 + 200)]
        + list("ㄱㄴㄷㅋㅎㅏㅠ")
        + list("abcXYZ019.,!?'\"<>|()")
        + [" ", "  ", "\n", "\t", "\r", "\u3000", MORPHEME_BOUNDARY, "😀", "\u200d", "\u0301"]
        + list(SPECIAL_TOKENS)
    )
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def training_texts():
    return list(builtin_corpus_texts(nsmc_limit=3000))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training_texts):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(training_texts, out, vocab_size=VOCAB, show_progress=False)


def test_marker_inserts_boundaries_between_touching_morphemes():
    marker = MorphemeMarker()
    m = MORPHEME_BOUNDARY
    assert marker("저는 학생입니다.") == f"저{m}는 학생{m}입니다{m}."
    # Leading whitespace, runs of spaces and newlines stay as they are (MeCab's own spans would
    # shift here); no marker next to whitespace.
    assert marker("  책을\n\n읽었다 ") == f"  책{m}을\n\n읽{m}었{m}다 "


def test_marker_only_inserts(training_texts):
    marker = MorphemeMarker()
    for text in training_texts[:2000] + ADVERSARIAL + _fuzz_strings(300):
        marked = marker(text)
        if MORPHEME_BOUNDARY not in text:
            assert marked.replace(MORPHEME_BOUNDARY, "") == text


def test_fast_surfaces_match_public_parse(training_texts):
    marker = MorphemeMarker()
    for text in training_texts[:500] + ADVERSARIAL:
        assert marker.surfaces(text) == marker.parsed_surfaces(text)


def test_layout_and_specials(trained):
    tok = trained.tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    for i, name in enumerate(LEADING_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    for i, name in enumerate(TRAILING_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == VOCAB - len(TRAILING_SPECIAL_TOKENS) + i
    assert (trained.eos_id, trained.pad_id) == (2, 0)
    # Every special is one id, also inside running text.
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"앞{name}뒤", add_special_tokens=False).ids
        assert tok.token_to_id(name) in ids


def test_released_tokenizer_has_the_layout_vocab_30003_reproduces(shared_data):
    released = json.loads((shared_data / "polyglot-ko-mbbpe-2022" / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in released["added_tokens"]}
    expected = {name: i for i, name in enumerate(LEADING_SPECIAL_TOKENS)}
    expected |= {name: 30000 + i for i, name in enumerate(TRAILING_SPECIAL_TOKENS)}
    assert ids == expected
    assert len(released["model"]["vocab"]) == 30000


def test_round_trip_with_tokenizers_and_autotokenizer(trained):
    hf = AutoTokenizer.from_pretrained(str(trained.path))
    assert len(hf) == VOCAB
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token_id) == ("<|endoftext|>", 2, 0)
    for text in ADVERSARIAL + _fuzz_strings(300, seed=1):
        assert trained.decode(trained.encode(text)) == text
        assert hf.decode(hf.encode(text)) == text


def test_merges_never_cross_morpheme_boundaries(trained, training_texts):
    marker = MorphemeMarker()
    pre = training_pre_tokenizer()
    pieces = set()
    for text in training_texts:
        pieces.update(p for p, _ in pre.pre_tokenize_str(training_text(marker, text)))
    haystack = "\x00".join(pieces)  # \x00 is not in the byte-level alphabet

    def crossing(vocab):
        return [t for t in vocab if len(t) > 1 and t not in haystack and t not in SPECIAL_TOKENS]

    assert crossing(trained.tokenizer.get_vocab()) == []
    # The same training without the markers does learn tokens that span morphemes: the check
    # above can fail.
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(
        training_texts,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    assert len(crossing(plain.get_vocab())) > 10


def test_special_tokens_in_training_text_cost_no_merges(tmp_path):
    texts = [f"문의는 {s} 으로 주세요 {s}{s}" for s in SPECIAL_TOKENS for _ in range(50)]
    result = train_tokenizer(texts, tmp_path / "tok", vocab_size=330, show_progress=False)
    bpe_ids = range(len(LEADING_SPECIAL_TOKENS), result.vocab_size - len(TRAILING_SPECIAL_TOKENS))
    learned = [result.decode([i]) for i in bpe_ids]
    assert len(learned) > 256  # merges were learned, none from the specials' characters
    assert not [t for t in learned if len(t) > 1 and ("<" in t or "|" in t or ">" in t)]
    assert result.encode("<|tel|>") == [result.tokenizer.token_to_id("<|tel|>")]


def test_load_released_tokenizer(shared_data):
    directory = shared_data / "polyglot-ko-mbbpe-2022"
    loaded = load_tokenizer(directory)
    # <|endoftext|> (the models' eos, id 2) wins over the config's <eos> (id 1).
    assert (loaded.eos_token, loaded.eos_id) == ("<|endoftext|>", 2)
    assert loaded.vocab_size == 30003
    assert loaded.sha256 == hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    hf = AutoTokenizer.from_pretrained(str(directory))
    for text in ADVERSARIAL:
        if MORPHEME_BOUNDARY in text:
            continue  # the released pre-tokenizer deletes the marker character
        assert loaded.encode(text) == hf.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_load_falls_back_to_configured_eos_and_rejects_none(tmp_path):
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="a"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputError, match="no eos token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_tokenizer(tmp_path).eos_id == 1
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_id == 1
    assert load_tokenizer(tmp_path, eos_token="<s>").eos_id == 0
    with pytest.raises(InputError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_existing_output_needs_overwrite(tmp_path, trained):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train_tokenizer(["한국어 문장입니다."], out, vocab_size=300, show_progress=False)
    result = train_tokenizer(
        ["한국어 문장입니다."] * 3, out, vocab_size=300, overwrite=True, show_progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    # A tiny corpus cannot reach the vocab size: the trailing specials follow the last merge.
    assert result.vocab_size < 300
    assert result.tokenizer.token_to_id("<|rrn|>") == result.vocab_size - 1


def test_cli(tmp_path, training_texts):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in training_texts[:800])
    )
    out = tmp_path / "tok"
    run = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "train-tokenizer", f"--input={corpus}",
         "--vocab_size=700", f"--output={out}", "--num_workers=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == 700 and hf.eos_token_id == 2
    bad = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "train-tokenizer", f"--input={tmp_path}/nope.jsonl",
         f"--output={tmp_path}/x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "nope.jsonl" in bad.stderr
