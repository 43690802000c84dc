"""Hostile and careless inputs through the real CLI, every subcommand: one line, the right code.

Each case runs `python -m polyglot_jax SUB ...` in a subprocess and asserts:
- the exit code: 2 for bad usage, config or input; 1 for I/O errors (unwritable place, disk full);
- stderr is exactly one line, `polyglot-jax SUB: error: ...`, naming the flag, field or path, and
  no traceback;
- the file system afterwards: the case's own directory (its inputs, the place of its output) is
  byte for byte what it was (no half-written output, no `.*.partial-*` or `*.tmp-*` left behind),
  and the shared fixtures it reads are unchanged.

The fixtures (a raw jsonl, two tokenizers, token shards, a two-step run, its HF export) are built
once per module through the CLI too. The cases run two at a time (the machine has 2 cores); each
parametrized test checks one case's recorded result. The first case of each subcommand and those
with a file-size limit run as fresh subprocesses; the others are forked from a server that has
already imported jax, flax, transformers... (`forked_cli.py`: the same `python -m polyglot_jax`
from the fork on, a second per case cheaper; it refuses to serve if those imports printed
anything, which a fresh process would show).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import queue
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PROG = "polyglot-jax"
ROOT = os.geteuid() == 0
# Permission bits do not stop root: there, /sys (where even root cannot create files) stands in
# for a read-only directory; elsewhere a chmod 0o555 directory of the case.
UNWRITABLE = "/sys" if ROOT else "{tmp}/readonly"
TIMEOUT = 240
WORKERS = 2
MODEL = (
    "--config=configs/tiny.py", "--config.model.d_model=64", "--config.model.d_ff=128",
    "--config.model.rotary_dim=8", "--config.model.vocab_size=512", "--config.train.seq_len=32",
    "--config.train.warmup_steps=1", "--config.train.log_every=1",
    "--config.train.checkpoint_every=2", "--config.data.shuffle_buffer=64",
    "--config.train.async_checkpoints=False",
)  # fmt: skip
TRAIN = (*MODEL, "--config.data.shards=('{tokens}',)", "--config.data.tokenizer={tok}")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _cli(sub: str, *args: str, fsize: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "polyglot_jax", sub, *args]
    if fsize is None:
        return command
    # RLIMIT_FSIZE makes a write past `fsize` bytes fail with EFBIG (SIGXFSZ ignored, as CPython
    # does anyway): a full disk without a root-only tmpfs. Set in a tiny exec wrapper, not in a
    # preexec_fn (unsafe with the thread pool).
    wrapper = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", wrapper, *command]


# ------------------------------------------------------------------------------ fixtures ---


def _docs() -> list[str]:
    from polyglot_jax.data.sample import builtin_corpus_texts

    return list(itertools.islice(builtin_corpus_texts(400), 400))


def _must(command: list[str]) -> None:
    done = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Shared read-only inputs, every one made by the CLI (but the raw documents)."""
    root = tmp_path_factory.mktemp("fixtures")
    fx = {name: root / name for name in ("raw", "tok", "tok_big", "tokens", "run", "hf")}
    fx["raw"] = root / "raw" / "raw.jsonl"
    fx["raw"].parent.mkdir()
    with open(fx["raw"], "w", encoding="utf-8") as f:
        for text in _docs():
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    def tokenizer(name: str, vocab: int) -> list[str]:
        return _cli("train-tokenizer", f"--input={fx['raw']}", f"--output={fx[name]}",
                    f"--vocab_size={vocab}", "--num_workers=1")  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(_must, tokenizer("tok_big", 1000))  # beside the chain below
        _must(tokenizer("tok", 400))
        _must(_cli("tokenize", f"--tokenizer={fx['tok']}", f"--input={fx['raw']}",
                   f"--output={fx['tokens']}", "--num_workers=1"))  # fmt: skip
        _must(_cli("train", *_fmt(TRAIN, fx), f"--workdir={fx['run']}", "--config.train.steps=2"))
        _must(_cli("convert", "to-hf", f"--workdir={fx['run']}", f"--out={fx['hf']}",
                   "--dtype=float32"))  # fmt: skip
        big.result()
    return fx


def _fmt(args, fx: dict[str, pathlib.Path], tmp: pathlib.Path | None = None) -> list[str]:
    names = {k: str(v) for k, v in fx.items()}
    names.update(tmp=str(tmp), repo=str(REPO), unwritable=UNWRITABLE.format(tmp=tmp))
    return [a.format(**names) for a in args]


