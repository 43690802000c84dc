"""The exported tokenizer and model load with transformers 4.x as with 5.x.

transformers 5 saves tokenizers as `tokenizer_class: TokenizersBackend` with an
`extra_special_tokens` list; 4.x can load neither. `to_hf` writes portable side files
(`convert.portable_tokenizer_files`), checked here in process with 5.x, and, with the 4.x of
`.venv/tf4` (the Makefile's `.venv/.installed-tf4`: transformers 4.57, tokenizers 0.22,
huggingface_hub 0.x installed with --target beside the venv's torch and numpy), by
`transformers4_check.py` in a subprocess: the same ids, decoded texts and special-token ids, logits
within 1e-5 and the same greedy tokens as 5.x.

The 4.x directory is `$POLYGLOT_JAX_TF4` or `.venv/tf4`; without it the test skips, or fails
under CI (the CI environment variable set), where `make test` has installed it.
"""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from hf_reference import require_torch
from train_fixtures import tiny_shards
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyglot_jax.checkpoint import Checkpointer
from polyglot_jax.config import base_config
from polyglot_jax.data.tokenizer import load_tokenizer
from polyglot_jax.hf import convert
from polyglot_jax.model import ModelConfig, abstract_params

torch = require_torch()

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECK = pathlib.Path(__file__).with_name("transformers4_check.py")
TF4 = pathlib.Path(os.environ.get("POLYGLOT_JAX_TF4") or REPO / ".venv" / "tf4")
TEXTS = [
    "대한민국의 수도는 서울이다.\n  옛날 옛적에 한 마을에<|endoftext|>",
    "ㅋㅋㅋ 😀 이 영화 진짜 최고!!  \t평점 10점",
    "<|sep|>전화번호는 <|tel|> 이고 계좌는 <|acc|> 입니다.",
]
MODEL = dict(num_layers=2, d_model=32, d_ff=64, num_heads=4, rotary_dim=4, max_len=64)


