"""`polyglot-jax generate --json` prints what the contract says, from a HF directory."""

import json
import subprocess
import sys

import pytest
from hf_reference import random_hf_model
from train_fixtures import REPO

from polyglot_jax.hf.mapping import to_hf_config
from polyglot_jax.model import ModelConfig


def test_generate_json_from_hf_dir(tmp_path):
    cfg = ModelConfig(
        vocab_size=96, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=32
    )
    random_hf_model(cfg).save_pretrained(tmp_path)
    args = [
        "generate",
        f"--hf={tmp_path}",
        "--prompt_ids=1,2,3",
        "--max_new_tokens=5",
        "--greedy",
        "--json",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["ids"]) == len(result["logprobs"]) == 5 and result["text"] is None
    assert all(0 <= i < 96 for i in result["ids"]) and all(lp <= 0 for lp in result["logprobs"])
    bad = subprocess.run([sys.executable, "-m", "polyglot_jax", "generate", f"--hf={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "exactly one of --prompt and --prompt_ids" in bad.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature=nan"], "--temperature=nan must be a positive finite number"),
        (["--temperature=0"], "--temperature=0.0 must be a positive finite number"),
        (["--temperature=-1"], "--temperature=-1.0 must be a positive finite number"),
        (["--temperature=inf"], "--temperature=inf must be a positive finite number"),
        (["--max_new_tokens=0"], "--max_new_tokens=0 must be a positive int"),
        (["--max_new_tokens=-3"], "--max_new_tokens=-3 must be a positive int"),
        (["--seed=-1"], "--seed=-1 must be an int within [0, 2**32)"),
        (["--seed=4294967296"], "--seed=4294967296 must be an int within [0, 2**32)"),
        (["--step=3"], "--step selects a checkpoint of --workdir; --hf has none"),
    ],
)
def test_bad_numeric_flags_are_one_line_before_loading(tmp_path, flags, message):
    """Checked before the model is read: --hf names an empty directory here."""
    args = ["generate", f"--hf={tmp_path}", "--prompt_ids=1,2", *flags]
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_negative_step_of_a_workdir(tmp_path):
    args = ["generate", f"--workdir={tmp_path}", "--prompt_ids=1", "--step=-1"]
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2 and "--step=-1 must be an int >= 0" in out.stderr, out.stderr


def test_malformed_hf_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({**to_hf_config(ModelConfig(96, 1, 32, 64, 2, 8)), "num_attention_heads": 0})
    )
    args = ["generate", f"--hf={tmp_path}", "--prompt_ids=1,2"]
    out = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", *args], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert f"{tmp_path / 'config.json'}: num_attention_heads=0 must be a positive" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _word_tokenizer(directory, vocab_size):
    """A whitespace word-level tokenizer.json: "w{i}" is id i, "<|endoftext|>" the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return {i: w for w, i in vocab.items()}


def test_generate_prompt_text_and_decoded_text(tmp_path):
    """--prompt is encoded with the directory's tokenizer (same result as the ids it names) and
    `text` is the decoding of the generated ids (the word-level decoder joins with spaces)."""
    cfg = ModelConfig(
        vocab_size=96, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=32
    )
    random_hf_model(cfg, std=0.5).save_pretrained(tmp_path)
    words = _word_tokenizer(tmp_path, 96)
    common = ["generate", f"--hf={tmp_path}", "--max_new_tokens=6", "--greedy", "--json"]
    results = []
    for prompt in (["--prompt=w7 w42 w3"], ["--prompt_ids=7,42,3"]):
        out = subprocess.run([sys.executable, "-m", "polyglot_jax", *common, *prompt], cwd=REPO,
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    by_text, by_ids = results
    assert by_text == by_ids
    ids = by_text["ids"]
    assert 1 <= len(ids) <= 6 and (len(ids) == 6 or ids[-1] == 95)  # stops only at the eos
    assert by_text["text"] == " ".join(words[i] for i in ids)
