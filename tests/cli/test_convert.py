"""`polyglot-jax convert to-hf / from-hf` as a user runs them: outputs, --verify, one-line errors."""

import json
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import transformers
from hf_reference import require_torch

from polyglot_jax.checkpoint import Checkpointer
from polyglot_jax.config import base_config
from polyglot_jax.model import ModelConfig, abstract_params

torch = require_torch()

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = dict(
    vocab_size=64, num_layers=2, d_model=32, d_ff=96, num_heads=2, rotary_dim=8, max_len=32
)


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "convert", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory with one checkpoint of random parameters (LayerNorms and biases too)."""
    config = base_config()
    config.model.update(MODEL)
    cfg = ModelConfig.from_config(config.model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda b: (0.3 * rng.standard_normal(b.value.shape)).astype(np.float32),
        abstract_params(cfg),
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    directory = tmp_path_factory.mktemp("run")
    ckpt = Checkpointer(directory, keep=1, keep_period=None, async_save=False)
    ckpt.save(3, params, {"count": np.zeros((), np.int32)}, None)
    ckpt.close()
    (directory / "config.json").write_text(config.to_json_best_effort(indent=2))
    return directory


def _verified_difference(stdout: str) -> float:
    match = re.search(r"verify: max \|logits difference\| = (\S+)", stdout)
    assert match, stdout
    return float(match.group(1))


def test_to_hf_then_from_hf_with_verify(workdir, tmp_path):
    hf = tmp_path / "hf"
    out = _run("to-hf", f"--workdir={workdir}", f"--out={hf}", "--dtype=float32", "--verify")
    assert out.returncode == 0, out.stderr
    assert _verified_difference(out.stdout) <= 1e-4
    assert "step 3" in out.stdout
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]

    # `generate --workdir` reads the same checkpoint: its greedy ids are transformers' on the export
    prompt = [5, 17, 9]
    gen = subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "generate", f"--workdir={workdir}", "--greedy",
         "--prompt_ids=5,17,9", "--max_new_tokens=8", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    model = transformers.GPTNeoXForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        want = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None
        )  # fmt: skip
    assert json.loads(gen.stdout)["ids"] == want[0, len(prompt) :].tolist()

    back = tmp_path / "back"
    out = _run("from-hf", f"--hf={hf}", f"--out={back}", "--verify")
    assert out.returncode == 0, out.stderr
    assert _verified_difference(out.stdout) <= 1e-4
    assert f"--config.train.init_from={back}" in out.stdout
    assert (back / "checkpoints" / "0" / "params").is_dir() and (back / "config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "say which way"),
        (["to-hf", "--out=X"], "--workdir is required"),
        (["to-hf", "--workdir={run}", "--out={tmp}/o", "--step=9"], "no checkpoint for step 9"),
        (["to-hf", "--workdir={run}", "--out={run}/checkpoints"], "lies inside the input"),
        (["to-hf", "--workdir={run}", "--out={tmp}/o", "--dtype=int8"], "int8"),
        (["from-hf", "--hf={run}", "--out={tmp}/o"], "missing the field 'hidden_size'"),
    ],
)
def test_bad_input_is_one_line_exit_2(workdir, tmp_path, args, message):
    out = _run(*(a.format(run=workdir, tmp=tmp_path) for a in args))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()