def tree(path: pathlib.Path) -> dict[str, str]:
    """relative path -> sha256 of every file (`dir`, `link -> target` for the others) under path."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "special"
    return out


def _tree_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]


# ----------------------------------------------------------------------- case set-ups ---


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def config_file(name: str, body: str) -> Callable:
    return lambda tmp, fx: _write(tmp / name, body)


def copy(what: str, to: str = "") -> Callable:
    """Copies the fixture `what` into the case directory (for cases that could damage it)."""

    def setup(tmp, fx):
        src, dst = fx[what], tmp / (to or what)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)

    return setup


def both(*setups: Callable) -> Callable:
    def setup(tmp, fx):
        for s in setups:
            s(tmp, fx)

    return setup


def readonly_dir(tmp, fx):
    if not ROOT:
        (tmp / "readonly").mkdir()
        (tmp / "readonly").chmod(0o555)


def clean_input_dir(tmp, fx):
    (tmp / "data" / "in").mkdir(parents=True)
    shutil.copy2(fx["raw"], tmp / "data" / "in" / "raw.jsonl")


def edit_json(rel: str, edit: Callable[[dict], object]) -> Callable:
    def setup(tmp, fx):
        path = tmp / rel
        data = json.loads(path.read_text())
        data = edit(data) or data
        path.write_text(json.dumps(data))

    return setup


def setitem(**fields) -> Callable[[dict], None]:
    return lambda d: d.update(fields)


def truncate_shard(tmp, fx):
    shard = tmp / "tokens" / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def hf_index(weight_map) -> Callable:
    """The HF copy re-saved as a sharded checkpoint whose index has the given weight_map."""

    def setup(tmp, fx):
        copy("hf")(tmp, fx)
        hf = tmp / "hf"
        (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
        index = {"metadata": {}, "weight_map": weight_map}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))

    return setup


def stale_output(tmp, fx):
    """A finished tokenize output of another tokenizer: must be refused and kept."""
    shutil.copytree(fx["tokens"], tmp / "out")


# --------------------------------------------------------------------------------- cases ---


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    sub: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # what the error line must contain (formatted like args)
    code: int = 2
    setup: Callable | None = None
    fsize: int | None = None  # RLIMIT_FSIZE: the disk-full case
    # Relative paths that may appear under the case directory (a run directory that holds the
    # steps done before the disk filled up): nothing else, and no temporary or partial files.
    may_create: tuple[str, ...] = ()
    # A failure after work began (the disk filling up mid-run) follows that work's progress bar.
    after_progress: bool = False


def C(id, sub, args, names, code=2, **kw) -> Case:  # noqa: N802 - a table row
    return Case(
        id, sub, tuple(args), tuple([names] if isinstance(names, str) else names), code, **kw
    )


BAD_CONFIGS = {
    "syntax.py": "def get_config(:\n    pass\n",
    "raises.py": "def get_config():\n    raise ValueError('no such size: huge')\n",
    "none.py": "def get_config():\n    pass\n",
    "nogetconfig.py": "c = 1\n",
}

CASES = [
    # ---- the entry point
    C("unknown-subcommand", "bogus", [], "bogus"),
    # ---- sample-corpus
    C("sample-no-out", "sample-corpus", [], "--out"),
    C("sample-unknown-flag", "sample-corpus", ["--out={tmp}/o.jsonl", "--bogus=1"], "bogus"),
    C("sample-positional", "sample-corpus", ["--out={tmp}/o.jsonl", "extra"], "extra"),
    C("sample-nsmc-negative", "sample-corpus", ["--out={tmp}/o.jsonl", "--nsmc_limit=-2"], "--nsmc_limit"),
    C("sample-out-is-dir", "sample-corpus", ["--out={tmp}/d"], "{tmp}/d",
      setup=lambda tmp, fx: (tmp / "d").mkdir()),
    C("sample-out-parent-is-file", "sample-corpus", ["--out={tmp}/f/o.jsonl"], "{tmp}/f",
      setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("sample-out-unwritable", "sample-corpus", ["--out={unwritable}/o.jsonl"], "{unwritable}/o.jsonl",
      code=1, setup=readonly_dir),
    C("sample-disk-full", "sample-corpus", ["--out={tmp}/o.jsonl"], ["{tmp}/o.jsonl", "too large"],
      code=1, fsize=64 << 10),
    # ---- clean
    C("clean-positional", "clean", ["--input={raw}", "--output={tmp}/o", "extra"], "'extra'"),
    C("clean-no-input", "clean", ["--output={tmp}/o"], "--input"),
    C("clean-no-output", "clean", ["--input={raw}"], "--output"),
    C("clean-missing-input", "clean", ["--input={tmp}/nope.jsonl", "--output={tmp}/o"], "{tmp}/nope.jsonl"),
    C("clean-unknown-flag", "clean", ["--input={raw}", "--output={tmp}/o", "--min_charz=3"], "min_charz"),
    C("clean-bad-threshold", "clean", ["--input={raw}", "--output={tmp}/o", "--minhash_threshold=1.5"],
      "minhash_threshold"),
    C("clean-output-is-input-dir", "clean",
      ["--input={tmp}/data/in", "--output={tmp}/data/in", "--overwrite", "--noprogress"], "{tmp}/data/in",
      setup=clean_input_dir),
    C("clean-output-is-parent-of-input", "clean",
      ["--input={tmp}/data/in", "--output={tmp}/data", "--overwrite", "--noprogress"], "{tmp}/data",
      setup=clean_input_dir),
    C("clean-output-is-file", "clean", ["--input={raw}", "--output={tmp}/f", "--noprogress"], "{tmp}/f",
      setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("clean-bad-gzip", "clean", ["--input={tmp}/in.jsonl.gz", "--output={tmp}/o", "--noprogress"],
      "{tmp}/in.jsonl.gz", setup=lambda tmp, fx: _write(tmp / "in.jsonl.gz", "not gzip at all\n")),
    C("clean-output-unwritable", "clean", ["--input={raw}", "--output={unwritable}/o", "--noprogress"],
      "{unwritable}/o", code=1, setup=readonly_dir),
    C("clean-disk-full", "clean", ["--input={raw}", "--output={tmp}/o", "--noprogress"], ["{tmp}/o", "too large"],
      code=1, fsize=16 << 10),
    # ---- mesh-bench
    C("mesh-bench-no-config", "mesh-bench", ["--meshes=data:8", "--out={tmp}/m.json"], "--config"),
    C("mesh-bench-unknown-axis", "mesh-bench", ["--config=configs/tiny.py", "--devices=8", "--meshes=tensor:8", "--out={tmp}/m.json"],
      ["unknown mesh axis 'tensor'", "valid axes: data, fsdp, model, dcn_data"]),
    C("mesh-bench-not-all-devices", "mesh-bench", ["--config=configs/tiny.py", "--devices=8", "--meshes=data:3", "--out={tmp}/m.json"],
      ["uses 3 devices, not all 8", "e.g. data:8"]),
    C("mesh-bench-heads-not-dividing", "mesh-bench", ["--config=configs/tiny.py", "--devices=8", "--meshes=model:8", "--out={tmp}/m.json"],
      ["num_heads=4", "sizes that divide it: 1, 2, 4", "data:2,model:4"]),
    C("mesh-bench-out-dir-missing", "mesh-bench", ["--config=configs/tiny.py", "--devices=8", "--meshes=data:8", "--out={tmp}/nope/m.json"],
      "{tmp}/nope"),
    # ---- plan
    C("plan-no-config", "plan", ["--devices=8", "--device_kind=a100-40gb"], "--config"),
    C("plan-devices-0", "plan", ["--config=configs/tiny.py", "--devices=0", "--device_kind=a100-40gb"], "--devices=0"),
    C("plan-unknown-kind", "plan", ["--config=configs/tiny.py", "--devices=8", "--device_kind=a200"],
      ["'a200'", "a100-40gb", "tpu-v6e"]),
    C("plan-not-all-devices", "plan", ["--config=configs/tiny.py", "--devices=8", "--device_kind=a100-40gb", "--mesh=data:3"],
      ["uses 3 devices, not all 8"]),
    # ---- preprocess
    C("preprocess-no-input", "preprocess", ["--output={tmp}/o"], "--input"),
    C("preprocess-no-output", "preprocess", ["--input={raw}"], "--output"),
    C("preprocess-positional", "preprocess", ["--input={raw}", "--output={tmp}/o", "extra"], "'extra'"),
    C("preprocess-missing-input", "preprocess", ["--input={tmp}/nope.jsonl", "--output={tmp}/o", "--noprogress"], "{tmp}/nope.jsonl"),
    C("preprocess-unknown-flag", "preprocess", ["--input={raw}", "--output={tmp}/o", "--min_charz=3"], "min_charz"),
    C("preprocess-bad-threshold", "preprocess", ["--input={raw}", "--output={tmp}/o", "--minhash_threshold=1.5"], "minhash_threshold"),
    C("preprocess-missing-tokenizer", "preprocess", ["--input={raw}", "--output={tmp}/o", "--tokenizer={tmp}/nope"], "{tmp}/nope"),
    C("preprocess-bad-executor", "preprocess", ["--input={raw}", "--output={tmp}/o", "--executor=spark"], "--executor"),
    C("preprocess-slurm-no-tasks", "preprocess", ["--input={raw}", "--output={tmp}/o", "--executor=slurm"], "--tasks"),
    C("preprocess-block-tokens-0", "preprocess", ["--input={raw}", "--output={tmp}/o", "--tokenizer={tok}", "--block_tokens=0"], "--block_tokens"),
    C("preprocess-output-is-file", "preprocess", ["--input={raw}", "--output={tmp}/f", "--noprogress"], "{tmp}/f",
      setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("preprocess-output-not-empty", "preprocess", ["--input={raw}", "--output={tmp}/o", "--noprogress"], "{tmp}/o",
      setup=lambda tmp, fx: _write(tmp / "o" / "x", "x")),
    C("preprocess-output-is-input-dir", "preprocess",
      ["--input={tmp}/data/in", "--output={tmp}/data/in", "--overwrite", "--noprogress"], "{tmp}/data/in", setup=clean_input_dir),
    C("preprocess-bad-gzip", "preprocess", ["--input={tmp}/in.jsonl.gz", "--output={tmp}/o", "--noprogress"],
      "{tmp}/in.jsonl.gz", setup=lambda tmp, fx: _write(tmp / "in.jsonl.gz", "not gzip at all\n")),
    C("preprocess-output-unwritable", "preprocess", ["--input={raw}", "--output={unwritable}/o", "--noprogress"],
      "{unwritable}/o", code=1, setup=readonly_dir),
    # ---- train-tokenizer
    C("tok-no-input", "train-tokenizer", ["--output={tmp}/o"], "--input"),
    C("tok-no-output", "train-tokenizer", ["--input={raw}"], "--output"),
    C("tok-missing-input", "train-tokenizer", ["--input={tmp}/nope", "--output={tmp}/o"], "{tmp}/nope"),
    C("tok-output-is-input-dir", "train-tokenizer",
      ["--input={tmp}/data/in", "--output={tmp}/data/in", "--overwrite", "--vocab_size=400"],
      "{tmp}/data/in", setup=clean_input_dir),
    C("tok-output-is-file", "train-tokenizer", ["--input={raw}", "--output={tmp}/f", "--vocab_size=400"],
      "{tmp}/f", setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("tok-positional", "train-tokenizer", ["--input={raw}", "--output={tmp}/o", "--vocab_size=400", "extra"],
      "'extra'"),
    C("tok-output-unwritable", "train-tokenizer", ["--input={raw}", "--output={unwritable}/o", "--vocab_size=400",
      "--num_workers=1"], "{unwritable}/o", code=1, setup=readonly_dir),
    C("tok-disk-full", "train-tokenizer", ["--input={raw}", "--output={tmp}/o", "--vocab_size=400",
      "--num_workers=1"], ["{tmp}/o", "too large"], code=1, fsize=4 << 10),
    C("tok-vocab-too-small", "train-tokenizer", ["--input={raw}", "--output={tmp}/o", "--vocab_size=10"],
      "vocab_size"),
    C("tok-empty-input", "train-tokenizer", ["--input={tmp}/empty.jsonl", "--output={tmp}/o"],
      "{tmp}/empty.jsonl", setup=lambda tmp, fx: _write(tmp / "empty.jsonl", "")),
    C("tok-negative-max-documents", "train-tokenizer",
      ["--input={raw}", "--output={tmp}/o", "--max_documents=-1"], "--max_documents"),
    # ---- tokenize
    C("tokenize-no-tokenizer", "tokenize", ["--input={raw}", "--output={tmp}/o"], "--tokenizer"),
    C("tokenize-missing-tokenizer", "tokenize", ["--tokenizer={tmp}/nope", "--input={raw}", "--output={tmp}/o"],
      "{tmp}/nope"),
    C("tokenize-not-a-tokenizer", "tokenize", ["--tokenizer={tmp}/notok", "--input={raw}", "--output={tmp}/o"],
      "{tmp}/notok", setup=lambda tmp, fx: (tmp / "notok").mkdir()),
    C("tokenize-missing-input", "tokenize", ["--tokenizer={tok}", "--input={tmp}/nope.jsonl", "--output={tmp}/o"],
      "{tmp}/nope.jsonl"),
    C("tokenize-empty-input", "tokenize", ["--tokenizer={tok}", "--input={tmp}/empty.jsonl", "--output={tmp}/o"],
      "{tmp}/empty.jsonl", setup=lambda tmp, fx: _write(tmp / "empty.jsonl", "\n")),
    C("tokenize-block-tokens-0", "tokenize", ["--tokenizer={tok}", "--input={raw}", "--output={tmp}/o",
      "--block_tokens=0"], "block_tokens"),
    C("tokenize-positional", "tokenize", ["--tokenizer={tok}", "--input={raw}", "--output={tmp}/o", "x"],
      "'x'"),
    C("tokenize-shard-chars-0", "tokenize", ["--tokenizer={tok}", "--input={raw}", "--output={tmp}/o",
      "--shard_chars=0"], "shard_chars"),
    C("tokenize-output-is-file", "tokenize", ["--tokenizer={tok}", "--input={raw}", "--output={tmp}/f"],
      "{tmp}/f", setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("tokenize-output-of-another-tokenizer", "tokenize",
      ["--tokenizer={tok_big}", "--input={raw}", "--output={tmp}/out", "--num_workers=1"], "{tmp}/out",
      setup=stale_output),
    C("tokenize-output-unwritable", "tokenize", ["--tokenizer={tok}", "--input={raw}", "--output={unwritable}/o"],
      "{unwritable}/o", code=1, setup=readonly_dir),
    C("tokenize-disk-full", "tokenize",
      ["--tokenizer={tok}", "--input={raw}", "--output={tmp}/o", "--num_workers=1"], ["{tmp}/o", "too large"],
      code=1, fsize=32 << 10),
    # ---- info
    C("info-no-config", "info", [], "--config"),
    C("info-devices-0", "info", ["--config=configs/tiny.py", "--devices=0"], "--devices=0"),
    C("info-devices-negative", "info", ["--config=configs/tiny.py", "--devices=-3"], "--devices=-3"),
    C("info-heads-not-dividing", "info", ["--config=configs/tiny.py", "--config.model.num_heads=3"],
      "num_heads"),
    C("info-unknown-attention", "info", ["--config=configs/tiny.py", "--config.model.attention_impl=magic"],
      "attention_impl"),
    C("info-positional", "info", ["--config=configs/tiny.py", "extra"], "'extra'"),
    C("info-variant-not-accepted", "info", ["--config=configs/tiny.py:huge"], "tiny.py"),
    C("info-override-wrong-type", "info", ["--config=configs/tiny.py", "--config.model.num_layers=two"],
      "num_layers"),
    # ---- train: config files and overrides
    C("train-no-config", "train", ["--workdir={tmp}/w"], "--config"),
    C("train-no-workdir", "train", ["--config=configs/tiny.py"], "--workdir"),
    C("train-config-missing", "train", ["--config={tmp}/nope.py", "--workdir={tmp}/w"], "{tmp}/nope.py"),
    *(
        C(f"train-config-{name[:-3]}", "train", [f"--config={{tmp}}/{name}", "--workdir={tmp}/w"],
          f"{{tmp}}/{name}", setup=config_file(name, body))
        for name, body in BAD_CONFIGS.items()
    ),
    C("train-lr-negative", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.lr=-1"], "train.lr"),
    C("train-lr-nan", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.lr=nan"], "train.lr"),
    C("train-b1-1.5", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.b1=1.5"], "train.b1"),
    C("train-eps-0", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.eps=0"], "train.eps"),
    C("train-weight-decay-negative", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.weight_decay=-0.1"],
      "train.weight_decay"),
    C("train-steps-0", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.steps=0"], "train.steps"),
    C("train-unknown-field", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.lrr=1"], "lrr"),
    C("train-unknown-flag", "train", [*TRAIN, "--workdir={tmp}/w", "--workdirr={tmp}/x"], "workdirr"),
    # ---- train: the workdir and the data
    C("train-workdir-is-file", "train", [*TRAIN, "--workdir={tmp}/f", "--config.train.steps=2"], "{tmp}/f",
      setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("train-positional", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.steps=1", "extra"],
      "'extra'"),
    C("train-disk-full", "train", [*TRAIN, "--workdir={tmp}/w", "--config.train.steps=2"],
      ["{tmp}/w", "too large"], code=1, fsize=64 << 10, may_create=("w",), after_progress=True),
    C("train-workdir-unwritable", "train", [*TRAIN, "--workdir={unwritable}/w", "--config.train.steps=2"],
      "{unwritable}/w", code=1, setup=readonly_dir),
    C("train-resume-other-d-model", "train",
      [*TRAIN, "--workdir={tmp}/run", "--config.train.steps=4", "--config.model.d_model=32"], "d_model",
      setup=copy("run")),
    C("train-resume-other-batch", "train",
      [*TRAIN, "--workdir={tmp}/run", "--config.train.steps=4", "--config.train.batch_size=8"], "batch_size",
      setup=copy("run")),
    C("train-resume-other-shuffle", "train",
      [*TRAIN, "--workdir={tmp}/run", "--config.train.steps=4", "--config.data.shuffle_buffer=32"],
      "shuffle_buffer", setup=copy("run")),
    C("train-shards-missing", "train",
      [*MODEL, "--workdir={tmp}/w", "--config.data.shards=('{tmp}/nope',)", "--config.train.steps=2"],
      "{tmp}/nope"),
    C("train-manifest-wrong-type", "train",
      [*MODEL, "--workdir={tmp}/w", "--config.data.shards=('{tmp}/tokens',)", "--config.train.steps=2"],
      ["manifest.json", "documents"],
      setup=both(copy("tokens"), edit_json("tokens/manifest.json", setitem(documents="400")))),
    C("train-manifest-shards-not-list", "train",
      [*MODEL, "--workdir={tmp}/w", "--config.data.shards=('{tmp}/tokens',)", "--config.train.steps=2"],
      ["manifest.json", "shards"],
      setup=both(copy("tokens"), edit_json("tokens/manifest.json", setitem(shards={"a": 1})))),
    C("train-truncated-shard", "train",
      [*MODEL, "--workdir={tmp}/w", "--config.data.shards=('{tmp}/tokens',)", "--config.train.steps=2"],
      "shard-00000.array_record", setup=both(copy("tokens"), truncate_shard)),
    C("train-vocab-below-shards", "train",
      [*TRAIN, "--workdir={tmp}/w", "--config.model.vocab_size=256", "--config.train.steps=2"],
      "vocab_size"),
    # ---- generate
    C("generate-neither-source", "generate", ["--prompt_ids=1,2"], ["--workdir", "--hf"]),
    C("generate-both-sources", "generate", ["--workdir={run}", "--hf={hf}", "--prompt_ids=1,2"],
      ["--workdir", "--hf"]),
    C("generate-no-prompt", "generate", ["--workdir={run}"], "--prompt"),
    C("generate-temperature-nan", "generate", ["--workdir={run}", "--prompt_ids=1,2", "--temperature=nan"],
      "--temperature"),
    C("generate-temperature-0", "generate", ["--workdir={run}", "--prompt_ids=1,2", "--temperature=0"],
      "--temperature"),
    C("generate-prompt-ids-letters", "generate", ["--workdir={run}", "--prompt_ids=a,b"], "--prompt_ids"),
    C("generate-prompt-id-beyond-vocab", "generate", ["--workdir={run}", "--prompt_ids=1,99999"], "99999"),
    C("generate-positional", "generate", ["--workdir={run}", "--prompt_ids=1", "extra"], "'extra'"),
    C("generate-workdir-is-file", "generate", ["--workdir={raw}", "--prompt_ids=1"], "{raw}"),
    C("generate-missing-workdir", "generate", ["--workdir={tmp}/nope", "--prompt_ids=1"], "{tmp}/nope"),
    C("generate-step-missing", "generate", ["--workdir={run}", "--prompt_ids=1", "--step=7"], "step 7"),
    C("generate-hf-without-weights", "generate", ["--hf={tmp}/hf", "--prompt_ids=1"], "{tmp}/hf",
      setup=both(copy("hf"), lambda tmp, fx: (tmp / "hf" / "model.safetensors").unlink())),
    # ---- eval
    C("eval-no-what", "eval", [], ["kobest", "generation"]),
    C("eval-unknown-what", "eval", ["kobest2", "--workdir={run}"], ["kobest", "generation"]),
    C("eval-kobest-no-data", "eval", ["kobest", "--workdir={run}", "--out={tmp}/r.json"], "--data"),
    C("eval-kobest-no-out", "eval", ["kobest", "--workdir={run}", "--data={tmp}"], "--out"),
    C("eval-kobest-unknown-task", "eval",
      ["kobest", "--workdir={run}", "--data={tmp}", "--tasks=copa,nope", "--out={tmp}/r.json"], "'nope'"),
    C("eval-kobest-missing-data", "eval",
      ["kobest", "--workdir={run}", "--data={tmp}/nokb", "--tasks=copa", "--out={tmp}/r.json"],
      "{tmp}/nokb/copa/test.jsonl"),
    C("eval-kobest-bad-shots", "eval",
      ["kobest", "--workdir={run}", "--data={tmp}", "--shots=0,a", "--out={tmp}/r.json"], "--shots"),
    C("eval-kobest-limit-0", "eval",
      ["kobest", "--workdir={run}", "--data={tmp}", "--limit=0", "--out={tmp}/r.json"], "--limit=0"),
    C("eval-kobest-out-is-dir", "eval",
      ["kobest", "--workdir={run}", "--data={tmp}", "--tasks=copa", "--out={tmp}"], "is a directory"),
    C("eval-generation-no-prompts", "eval", ["generation", "--workdir={run}"], "--prompts"),
    C("eval-generation-missing-prompts", "eval",
      ["generation", "--workdir={run}", "--prompts={tmp}/none.jsonl"], "{tmp}/none.jsonl"),
    C("eval-generation-both-sources", "eval",
      ["generation", "--workdir={run}", "--hf={hf}", "--prompts={tmp}/none.jsonl"], ["--workdir", "--hf"]),
    C("eval-generation-max-new-0", "eval",
      ["generation", "--workdir={run}", "--prompts={tmp}/p.jsonl", "--max_new_tokens=0"], "--max_new_tokens=0"),
    # ---- convert
    C("convert-no-direction", "convert", [], "to-hf"),
    C("convert-bad-direction", "convert", ["sideways"], "sideways"),
    C("to-hf-no-out", "convert", ["to-hf", "--workdir={run}"], "--out"),
    C("to-hf-missing-workdir", "convert", ["to-hf", "--workdir={tmp}/nope", "--out={tmp}/o"], "{tmp}/nope"),
    C("to-hf-step-missing", "convert", ["to-hf", "--workdir={run}", "--out={tmp}/o", "--step=9"], "step 9"),
    C("to-hf-out-inside-workdir", "convert", ["to-hf", "--workdir={tmp}/run", "--out={tmp}/run/hf"],
      "{tmp}/run", setup=copy("run")),
    C("to-hf-out-is-workdir", "convert", ["to-hf", "--workdir={tmp}/run", "--out={tmp}/run", "--overwrite"],
      "{tmp}/run", setup=copy("run")),
    C("to-hf-out-is-file", "convert", ["to-hf", "--workdir={run}", "--out={tmp}/f"], "{tmp}/f",
      setup=lambda tmp, fx: _write(tmp / "f", "x")),
    C("to-hf-tokenizer-beyond-vocab", "convert",
      ["to-hf", "--workdir={run}", "--out={tmp}/o", "--tokenizer={tok_big}"], ["{tok_big}", "vocab"]),
    C("to-hf-bad-shard-size", "convert", ["to-hf", "--workdir={run}", "--out={tmp}/o", "--max_shard_size=lots"],
      "max_shard_size"),
    C("to-hf-out-unwritable", "convert", ["to-hf", "--workdir={run}", "--out={unwritable}/o"], "{unwritable}/o",
      code=1, setup=readonly_dir),
    C("to-hf-disk-full", "convert", ["to-hf", "--workdir={run}", "--out={tmp}/o"], ["{tmp}/o", "too large"], code=1,
      fsize=32 << 10),
    C("from-hf-no-hf", "convert", ["from-hf", "--out={tmp}/o"], "--hf"),
    C("from-hf-missing-dir", "convert", ["from-hf", "--hf={tmp}/nope", "--out={tmp}/o"], "{tmp}/nope"),
    C("from-hf-config-not-json", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"], "config.json",
      setup=both(copy("hf"), lambda tmp, fx: _write(tmp / "hf" / "config.json", "{not json"))),
    C("from-hf-heads-0", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"], "num_attention_heads",
      setup=both(copy("hf"), edit_json("hf/config.json", setitem(num_attention_heads=0)))),
    C("from-hf-hidden-size-string", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"], "hidden_size",
      setup=both(copy("hf"), edit_json("hf/config.json", setitem(hidden_size="64")))),
    C("from-hf-layers-null", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"], "num_hidden_layers",
      setup=both(copy("hf"), edit_json("hf/config.json", setitem(num_hidden_layers=None)))),
    C("from-hf-rope-parameters-list", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"],
      "rope_parameters", setup=both(copy("hf"), edit_json("hf/config.json", setitem(rope_parameters=[1, 2])))),
    C("from-hf-weight-map-list", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"], "weight_map",
      setup=hf_index(["model-00001-of-00001.safetensors"])),
    C("from-hf-weight-map-outside", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/o"],
      "../outside.safetensors", setup=hf_index({"gpt_neox.embed_in.weight": "../outside.safetensors"})),
    C("from-hf-out-is-hf", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/hf", "--overwrite"], "{tmp}/hf",
      setup=copy("hf")),
    C("from-hf-out-inside-hf", "convert", ["from-hf", "--hf={tmp}/hf", "--out={tmp}/hf/run"], "{tmp}/hf",
      setup=copy("hf")),
    C("from-hf-out-unwritable", "convert", ["from-hf", "--hf={hf}", "--out={unwritable}/o"], "{unwritable}/o",
      code=1, setup=readonly_dir),
    C("from-hf-disk-full", "convert", ["from-hf", "--hf={hf}", "--out={tmp}/o"], ["{tmp}/o", "too large"],
      code=1, fsize=64 << 10),
    C("from-hf-config-missing", "convert",
      ["from-hf", "--hf={hf}", "--out={tmp}/o", "--config={tmp}/nope.py"], "{tmp}/nope.py"),
]  # fmt: skip


def _selected_cases(request) -> list[Case]:
    """The cases this session will check (all of them unless -k or an id narrows it)."""
    wanted = set()
    for item in request.session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if isinstance(case, Case) and item.module is request.module:
            wanted.add(case.id)
    return [c for c in CASES if c.id in wanted]


@dataclasses.dataclass
class Result:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    names: list[str]
    diff: list[str]  # changes under the case directory
    shared_diff: list[str]  # changes to the shared fixtures the case names
    leftovers: list[str]  # paths outside the case directory that should not exist


def _run_case(
    case: Case,
    fx: dict[str, pathlib.Path],
    tmp: pathlib.Path,
    servers: queue.Queue[ForkServer] | None = None,
    io_dir: pathlib.Path | None = None,
) -> Result:
    """Runs one case (through one of `servers`, else as a subprocess) and records it."""
    tmp.mkdir(parents=True)
    if case.setup is not None:
        case.setup(tmp, fx)
    args = _fmt(case.args, fx, tmp)
    shared = [k for k in fx if any(f"{{{k}}}" in a for a in case.args)]
    before = tree(tmp)
    shared_before = {k: tree(fx[k]) for k in shared}
    command = _cli(case.sub, *args, fsize=case.fsize)
    if servers is None:
        try:
            done = subprocess.run(
                command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
            )
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            code, out, err = (
                -999,
                str(e.stdout or ""),
                f"timed out after {TIMEOUT} s\n{e.stderr or ''}",
            )
    else:
        server = servers.get()
        try:
            code, out, err = server.run([case.sub, *args], io_dir / case.id)
        finally:
            servers.put(server)
        command = ["(forked)", *command]
    after = tree(tmp)
    shared_diff = [f"{k}: {d}" for k in shared for d in _tree_diff(shared_before[k], tree(fx[k]))]
    leftovers = []
    if ROOT:  # nothing may have appeared in the unwritable place
        for a in args:
            if UNWRITABLE in a:
                path = pathlib.Path(a.split("=", 1)[1])
                if path.exists():
                    leftovers.append(str(path))
    for p in (tmp / "readonly",):  # let pytest remove it
        if p.exists():
            p.chmod(stat.S_IRWXU)
    return Result(
        command=command,
        returncode=code,
        stdout=out,
        stderr=err,
        names=_fmt(case.names, fx, tmp),
        diff=[
            d
            for d in _tree_diff(before, after)
            if not (d[0] == "+" and _may_appear(d[1:], case.may_create))
        ],
        shared_diff=shared_diff,
        leftovers=leftovers,
    )


TEMPORARY = (".partial-", ".tmp-", "orbax-checkpoint-tmp")


def _may_appear(rel: str, allowed: tuple[str, ...]) -> bool:
    inside = any(rel == a or rel.startswith(a + "/") for a in allowed)
    return inside and not any(t in rel for t in TEMPORARY)


class ForkServer:
    """A `forked_cli.py` process: `run(argv, io)` is `python -m polyglot_jax *argv` in REPO."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).with_name("forked_cli.py"))],
            cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        ready = json.loads(self.process.stdout.readline() or "{}")
        if not ready.get("ready") or ready["preload_stderr"]:
            self.close()
            pytest.fail(f"the fork server cannot stand in for fresh processes: {ready}")

    def run(self, argv: list[str], io: pathlib.Path) -> tuple[int, str, str]:
        out, err = io.with_suffix(".stdout"), io.with_suffix(".stderr")
        request = {"argv": argv, "cwd": str(REPO), "stdout": str(out), "stderr": str(err),
                   "timeout": TIMEOUT}  # fmt: skip
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the fork server died (exit {self.process.poll()}) running {argv}"
        code = json.loads(answer)["code"]
        err_text = err.read_text(errors="replace")
        if code == -999:
            err_text = f"timed out after {TIMEOUT} s\n{err_text}"
        return code, out.read_text(errors="replace"), err_text

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _fresh(cases: list[Case]) -> set[str]:
    """The cases run as fresh subprocesses: each subcommand's first, and file-size limits (the
    limit would apply to the server's output files too)."""
    first = {}
    for c in cases:
        first.setdefault(c.sub, c.id)
    return set(first.values()) | {c.id for c in cases if c.fsize is not None}