def export(root: pathlib.Path, tokenizer: pathlib.Path, vocab_size: int) -> pathlib.Path:
    """A run directory with random parameters and `tokenizer`, exported to root/hf (float32)."""
    config = base_config()
    config.model.update({**MODEL, "vocab_size": vocab_size, "dtype": "float32"})
    config.data.tokenizer = str(tokenizer)
    cfg = ModelConfig.from_config(config.model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda b: (0.2 * rng.standard_normal(b.value.shape)).astype(b.value.dtype),
        abstract_params(cfg),
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    workdir = root / "run"
    ckpt = Checkpointer(workdir, keep=1, keep_period=None, async_save=False)
    ckpt.save(1, params, optax.adamw(1e-3).init(params), None)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    convert.to_hf(workdir, root / "hf", dtype="float32", show_progress=False)
    return root / "hf"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(source tokenizer, export): the built-in sample's tokenizer, as `train-tokenizer` saves it
    with transformers 5 (the files 4.x cannot load)."""
    tokens = tiny_shards(tmp_path_factory.mktemp("cache"))
    tokenizer = tokens.parent / "tokenizer"
    source = json.loads((tokenizer / "tokenizer_config.json").read_text())
    assert source["tokenizer_class"] == "TokenizersBackend"  # what 4.x fails on
    ids = load_tokenizer(tokenizer).vocab_size
    return tokenizer, export(tmp_path_factory.mktemp("trained"), tokenizer, ids + (-ids % 128))


@pytest.fixture(scope="module")
def released(tmp_path_factory, shared_data):
    """(source tokenizer, export): the released 2022 Polyglot-Ko tokenizer, vocab 30080."""
    tokenizer = shared_data / "polyglot-ko-mbbpe-2022"
    return tokenizer, export(tmp_path_factory.mktemp("released"), tokenizer, 30080)


@pytest.fixture(scope="module")
def exports(trained, request):
    """`trained`, and `released` where the workplace data is present."""
    if not (REPO.parent / "shared" / "data").is_dir():
        return [trained]
    return [trained, request.getfixturevalue("released")]


# ---------------------------------------------------------------- the files, with 5.x


def test_exported_side_files_name_a_class_and_tokens_both_versions_read(trained):
    source, hf = trained
    config = json.loads((hf / "tokenizer_config.json").read_text())
    specials = json.loads((hf / "special_tokens_map.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in config and "backend" not in config
    want = ["<eos>", "<|sep|>", "<|acc|>", "<|tel|>", "<|rrn|>"]
    assert config["additional_special_tokens"] == want
    assert specials == {
        "eos_token": "<|endoftext|>",
        "pad_token": "<pad>",
        "additional_special_tokens": want,
    }
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<pad>"
    assert (hf / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()


def test_files_that_load_everywhere_are_copied_unchanged(released):
    source, hf = released
    for name in convert.TOKENIZER_FILES:
        assert (hf / name).read_bytes() == (source / name).read_bytes(), name


def test_a_bare_tokenizer_json_gets_side_files_naming_its_eos(tmp_path):
    from tokenizers import Tokenizer, models

    tok = tmp_path / "tok"
    tok.mkdir()
    vocab = {"<pad>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, 40)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<pad>")).save(str(tok / "tokenizer.json"))
    hf = export(tmp_path, tok, 64)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    assert json.loads((hf / "special_tokens_map.json").read_text()) == {
        "eos_token": "<|endoftext|>"
    }
    assert AutoTokenizer.from_pretrained(hf).eos_token_id == 1


@pytest.mark.parametrize(
    "config, specials, want_config, want_specials",
    [
        (  # transformers 5's save: the class and the list are rewritten
            {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
             "eos_token": "</s>", "extra_special_tokens": ["<a>", "<b>"]},
            {},
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
             "additional_special_tokens": ["<a>", "<b>"]},
            {"eos_token": "</s>", "additional_special_tokens": ["<a>", "<b>"]},
        ),
        (  # another class both versions know, named extras (a dict, as 4.x saves them): kept
            {"tokenizer_class": "GPT2TokenizerFast", "bos_token": "<s>", "unk_token": "<u>",
             "additional_special_tokens": ["<a>"], "extra_special_tokens": {"image": "<i>"}},
            {"eos_token": {"content": "</s>", "lstrip": False}},
            {"tokenizer_class": "GPT2TokenizerFast", "bos_token": "<s>", "unk_token": "<u>",
             "additional_special_tokens": ["<a>"], "extra_special_tokens": {"image": "<i>"}},
            {"eos_token": {"content": "</s>", "lstrip": False}, "bos_token": "<s>",
             "unk_token": "<u>", "additional_special_tokens": ["<a>"]},
        ),
        (  # both lists: merged, each token once
            {"additional_special_tokens": ["<a>"], "extra_special_tokens": ["<a>", "<b>"]},
            {},
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
             "additional_special_tokens": ["<a>", "<b>"]},
            {"eos_token": "<|endoftext|>", "additional_special_tokens": ["<a>", "<b>"]},
        ),
    ],
)  # fmt: skip
def test_portable_tokenizer_files(config, specials, want_config, want_specials):
    got = convert.portable_tokenizer_files(config, specials, "<|endoftext|>")
    assert got == (want_config, want_specials)


def test_5x_reads_the_export_as_it_read_the_source(exports):
    for source, hf in exports:
        ours = load_tokenizer(source)
        before, after = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(hf)
        for text in TEXTS:
            ids = after(text)["input_ids"]
            assert ids == before(text)["input_ids"] == ours.encode(text), text
            assert after.decode(ids) == text
        assert after.all_special_tokens == before.all_special_tokens
        assert after.pad_token_id == before.pad_token_id == ours.pad_id == 0


# ---------------------------------------------------------------- 4.x against 5.x


@pytest.fixture(scope="module")
def tf4() -> pathlib.Path:
    """The transformers 4.x directory: skipped without it, failed under CI."""
    if (TF4 / "transformers" / "__init__.py").is_file():
        return TF4
    message = (
        f"transformers 4.x is not installed at {TF4} (make .venv/.installed-tf4, or set "
        "POLYGLOT_JAX_TF4 to a `pip install --target` directory of transformers<5)"
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


def _run_4x(
    tf4: pathlib.Path, exports: list[pathlib.Path], tmp_path: pathlib.Path
) -> tuple[dict, pathlib.Path]:
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "tf4"
    env = {**os.environ, "PYTHONPATH": str(tf4)}  # first: its transformers shadows the venv's
    done = subprocess.run(
        [sys.executable, str(CHECK), str(out), str(texts), *map(str, exports)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "summary.json").read_text(encoding="utf-8")), out


def test_transformers_4_loads_the_export_like_5(tf4, exports, tmp_path):
    summary, out = _run_4x(tf4, [hf for _, hf in exports], tmp_path)
    assert summary["transformers"].startswith("4.") and summary["tokenizers"].startswith("0.2")
    assert pathlib.Path(summary["transformers_file"]).resolve().is_relative_to(tf4.resolve())
    for number, ((source, hf), seen) in enumerate(zip(exports, summary["exports"], strict=True)):
        tokenizer = AutoTokenizer.from_pretrained(hf)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        assert seen["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert seen["model_class"] == "GPTNeoXForCausalLM"
        assert not seen["loading_info"]["missing_keys"], seen["loading_info"]
        assert not seen["loading_info"]["unexpected_keys"], seen["loading_info"]
        ids = [tokenizer(text)["input_ids"] for text in TEXTS]
        assert seen["ids"] == ids == [load_tokenizer(source).encode(t) for t in TEXTS]
        assert seen["decoded"] == [tokenizer.decode(row) for row in ids] == TEXTS
        assert seen["special_ids"] == {
            t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens
        }
        assert (seen["eos_token"], seen["pad_token"]) == (tokenizer.eos_token, tokenizer.pad_token)
        with torch.no_grad():
            for k, row in enumerate(ids):
                logits = model(torch.tensor([row])).logits[0].numpy()
                theirs = np.load(out / f"{number}-{k}.npy")
                assert theirs.shape == logits.shape
                np.testing.assert_allclose(theirs, logits, atol=1e-5, rtol=0)
            generated = model.generate(
                torch.tensor([ids[0]]), do_sample=False, max_new_tokens=8, min_new_tokens=8
            )
        assert seen["generated"] == generated[0, len(ids[0]) :].tolist()
