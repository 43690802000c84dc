"""`polyglot-jax generate --json` prints what the contract says, from a HF directory."""

import json
import subprocess
import sys

from hf_reference import random_hf_model
from train_fixtures import REPO

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