@pytest.fixture(scope="module")
def results(request, fx, tmp_path_factory) -> dict[str, Result]:
    cases = _selected_cases(request)
    root = tmp_path_factory.mktemp("cases")
    io_dir = tmp_path_factory.mktemp("case_io")
    fresh = _fresh(cases)
    servers: queue.Queue[ForkServer] = queue.Queue()
    if len(fresh) < len(cases):
        for _ in range(WORKERS):
            servers.put(ForkServer())
    try:
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = {
                c.id: pool.submit(
                    _run_case, c, fx, root / c.id, None if c.id in fresh else servers, io_dir
                )
                for c in cases
            }
            return {i: f.result() for i, f in futures.items()}
    finally:
        while not servers.empty():
            servers.get().close()


def problems(case: Case, r: Result) -> list[str]:
    """Everything wrong with one run (all of it, so that a failure shows the whole picture)."""
    found = []
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if case.after_progress:  # tqdm's lines ("train:  50%|#####     | 1/2 [...]") are not errors
        lines = [ln for ln in lines if not re.match(rf"\s*{case.sub}: +\d+%\|", ln)]
    if "Traceback" in r.stderr:
        found.append("a traceback on stderr")
    if r.returncode != case.code:
        found.append(f"exit code {r.returncode}, want {case.code}")
    if len(lines) != 1:
        found.append(f"{len(lines)} stderr lines, want exactly one")
    line = next((ln for ln in lines if ln.startswith(f"{PROG} {case.sub}: error: ")), None)
    if line is None:
        found.append(f"no line starting {PROG} {case.sub}: error:")
    else:
        missing = [n for n in r.names if n not in line]
        if missing:
            found.append(f"the error line does not name {missing}")
        if "\\" in line:
            found.append("escapes in the error line (a repr of a message?)")
    if r.diff:
        found.append(f"files under the case directory changed: {r.diff}")
    if r.shared_diff:
        found.append(f"shared fixtures changed: {r.shared_diff}")
    if r.leftovers:
        found.append(f"created in the unwritable place: {r.leftovers}")
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results):
    r = results[case.id]
    found = problems(case, r)
    assert not found, (
        "; ".join(found) + f"\n$ {' '.join(r.command)}\nexit {r.returncode}\n--- stderr\n"
        f"{r.stderr[-4000:]}--- stdout\n{r.stdout[-1000:]}"
    )


def test_every_subcommand_has_cases():
    """A new subcommand needs its own rows in this table."""
    from polyglot_jax.cli import subcommands

    covered = {c.sub for c in CASES}
    assert set(subcommands()) <= covered, set(subcommands()) - covered
    assert len(CASES) >= 60


def test_stale_temp_files_of_dead_processes_are_removed_with_a_warning(fx, tmp_path):
    """A tokenize killed mid-write leaves `NAME.tmp-PID`; the next run removes those of dead
    processes (one warning line each) and leaves a live process's alone."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f"shard-00000.array_record.tmp-{dead.pid}"
    live = out / f"shard-00001.array_record.tmp-{os.getpid()}"
    stale.write_bytes(b"half a shard")
    live.write_bytes(b"being written")
    command = _cli("tokenize", f"--tokenizer={fx['tok']}", f"--input={fx['raw']}", f"--output={out}",
                   "--num_workers=1")  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(stale) in lines[0], done.stderr
    assert not stale.exists() and live.exists()
    assert (out / "manifest.json").is_file()
