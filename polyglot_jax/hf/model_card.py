"""The model card (`README.md`) that `to_hf` writes into a Hugging Face directory.

YAML front matter the Hub reads (language, license, library_name, pipeline_tag, tags), then what
the run directory records and nothing else: the architecture (config.json), the parameter count
(from the headers of the written safetensors files, not from the config), the training steps and
tokens (the checkpoint's step times batch_size x seq_len, per start of `config_history.jsonl` when
the batch changed on a resume), a summary of each tokenized directory's `manifest.json`, the last
training loss and held-out loss of `metrics.jsonl` at or before the exported step, the KoBEST
results of `polyglot-jax eval kobest` files (given, or found in the workdir) and how to load the
model with transformers. A piece that cannot be known is left out with a line saying so.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from polyglot_jax.errors import ConfigError, InputError
from polyglot_jax.model import ModelConfig

CARD = "README.md"
DEFAULT_LICENSE = "apache-2.0"  # the released Polyglot-Ko models' license, and this code's
TAGS = ("gpt_neox", "polyglot-ko", "polyglot-jax", "korean", "causal-lm")
# Where `eval kobest` results are looked for in a workdir (besides files passed explicitly).
EVAL_GLOBS = ("*.json", "eval/*.json")
_MAX_REPORT_BYTES = 256 * 2**20  # a KoBEST report with every prediction is a few MB
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


# ---------------------------------------------------------------- facts, each read on its own


def safetensors_parameter_count(hf_dir: str | os.PathLike) -> tuple[int, dict[str, int]]:
    """(parameters, {tensor name: elements}) of every `*.safetensors` file in `hf_dir`, read from
    the files' headers (the JSON after the 8-byte length), so the count is what was written."""
    counts: dict[str, int] = {}
    for file in sorted(pathlib.Path(hf_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= int(d)
                counts[name] = n
    return sum(counts.values()), counts


def _jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON-object lines of a file; a torn or foreign line is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def logged_metrics(workdir: pathlib.Path, step: int) -> tuple[dict | None, dict | None, bool]:
    """(the last `metrics.jsonl` record at or before `step`, the last one with `eval_loss`, whether
    the file exists)."""
    path = workdir / "metrics.jsonl"
    records = [r for r in _jsonl(path) if r["step"] <= step]
    train = next((r for r in reversed(records) if _number(r.get("loss"))), None)
    held_out = next((r for r in reversed(records) if _number(r.get("eval_loss"))), None)
    return train, held_out, path.is_file()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _batch_shape(config: Any) -> tuple[int, int] | None:
    """(train.batch_size, train.seq_len) of a config, when both are ints."""
    train = (config or {}).get("train") or {}
    batch, seq_len = train.get("batch_size"), train.get("seq_len")
    if _number(batch) and _number(seq_len) and int(batch) == batch and int(seq_len) == seq_len:
        return int(batch), int(seq_len)
    return None


def batch_shapes(workdir: pathlib.Path, config: Any, step: int) -> list[tuple[int, int, int]]:
    """[(first step, batch_size, seq_len)] of the starts that trained up to `step`: each start or
    resume of `config_history.jsonl` before `step` (the first from step 0), else config.json's;
    [] when neither says."""
    starts = [
        (r["step"], _batch_shape(r.get("config")))
        for r in _jsonl(workdir / "config_history.jsonl")
        if r["step"] < step
    ]
    if starts and all(shape is not None for _, shape in starts):
        starts[0] = (0, starts[0][1])
        return [(s, *shape) for s, shape in starts]
    shape = _batch_shape(config)
    return [] if shape is None else [(0, *shape)]


def training_tokens(workdir: pathlib.Path, config: Any, step: int) -> tuple[int | None, str]:
    """(tokens trained on up to `step`, how they were counted): steps x batch_size x seq_len of
    each start (`batch_shapes`)."""
    shapes = batch_shapes(workdir, config, step)
    if not shapes:
        return None, ""
    ends = [s for s, _, _ in shapes[1:]] + [step]
    total = sum((end - s) * b * n for (s, b, n), end in zip(shapes, ends, strict=True))
    if len({(b, n) for _, b, n in shapes}) == 1:
        _, b, n = shapes[0]
        return total, f"{step:,} steps x {b:,} sequences x {n:,} tokens"
    pieces = ", ".join(
        f"steps {s + 1:,}-{end:,}: {b:,} x {n:,}"
        for (s, b, n), end in zip(shapes, ends, strict=True)
    )
    return total, f"the batch changed on a resume (config_history.jsonl): {pieces}"


def manifest_summary(directory: str, tokenizer_sha256: str | None = None) -> str:
    """One line about a tokenized directory (named by its last two path components): its
    manifest's counts and whether the exported tokenizer made it, or why they are missing."""
    if directory == "builtin":
        return (
            "`builtin`: the built-in Korean sample (konlpy's kolaw and kobill corpora, NSMC "
            "reviews); its manifest is not read here"
        )
    name = "/".join(pathlib.PurePath(directory).parts[-2:]) or directory
    path = pathlib.Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"`{name}`: its manifest.json is not there any more; counts not known"
    except (OSError, ValueError) as e:
        return f"`{name}`: manifest.json not readable ({type(e).__name__}); counts not known"
    if not isinstance(manifest, dict):
        return f"`{name}`: manifest.json is not a JSON object; counts not known"
    parts = [
        f"{manifest[key]:,} {key}"
        for key in ("documents", "tokens", "records")
        if _number(manifest.get(key))
    ]
    block = manifest.get("block_tokens")
    if _number(block):
        parts.append(f"blocks of {block:,} tokens")
    made = manifest.get("tokenizer_sha256")
    if tokenizer_sha256 is not None and isinstance(made, str):
        parts.append(
            "tokenized with the exported tokenizer"
            if made == tokenizer_sha256
            else f"tokenized with another tokenizer (sha256 `{made[:16]}`)"
        )
    return f"`{name}`: " + (", ".join(parts) if parts else "manifest.json holds no counts")


def kobest_report(path: pathlib.Path) -> dict[str, Any] | None:
    """The report an `eval kobest --out=FILE` wrote, or None when `path` is not one."""
    from polyglot_jax.eval.kobest import TASKS

    try:
        if path.stat().st_size > _MAX_REPORT_BYTES:
            return None
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    results = report.get("results") if isinstance(report, dict) else None
    if not isinstance(results, dict) or not results:
        return None
    for task, per_shot in results.items():
        if task not in TASKS or not isinstance(per_shot, dict) or not per_shot:
            return None
        for shots, metrics in per_shot.items():
            if not str(shots).isdigit() or not isinstance(metrics, dict):
                return None
            if not _number(metrics.get("f1")) or not _number(metrics.get("acc")):
                return None
    return report


def find_kobest_reports(
    workdir: pathlib.Path, given: Iterable[str | os.PathLike] = ()
) -> list[tuple[pathlib.Path, dict[str, Any]]]:
    """The `given` report files (InputError when one is not a KoBEST report), then those found
    under the workdir (`EVAL_GLOBS`), each once."""
    found: dict[pathlib.Path, dict[str, Any]] = {}
    for path in map(pathlib.Path, given):
        report = kobest_report(path)
        if report is None:
            raise InputError(f"{path} is not a result file of `polyglot-jax eval kobest`")
        found.setdefault(path.resolve(), report)
    for pattern in EVAL_GLOBS:
        for path in sorted(workdir.glob(pattern)):
            if path.name == "config.json" or path.resolve() in found:
                continue
            if (report := kobest_report(path)) is not None:
                found[path.resolve()] = report
    return list(found.items())


# ---------------------------------------------------------------- the card


def check_card_inputs(
    license: str | None = None, eval_results: Sequence[str | os.PathLike] = ()
) -> None:
    """ConfigError for a license that is no Hub license id, InputError for a given results file
    that is not a KoBEST report: what `to_hf` checks before converting anything."""
    if license is not None and not (isinstance(license, str) and _LICENSE.fullmatch(license)):
        raise ConfigError(
            f"license {license!r} is not a Hub license id (lowercase, like apache-2.0 or mit)"
        )
    for path in map(pathlib.Path, eval_results):
        if kobest_report(path) is None:
            raise InputError(f"{path} is not a result file of `polyglot-jax eval kobest`")


def _front_matter(license: str) -> list[str]:
    return [
        "---",
        "language:",
        "- ko",
        f"license: {license}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {tag}" for tag in TAGS),
        "---",
    ]


def _architecture(cfg: ModelConfig, dtype: str, tokenizer_ids: int | None) -> list[str]:
    vocab = f"{cfg.vocab_size:,}"
    if tokenizer_ids is not None and tokenizer_ids != cfg.vocab_size:
        vocab += f" (the tokenizer's {tokenizer_ids:,} ids, padded)"
    rows = [
        ("architecture", "GPT-NeoX (`GPTNeoXForCausalLM`), parallel residual, untied embeddings"),
        ("layers", f"{cfg.num_layers}"),
        ("d_model (hidden size)", f"{cfg.d_model:,}"),
        ("attention heads", f"{cfg.num_heads} x {cfg.head_dim} dims"),
        ("d_ff (MLP inner size)", f"{cfg.d_ff:,}"),
        (
            "rotary dims",
            f"{cfg.rotary_dim} of {cfg.head_dim} per head (rotary_pct "
            f"{cfg.rotary_dim / cfg.head_dim:g}), base {cfg.rope_base:g}",
        ),
        ("vocabulary", vocab),
        ("context length", f"{cfg.max_len:,} tokens"),
        ("weights", dtype),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _parameters(hf_dir: pathlib.Path) -> list[str]:
    total, counts = safetensors_parameter_count(hf_dir)
    embeddings = counts.get("gpt_neox.embed_in.weight", 0)
    output = counts.get("embed_out.weight", 0)
    return [
        f"**{total:,} parameters** (counted in the safetensors files): {embeddings:,} in the input "
        f"embedding, {output:,} in the output projection, {total - embeddings - output:,} in the "
        "transformer layers and final LayerNorm."
    ]


def _training(workdir: pathlib.Path, config: Any, step: int, train: dict | None) -> list[str]:
    t = config.get("train") or {}
    lines = []
    planned = t.get("steps")
    of_planned = f" of the {planned:,} planned" if _number(planned) and planned != step else ""
    lines.append(f"- steps: **{step:,}**{of_planned} (the exported checkpoint)")
    shapes = batch_shapes(workdir, config, step)
    if shapes:
        _, batch, seq_len = shapes[-1]
        lines.append(
            f"- batch: {batch:,} sequences of {seq_len:,} tokens ({batch * seq_len:,} tokens per "
            "step" + (", since the last resume)" if len({x[1:] for x in shapes}) > 1 else ")")
        )
    tokens, how = training_tokens(workdir, config, step)
    if tokens is None:
        lines.append("- training tokens: not known (config.json has no train.batch_size/seq_len)")
    else:
        lines.append(f"- training tokens: **{tokens:,}** ({how})")
    if train is not None and _number(train.get("epoch")):
        lines.append(f"- epochs of the training data: {train['epoch']:.3f} (metrics.jsonl)")
    if t.get("init_from"):
        lines.append(
            "- continued from the parameters of another run (`train.init_from`): its steps and "
            "tokens are not counted here"
        )
    optimizer = [
        f"{k} {t[k]:g}"
        for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "clip_norm")
        if _number(t.get(k))
    ]
    if optimizer:
        decay = f", {t['decay']} decay" if isinstance(t.get("decay"), str) else ""
        lines.append(f"- optimizer: AdamW{decay}; " + ", ".join(optimizer))
    return lines


def _data(config: Any, tokenizer_sha256: str | None) -> list[str]:
    d = config.get("data") or {}
    shards = d.get("shards") or ()
    shards = [shards] if isinstance(shards, str) else list(shards)
    if not shards:
        return ["The run's config names no training data (config.data.shards)."]
    weights = list(d.get("weights") or ())
    lines = []
    for i, directory in enumerate(shards):
        share = f" (weight {weights[i]:g})" if i < len(weights) and _number(weights[i]) else ""
        lines.append(f"- {manifest_summary(str(directory), tokenizer_sha256)}{share}")
    if len(shards) > 1 and not weights:
        lines.append("- directories mixed in proportion to their size")
    if isinstance(d.get("mode"), str):
        lines.append(f"- sequences built by `{d['mode']}`")
    e = config.get("eval") or {}
    held_out = e.get("data") or ()
    held_out = [held_out] if isinstance(held_out, str) else list(held_out)
    for directory in held_out:
        summary = manifest_summary(str(directory), tokenizer_sha256)
        lines.append(f"- held-out (evaluation only): {summary}")
    if _number(e.get("holdout_fraction")) and e["holdout_fraction"] > 0:
        lines.append(
            f"- held out of training: {e['holdout_fraction']:g} of the documents (by a seeded "
            "hash of their content)"
        )
    return lines


def _results(
    train: dict | None, held_out: dict | None, has_metrics: bool, step: int, eval_every: Any
) -> list[str]:
    lines = []
    if train is None:
        why = "holds no record" if has_metrics else "is missing"
        lines.append(
            f"The workdir's metrics.jsonl {why} up to step {step}: the final loss is not known."
        )
    else:
        at = f"step {train['step']:,}" + (
            "" if train["step"] == step else " (the last record before the exported step)"
        )
        lines.append(f"- final training loss: **{train['loss']:.4f}** at {at}")
    if held_out is not None:
        extra = []
        if _number(held_out.get("eval_perplexity")):
            extra.append(f"perplexity {held_out['eval_perplexity']:.2f}")
        if _number(held_out.get("eval_tokens")):
            extra.append(f"{held_out['eval_tokens']:,} held-out tokens")
        extra_text = f" ({', '.join(extra)})" if extra else ""
        earlier = "" if held_out["step"] == step else " (the last evaluation before the export)"
        lines.append(
            f"- held-out loss: **{held_out['eval_loss']:.4f}**{extra_text} at step "
            f"{held_out['step']:,}{earlier}"
        )
    elif train is not None:
        off = " (config.eval.eval_every = 0)" if not eval_every else ""
        lines.append(f"- held-out loss: none logged up to step {step:,}{off}")
    return lines


def _evaluated_on(report: dict[str, Any], step: int) -> str:
    model = str(report.get("model", ""))
    found = re.search(r"\bstep=(\d+)", model)
    if model.startswith("workdir=") and found:
        n = int(found.group(1))
        return f"checkpoint step {n:,}" + ("" if n == step else " (not the exported step)")
    if model.startswith("workdir="):
        return "the workdir's latest checkpoint at the time"
    if model.startswith("hf="):
        return "a Hugging Face export"
    return "a model the file does not name"


def _kobest(reports: Sequence[tuple[pathlib.Path, dict[str, Any]]], step: int) -> list[str]:
    if not reports:
        return [
            "No KoBEST results: none were passed to `to-hf` and the workdir holds no "
            "`polyglot-jax eval kobest` result file (`WORKDIR/eval/*.json` is looked at)."
        ]
    lines = []
    for path, report in reports:
        prompt = report.get("sentineg_prompt")
        notes = [f"evaluated on {_evaluated_on(report, step)}"]
        if isinstance(report.get("dtype"), str):
            notes.append(f"computed in {report['dtype']}")
        if isinstance(prompt, str) and "sentineg" in report["results"]:
            notes.append(f"SentiNeg prompt `{prompt}`")
        lines += [
            f"`{path.name}` ({'; '.join(notes)}):",
            "",
            "| task | shots | macro F1 | accuracy | acc_norm | documents |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for task, per_shot in report["results"].items():
            for shots in sorted(per_shot, key=int):
                m = per_shot[shots]
                norm = f"{m['acc_norm']:.4f}" if _number(m.get("acc_norm")) else ""
                docs = f"{m['documents']:,}" if _number(m.get("documents")) else ""
                lines.append(
                    f"| {task} | {shots} | {m['f1']:.4f} | {m['acc']:.4f} | {norm} | {docs} |"
                )
        lines.append("")
    return lines[:-1]


def _usage(name: str, has_tokenizer: bool, vocab_size: int) -> list[str]:
    if not has_tokenizer:
        ids = [i % vocab_size for i in (5, 17, 9)]
        return [
            "This export has no tokenizer (the run named none): feed token ids.",
            "",
            "```python",
            "import torch",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")  # or its Hub repo id',
            f"print(model.generate(torch.tensor([{ids}]), max_new_tokens=16)[0].tolist())",
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # or its Hub repo id',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'ids = tokenizer("대한민국의 수도는", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))",
        "```",
        "",
        "The tokenizer files load with transformers 4.x and 5.x alike.",
    ]


def _exported_eos(hf_dir: pathlib.Path) -> str | None:
    """The eos token the exported tokenizer files name, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((hf_dir / name).read_text(encoding="utf-8")).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def render_model_card(
    hf_dir: pathlib.Path,
    workdir: pathlib.Path,
    config: Any,
    cfg: ModelConfig,
    *,
    name: str,
    step: int,
    dtype: str,
    tokenizer: pathlib.Path | None = None,
    eos_id: int | None = None,
    license: str | None = None,
    eval_results: Sequence[str | os.PathLike] = (),
) -> str:
    """The card's text (see the module docstring); `hf_dir` holds the written safetensors files,
    `config` is the run's config (a ConfigDict or dict)."""
    check_card_inputs(license, eval_results)
    if hasattr(config, "to_dict"):  # a ConfigDict
        config = config.to_dict()
    given_license = license is not None
    license = DEFAULT_LICENSE if license is None else license
    tokenizer_ids, tokenizer_sha256, tokenizer_lines = None, None, []
    if tokenizer is not None:
        from polyglot_jax.data.tokenizer import load_tokenizer

        loaded = load_tokenizer(tokenizer)
        tokenizer_ids, tokenizer_sha256 = loaded.vocab_size, loaded.sha256
        kind = type(loaded.tokenizer.model).__name__  # BPE, WordLevel, ...
        tokenizer_lines = [
            f"{kind}, {loaded.vocab_size:,} ids (tokenizer.json sha256 "
            f"`{loaded.sha256[:16]}`); the model's eos is `{loaded.eos_token}` = id "
            f"{loaded.eos_id} (config.json, generation_config.json)."
        ]
        named = _exported_eos(hf_dir)
        if named is not None and named != loaded.eos_token:
            tokenizer_lines += [
                "",
                f"The tokenizer's own files name `{named}` as its eos token (kept as the tokenizer "
                f"came); generation stops at `{loaded.eos_token}`.",
            ]
    else:
        tokenizer_lines = ["The run named no tokenizer: this export has none."]
        if eos_id is not None:
            tokenizer_lines[0] += f" config.json's eos id is {eos_id}."
    train, held_out, has_metrics = logged_metrics(workdir, step)
    reports = find_kobest_reports(workdir, eval_results)
    license_line = (
        f"{license}."
        if given_license
        else f"{license}: the default of polyglot-jax exports (the run gave none), the license "
        "of the released Polyglot-Ko models. Check it against the training data's licenses."
    )
    sections = [
        *_front_matter(license),
        "",
        f"# {name}",
        "",
        "A Korean causal language model of the Polyglot-Ko family (GPT-NeoX), trained with "
        f"polyglot-jax (JAX/Flax) and exported at step {step:,}.",
        "",
        "## Architecture",
        "",
        *_architecture(cfg, dtype, tokenizer_ids),
        "",
        *_parameters(hf_dir),
        "",
        "## Tokenizer",
        "",
        *tokenizer_lines,
        "",
        "## Training",
        "",
        *_training(workdir, config, step, train),
        "",
        "### Data",
        "",
        *_data(config, tokenizer_sha256),
        "",
        "## Results",
        "",
        *_results(train, held_out, has_metrics, step, (config.get("eval") or {}).get("eval_every")),
        "",
        "### KoBEST",
        "",
        *_kobest(reports, step),
        "",
        "## How to use",
        "",
        *_usage(name, tokenizer is not None, cfg.vocab_size),
        "",
        "## License",
        "",
        license_line,
        "",
    ]
    return "\n".join(sections)


def write_model_card(
    hf_dir: pathlib.Path,
    workdir: pathlib.Path,
    config: Any,
    cfg: ModelConfig,
    *,
    name: str,
    step: int,
    dtype: str,
    tokenizer: pathlib.Path | None = None,
    eos_id: int | None = None,
    license: str | None = None,
    eval_results: Sequence[str | os.PathLike] = (),
) -> pathlib.Path:
    """Writes `hf_dir/README.md` (`render_model_card`) and returns its path."""
    text = render_model_card(
        hf_dir,
        workdir,
        config,
        cfg,
        name=name,
        step=step,
        dtype=dtype,
        tokenizer=tokenizer,
        eos_id=eos_id,
        license=license,
        eval_results=eval_results,
    )
    path = pathlib.Path(hf_dir) / CARD
    path.write_text(text, encoding="utf-8")
    return path
