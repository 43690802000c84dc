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
