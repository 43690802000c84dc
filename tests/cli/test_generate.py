"""`polyglot-jax generate --json` prints what the contract says, from a HF directory."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import random_hf_model, require_torch
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
    assert (
        bad.returncode == 2
        and "exactly one of --prompt, --prompt_ids and --prompts_file" in bad.stderr
    )


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


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "polyglot_jax", "generate", *args], cwd=REPO,
        capture_output=True, text=True,
    )  # fmt: skip


def test_workdir_from_hf_prompts_file_matches_transformers(tmp_path):
    """HF dir -> `from-hf` workdir -> `generate --workdir --dtype=float32 --prompts_file`: each
    line's greedy ids and log-probabilities are transformers' on the original weights, with
    prompts of different lengths sharing batches (--batch_size=2)."""
    torch = require_torch()

    from polyglot_jax.generate_weights import load_from_workdir
    from polyglot_jax.hf.convert import from_hf

    cfg = ModelConfig(
        vocab_size=96, num_layers=2, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=64
    )
    model = random_hf_model(cfg, seed=1, std=0.5)
    model.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "run", show_progress=False)
    assert load_from_workdir(tmp_path / "run")[0].dtype == "bfloat16"  # the run's compute dtype
    prompts = [[4, 8, 15, 16, 23, 42], [7], list(range(40, 58))]
    lines = [json.dumps({"prompt_ids": p}) for p in prompts]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    out = _run(f"--workdir={tmp_path / 'run'}", f"--prompts_file={tmp_path / 'prompts.jsonl'}",
               "--max_new_tokens=8", "--greedy", "--dtype=float32", "--batch_size=2", "--json",
               "--eos_id=-1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == 3
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=8, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        ids = hf.sequences[0, len(prompt) :].tolist()
        want = [
            torch.log_softmax(s[0].double(), -1)[t].item()
            for s, t in zip(hf.logits, ids, strict=True)
        ]
        assert result["ids"] == ids and result["finish"] == "length"
        np.testing.assert_allclose(result["logprobs"], want, atol=1e-4)


def test_samples_and_stop_text(tmp_path):
    """--num_samples lists every sample under "samples"; --stop text (encoded with the tokenizer)
    ends a completion right after its first occurrence."""
    cfg = ModelConfig(
        vocab_size=96, num_layers=1, d_model=32, d_ff=64, num_heads=2, rotary_dim=8, max_len=32
    )
    random_hf_model(cfg, std=0.5).save_pretrained(tmp_path)
    words = _word_tokenizer(tmp_path, 96)
    common = [
        f"--hf={tmp_path}",
        "--prompt=w7 w42 w3",
        "--max_new_tokens=10",
        "--json",
        "--eos_id=-1",
    ]
    out = _run(*common, "--num_samples=3", "--seed=4", "--top_k=20")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["samples"]) == 3 and result["ids"] == result["samples"][0]["ids"]
    assert all(len(s["ids"]) == 10 and s["text"] == " ".join(words[i] for i in s["ids"])
               for s in result["samples"])  # fmt: skip
    free = json.loads(_run(*common, "--greedy").stdout)["ids"]
    stop = words[free[3]]
    cut = json.loads(_run(*common, "--greedy", f"--stop={stop}").stdout)
    assert cut["ids"] == free[: free.index(free[3]) + 1] and cut["finish"] == "stop"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt_ids=1", "--top_p=0"], r"--top_p=0.0 must be within (0, 1]"),
        (["--prompt_ids=1", "--top_p=1.5"], r"--top_p=1.5 must be within (0, 1]"),
        (["--prompt_ids=1", "--top_p=nan"], r"--top_p=nan must be within (0, 1]"),
        (["--prompt_ids=1", "--top_k=-2"], "--top_k=-2 must be an int >= 0"),
        (["--prompt_ids=1", "--repetition_penalty=0"], "--repetition_penalty=0.0 must be"),
        (["--prompt_ids=1", "--num_samples=0"], "--num_samples=0 must be a positive int"),
        (
            ["--prompt_ids=1", "--min_new_tokens=50"],
            "--min_new_tokens=50 exceeds max_new_tokens=32",
        ),
        (["--prompt_ids=1", "--dtype=int8"], "--dtype=int8"),
        (["--prompt_ids=1", "--batch_size=0"], "--batch_size=0 must be a positive int"),
        (
            ["--prompt_ids=1", "--prompt=x"],
            "exactly one of --prompt, --prompt_ids and --prompts_file",
        ),
        (["--prompts_file={dir}/none.jsonl"], "none.jsonl"),
        (["--prompts_file={dir}/bad.jsonl"], "bad.jsonl:2: give exactly one of"),
    ],
)
def test_bad_sampling_flags_are_one_line_before_loading(tmp_path, flags, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt_ids": [1]}\n{"text": "x"}\n')
    out = _run(f"--hf={tmp_path}", *[f.format(dir=tmp_path) for f in flags])
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
