"""The model card (README.md) `to_hf` writes, its numbers checked against independent readings:
transformers' count of the exported model's parameters, metrics.jsonl / config_history.jsonl /
manifest.json read here, and the YAML front matter parsed by PyYAML.

The run is real: a few steps of the tiny config with held-out evaluation, resumed with a larger
batch, so every file the card reads is the trainer's own.
"""

import json
import pathlib
import re
import shutil

import pytest
import yaml
from hf_reference import require_torch
from train_fixtures import tiny_config, tiny_shards
from transformers import AutoModelForCausalLM

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.hf import convert, model_card
from polyglot_jax.train import train

KOBEST = {  # what `polyglot-jax eval kobest --out=FILE` writes (predictions cut short)
    "model": "workdir=RUN step=8",
    "dtype": "float32",
    "sentineg_prompt": "harness",
    "results": {
        "copa": {
            "0": {"acc": 0.5, "f1": 0.4987, "documents": 4},
            "5": {"acc": 0.75, "f1": 0.7333, "documents": 4},
        },
        "hellaswag": {"0": {"acc": 0.25, "f1": 0.2, "documents": 4, "acc_norm": 0.5}},
    },
    "predictions": {"copa": {"0": [{"pred": 0, "gold": 1, "loglikelihoods": [-3.0, -4.0]}]}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps of 16 x 32 tokens, evaluated at 3 and 6, then resumed to 8 with 32 x 32; a KoBEST
    result file under eval/."""
    shards = tiny_shards(tmp_path_factory.mktemp("cache"))
    workdir = tmp_path_factory.mktemp("run") / "run"
    held_out = dict(eval__eval_every=3, eval__eval_batches=1, eval__holdout_fraction=0.5)
    train(tiny_config(shards, **held_out), workdir)
    more = dict(train__steps=8, train__batch_size=32, train__allow_config_change=True)
    train(tiny_config(shards, **held_out, **more), workdir)  # checkpoints 3, 6 and 8
    (workdir / "eval").mkdir()
    (workdir / "eval" / "kobest.json").write_text(json.dumps(KOBEST))
    return workdir, shards


def _records(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _number_after(card: str, label: str) -> str:
    match = re.search(re.escape(label) + r"\s*\*\*([0-9.,]+)\*\*", card)
    assert match, label
    return match.group(1)


def test_the_card_states_what_the_run_files_say(run, tmp_path):
    workdir, shards = run
    out = tmp_path / "polyglot-ko-tiny"
    convert.to_hf(workdir, out, show_progress=False)
    card = (out / "README.md").read_text(encoding="utf-8")

    meta = _front_matter(card)
    assert meta["language"] == ["ko"] and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "gpt_neox" in meta["tags"]
    assert card.count("\n# polyglot-ko-tiny\n") == 1

    torch = require_torch()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    assert f"**{parameters:,} parameters**" in card
    hf = json.loads((out / "config.json").read_text())
    for row in (
        f"| layers | {hf['num_hidden_layers']} |",
        f"| d_model (hidden size) | {hf['hidden_size']:,} |",
        f"| attention heads | {hf['num_attention_heads']} x "
        f"{hf['hidden_size'] // hf['num_attention_heads']} dims |",
        f"| d_ff (MLP inner size) | {hf['intermediate_size']:,} |",
        f"| context length | {hf['max_position_embeddings']:,} tokens |",
        "| weights | float16 |",
    ):
        assert row in card
    assert f"| vocabulary | {hf['vocab_size']:,}" in card
    rotary = round(hf["rotary_pct"] * hf["hidden_size"] // hf["num_attention_heads"])
    assert f"| rotary dims | {rotary} of " in card

    # Tokens: each start of config_history.jsonl, its batch x seq_len until the next one.
    starts = _records(workdir / "config_history.jsonl")
    assert [s["step"] for s in starts] == [0, 6]
    tokens = sum(
        (end - s["step"]) * s["config"]["train"]["batch_size"] * s["config"]["train"]["seq_len"]
        for s, end in zip(starts, [6, 8], strict=True)
    )
    assert _number_after(card, "- training tokens:") == f"{tokens:,}"
    assert _number_after(card, "- steps:") == "8"

    metrics = _records(workdir / "metrics.jsonl")
    last = metrics[-1]
    assert last["step"] == 8
    assert _number_after(card, "- final training loss:") == f"{last['loss']:.4f}"
    evaluated = [r for r in metrics if "eval_loss" in r][-1]
    assert _number_after(card, "- held-out loss:") == f"{evaluated['eval_loss']:.4f}"
    assert f"at step {evaluated['step']}" in card

    manifest = json.loads((shards / "manifest.json").read_text())
    named = f"{shards.parent.name}/{shards.name}"
    line = next(ln for ln in card.splitlines() if ln.startswith(f"- `{named}`: "))
    for key in ("documents", "tokens", "records"):
        assert f"{manifest[key]:,} {key}" in line
    assert line.endswith(", tokenized with the exported tokenizer")
    assert "held out of training: 0.5 of the documents" in card

    assert "`kobest.json` (evaluated on checkpoint step 8; computed in float32" in card
    assert "| copa | 5 | 0.7333 | 0.7500 |  | 4 |" in card
    assert "| hellaswag | 0 | 0.2000 | 0.2500 | 0.5000 | 4 |" in card
    assert "apache-2.0: the default of polyglot-jax exports (the run gave none)" in card


def test_the_card_snippet_runs(run, tmp_path):
    workdir, _ = run
    out = tmp_path / "hf"
    convert.to_hf(workdir, out, dtype="float32", show_progress=False)
    card = (out / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6
    code = code.replace('"hf"', repr(str(out))).replace("max_new_tokens=32", "max_new_tokens=3")
    require_torch()  # the snippet loads the model with transformers (torch)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the card's own snippet


def test_an_older_step_gets_its_own_numbers(run, tmp_path):
    workdir, _ = run
    convert.to_hf(workdir, tmp_path / "hf", step=3, show_progress=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    at_3 = next(r for r in _records(workdir / "metrics.jsonl") if r["step"] == 3)
    assert _number_after(card, "- final training loss:") == f"{at_3['loss']:.4f}"
    assert _number_after(card, "- held-out loss:") == f"{at_3['eval_loss']:.4f}"
    assert _number_after(card, "- training tokens:") == f"{3 * 16 * 32:,}"
    assert "- steps: **3** of the 8 planned" in card
    assert "evaluated on checkpoint step 8 (not the exported step)" in card


def test_missing_pieces_are_said_not_invented(run, tmp_path):
    workdir, _ = run
    bare = tmp_path / "run"
    shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("metrics.jsonl", "eval"))
    config = json.loads((bare / "config.json").read_text())
    tokenizer = pathlib.Path(config["data"]["shards"][0]).parent / "tokenizer"
    config["data"]["shards"] = [str(tmp_path / "gone")]
    config["data"]["tokenizer"] = str(tokenizer)
    (bare / "config.json").write_text(json.dumps(config))
    convert.to_hf(bare, tmp_path / "hf", license="cc-by-sa-4.0", show_progress=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert _front_matter(card)["license"] == "cc-by-sa-4.0"
    assert "\n## License\n\ncc-by-sa-4.0.\n" in card
    assert "metrics.jsonl is missing up to step 8: the final loss is not known" in card
    assert "held-out loss" not in card and "final training loss" not in card
    assert f"- `{tmp_path.name}/gone`: its manifest.json is not there any more; counts not " in card
    assert "No KoBEST results" in card


def test_without_evaluations_or_history(run, tmp_path):
    """No eval_* records (eval_every 0) and no config_history.jsonl: config.json's batch counts."""
    workdir, _ = run
    bare = tmp_path / "run"
    shutil.copytree(workdir, bare, ignore=shutil.ignore_patterns("config_history.jsonl"))
    records = [r for r in _records(workdir / "metrics.jsonl") if "eval_loss" not in r]
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = json.loads((bare / "config.json").read_text())
    config["eval"]["eval_every"] = 0
    (bare / "config.json").write_text(json.dumps(config))
    convert.to_hf(bare, tmp_path / "hf", show_progress=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "- held-out loss: none logged up to step 8 (config.eval.eval_every = 0)" in card
    t = config["train"]
    assert _number_after(card, "- training tokens:") == f"{8 * t['batch_size'] * t['seq_len']:,}"
    assert _number_after(card, "- final training loss:") == f"{records[-1]['loss']:.4f}"


def test_a_run_without_tokenizer(run, tmp_path):
    workdir, _ = run
    config = json.loads((workdir / "config.json").read_text())
    bare = tmp_path / "run"
    shutil.copytree(workdir, bare)
    config["data"]["shards"] = ["builtin"]
    (bare / "config.json").write_text(json.dumps(config))
    convert.to_hf(bare, tmp_path / "hf", show_progress=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "The run named no tokenizer: this export has none. config.json's eos id is 2." in card
    assert "AutoTokenizer" not in card and "torch.tensor([[5, 17, 9]])" in card
    assert "`builtin`: the built-in Korean sample" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    require_torch()  # the snippet loads the model with transformers (torch)
    exec(compile(code.replace('"hf"', repr(str(tmp_path / "hf"))), "README.md", "exec"), {})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"license": "Apache 2.0"}, ConfigError, r"license 'Apache 2\.0' is not a Hub license id"),
        ({"eval_results": ["config.json"]}, InputError, r"is not a result file of"),
    ],
)
def test_bad_card_inputs_fail_before_anything_is_written(run, tmp_path, kwargs, error, message):
    workdir, _ = run
    if "eval_results" in kwargs:
        kwargs = {"eval_results": [workdir / "config.json"]}
    with pytest.raises(error, match=message):
        convert.to_hf(workdir, tmp_path / "hf", show_progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_given_results_are_used_and_counted_once(run, tmp_path):
    workdir, _ = run
    given = workdir / "eval" / "kobest.json"
    convert.to_hf(workdir, tmp_path / "hf", eval_results=[given], show_progress=False)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert card.count("`kobest.json`") == 1


def test_parameter_count_reads_every_shard(run, tmp_path):
    workdir, _ = run
    convert.to_hf(workdir, tmp_path / "hf", max_shard_size="20KB", show_progress=False)
    files = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1
    total, _ = model_card.safetensors_parameter_count(tmp_path / "hf")
    require_torch()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert total == sum(p.numel() for p in model.parameters())
