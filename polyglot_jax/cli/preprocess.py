"""Clean, dedup and tokenize a corpus on datatrove (local, Slurm, Ray): clean's rules, at scale.

    polyglot-jax preprocess --input=PATH,... --output=DIR [--tokenizer=TOK] [--workers=N --tasks=N]
    polyglot-jax preprocess ... --executor=slurm --tasks=512 --partition=cpu [--time=24:00:00]

The distributed form of `clean` followed by `tokenize`: the same rules (every `clean` flag works
here too, `--nominhash`, `--min_chars=20`, ...), the same documents kept (exact and MinHash
duplicates removed across the whole corpus, the first copy in input order kept), the same
shards. Stages: clean -> exact -> buckets -> clusters -> resolve (MinHash) -> filter -> plan ->
write -> manifest, each a datatrove executor with `--tasks` tasks (`--workers` at a time on this
machine). Writes `DIR/clean/part-NNNNN.jsonl` + `DIR/clean/report.json` (local `clean`'s report
plus every stage's summary) and, with `--tokenizer`, `DIR/tokens/` (ArrayRecord shards and the
`manifest.json` that `train` reads). `DIR/logs/STAGE/` holds datatrove's logs, stats and
completion markers: the same command resumes a killed run (finished tasks are skipped).
`--executor=slurm` submits one job array per stage (each depending on the previous) and returns.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from polyglot_jax.data.clean import RULES, CleanConfig
from polyglot_jax.data.engine.layout import EXECUTORS, STAGES
from polyglot_jax.data.engine.merge import BATCH_ROWS
from polyglot_jax.data.tokenize import DEFAULT_BLOCK_TOKENS, DEFAULT_SHARD_CHARS
from polyglot_jax.errors import ConfigError

_INPUT = flags.DEFINE_list("input", None, "Inputs: .txt/.jsonl[.gz|.zst] files, dirs or globs.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for clean/, tokens/, logs/ and work/.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output of another run.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Say each stage's progress on stderr.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", list(EXECUTORS), "Where the tasks run.")
_WORKERS = flags.DEFINE_integer(
    "workers",
    None,
    "Tasks run at once (local: processes, default 1, 0: one per CPU core; slurm/ray: default "
    "and 0: no limit).",
)
_TASKS = flags.DEFINE_integer(
    "tasks", 0, "Tasks per parallel stage (input shards); default: --workers (local only)."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory: also write tokens/.")
_EOS_TOKEN = flags.DEFINE_string("eos_token", None, "Token after each document (as tokenize).")
_BLOCK_TOKENS = flags.DEFINE_integer(
    "block_tokens", DEFAULT_BLOCK_TOKENS, "Tokens per ArrayRecord record (whole documents)."
)
_SHARD_CHARS = flags.DEFINE_integer(
    "shard_chars", DEFAULT_SHARD_CHARS, "Characters per output shard (cut as tokenize cuts)."
)
_MERGE_ROWS = flags.DEFINE_integer(
    "merge_rows",
    BATCH_ROWS,
    "Records a dedup/plan task merges per round across all input ranks (~16-24 bytes each): "
    "with the task's own share, what bounds its memory.",
)
_KEEP_WORK = flags.DEFINE_bool("keep_work", False, "Keep DIR/work/ (the stages' files) at the end.")
_STOP_AFTER = flags.DEFINE_enum(
    "stop_after", None, list(STAGES), "Run the stages up to this one (the same command goes on)."
)
_PARTITION = flags.DEFINE_string("partition", None, "slurm: the partition (required).")
_TIME = flags.DEFINE_string("time", "24:00:00", "slurm: time limit of each task.")
_CPUS = flags.DEFINE_integer("cpus_per_task", 1, "slurm: CPUs per task.")
_MEM = flags.DEFINE_float("mem_per_cpu_gb", 2.0, "slurm: memory per CPU (GB).")
_CLUSTER_MEM = flags.DEFINE_float(
    "cluster_mem_gb", 64.0, "slurm: memory of the one-task MinHash clusters stage (GB)."
)
_QOS = flags.DEFINE_string("qos", "", "slurm: QOS (empty: the cluster's default).")
_JOB_NAME = flags.DEFINE_string("job_name", "polyglot-preprocess", "slurm: job name prefix.")
_VENV = flags.DEFINE_string("venv", "", "slurm: bin/activate sourced in every job (default: ours).")
_TASKS_PER_JOB = flags.DEFINE_integer(
    "tasks_per_job", 1, "slurm: tasks each array job runs in turn (fewer, longer jobs)."
)
_SBATCH_ARGS = flags.DEFINE_list("sbatch_args", [], "slurm: more sbatch options, key=value,...")
_MAX_ARRAY = flags.DEFINE_integer("max_array_size", 1001, "slurm: the cluster's MaxArraySize.")

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}
_CONFIG_FLAGS = {
    f.name: _DEFINE.get(type(f.default), flags.DEFINE_string)(f.name, f.default, f.metadata["help"])
    for f in dataclasses.fields(CleanConfig)
    if f.name != "workers"  # --workers above: datatrove's concurrent tasks
}


def _sbatch_args() -> tuple[tuple[str, str], ...]:
    out = []
    for item in _SBATCH_ARGS.value:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ConfigError(f"--sbatch_args: {item!r} is not key=value")
        out.append((key.lstrip("-"), value))
    return tuple(out)


def main(argv: list[str]) -> int | None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    if not _INPUT.value:
        raise ConfigError("--input is required (comma-separated files, directories or globs)")
    if not _OUTPUT.value:
        raise ConfigError("--output is required")
    local = _EXECUTOR.value == "local"
    workers = _WORKERS.value if _WORKERS.value is not None else (1 if local else 0)
    tasks = _TASKS.value
    if tasks < 0:
        raise ConfigError(f"--tasks={tasks} must be at least 1")
    if tasks == 0:
        if not local:
            raise ConfigError(f"--executor={_EXECUTOR.value} needs --tasks (e.g. --tasks=512)")
        import os

        tasks = workers or os.cpu_count() or 1
    try:
        from polyglot_jax.data.engine.driver import SlurmOptions, preprocess
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in ("datatrove", "loguru", "multiprocess", "dill"):
            raise
        raise ConfigError(
            f"preprocess needs datatrove ({missing} is not installed): pip install -e '.[scale]'"
        ) from e
    config = CleanConfig(**{name: flag.value for name, flag in _CONFIG_FLAGS.items()})
    slurm = SlurmOptions(
        partition=_PARTITION.value or "",
        time=_TIME.value,
        cpus_per_task=_CPUS.value,
        mem_per_cpu_gb=_MEM.value,
        cluster_mem_gb=_CLUSTER_MEM.value,
        qos=_QOS.value,
        job_name=_JOB_NAME.value,
        venv_path=_VENV.value,
        max_array_size=_MAX_ARRAY.value,
        tasks_per_job=_TASKS_PER_JOB.value,
        sbatch_args=_sbatch_args(),
    )
    result = preprocess(
        _INPUT.value,
        _OUTPUT.value,
        config,
        tasks=tasks,
        workers=workers,
        executor=_EXECUTOR.value,
        tokenizer=_TOKENIZER.value,
        eos_token=_EOS_TOKEN.value,
        block_tokens=_BLOCK_TOKENS.value,
        shard_chars=_SHARD_CHARS.value,
        merge_rows=_MERGE_ROWS.value,
        overwrite=_OVERWRITE.value,
        keep_work=_KEEP_WORK.value,
        stop_after=_STOP_AFTER.value,
        slurm=slurm,
        progress=_PROGRESS.value,
    )
    if "submitted" in result and "report" not in result:
        print(
            f"preprocess: submitted {len(result['submitted'])} stage(s) to {_EXECUTOR.value}; "
            f"progress in {result['output']}/logs/STAGE/ (run the same command to resume)"
        )
        return 0
    report = result.get("report")
    if report is None:
        print(f"preprocess: stopped after {_STOP_AFTER.value} -> {result['output']}")
        return 0
    docs, rules = report["documents"], report["rules"]
    for rule in RULES:
        entry = rules[rule]
        if entry["enabled"]:
            counts = ", ".join(
                f"{k} {v:,}"
                for k, v in entry.items()
                if isinstance(v, int) and not isinstance(v, bool)
            )
            print(f"  {rule:<12} {counts}")
    if report["skipped"]["counts"]:
        bad = ", ".join(f"{k} {v:,}" for k, v in report["skipped"]["counts"].items())
        print(f"  {'skipped':<12} {bad}")
    seconds = result["seconds"] or 1e-9
    print(
        f"preprocess: {docs['read']:,} documents ({report['bytes']['in'] / 1e6:,.1f} MB) in "
        f"{seconds:,.1f} s: {docs['read'] / seconds:,.0f} docs/s, "
        f"{report['bytes']['in'] / 1e6 / seconds:,.2f} MB/s with {tasks} task(s) on "
        f"{workers or 'all'} worker(s); kept {docs['kept']:,} in "
        f"{len(report['output_shards'])} shard(s) -> {result['output']}/clean"
    )
    tokens = report["engine"].get("tokens")
    if tokens:
        print(
            f"preprocess: {tokens['documents']:,} documents, {tokens['tokens']:,} tokens in "
            f"{tokens['shards']} shards -> {result['output']}/tokens"
        )
    return 0
