"""Plans a preprocess run, then runs its stages on a datatrove executor (local, Slurm or Ray).

    report = preprocess(inputs, "out/", CleanConfig(), tasks=8, workers=2, tokenizer="tok/")

Everything is checked before anything is written (inputs, config, tokenizer, executor, the
output directory); then `out/plan.json` is written and the stages run in order, each a datatrove
executor with `logging_dir=out/logs/STAGE` (its completion markers, logs and stats). The same call
on the same output resumes: finished tasks are skipped, a task that died is redone from scratch
(each writes its files under temporary names and renames them at the end). A different plan
(other inputs, rules, tasks or tokenizer) for an existing output is refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polyglot_jax.data.clean import CleanConfig
from polyglot_jax.data.engine import layout as lay
from polyglot_jax.data.engine.merge import BATCH_ROWS
from polyglot_jax.data.engine.steps_clean import ApplyRules, ReadInputs, Signatures
from polyglot_jax.data.engine.steps_dedup import (
    ExactDuplicates,
    KeptDocuments,
    MinhashBuckets,
    MinhashClusters,
    MinhashResolve,
)
from polyglot_jax.data.engine.steps_output import PlanShards, WriteManifest, WriteShards
from polyglot_jax.data.sources import list_input_files
from polyglot_jax.errors import ConfigError, InputError, PolyglotError
from polyglot_jax.output_dir import check_output

EXECUTORS, STAGES = lay.EXECUTORS, lay.STAGES
_NOT_IN_PLAN = ("created", "keep_work", "merge_rows")  # may differ between a run and its resume


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What SlurmPipelineExecutor needs to write its sbatch scripts (one job array per stage);
    RayPipelineExecutor takes `cpus_per_task` and `mem_per_cpu_gb` from here too."""

    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    cluster_mem_gb: float = 64.0  # the one-task `clusters` stage holds the bucket graph
    qos: str = ""
    job_name: str = "polyglot-preprocess"
    venv_path: str = ""  # a bin/activate to source in every job ("" = the running venv's)
    max_array_size: int = 1001
    tasks_per_job: int = 1  # datatrove tasks run one after another by each array job
    sbatch_args: tuple[tuple[str, str], ...] = ()


# ------------------------------------------------------------------------------- the plan ---


def make_plan(
    inputs: Sequence[str | os.PathLike],
    config: CleanConfig,
    *,
    tasks: int,
    tokenizer: str | os.PathLike | None = None,
    eos_token: str | None = None,
    block_tokens: int | None = None,
    shard_chars: int | None = None,
    keep_work: bool = False,
    merge_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """The plan of a run (see layout.py); ConfigError / InputError for anything that cannot work."""
    from polyglot_jax.data.tokenize import DEFAULT_BLOCK_TOKENS, DEFAULT_SHARD_CHARS

    config.validate()
    block_tokens = DEFAULT_BLOCK_TOKENS if block_tokens is None else block_tokens
    shard_chars = DEFAULT_SHARD_CHARS if shard_chars is None else shard_chars
    if tasks < 1:
        raise ConfigError(f"--tasks={tasks} must be at least 1")
    if block_tokens < 1:
        raise ConfigError(f"--block_tokens={block_tokens} must be positive")
    if shard_chars < 1:
        raise ConfigError(f"--shard_chars={shard_chars} must be positive")
    if not isinstance(merge_rows, int) or merge_rows < 1:
        raise ConfigError(f"--merge_rows={merge_rows} must be a positive int")
    files = list_input_files(inputs)
    if not files:
        raise InputError("preprocess: no input files given")
    if len(files) >= lay.MAX_FILES:
        raise InputError(f"{len(files):,} input files: at most {lay.MAX_FILES - 1:,}")
    files = [str(Path(f).absolute()) for f in files]
    for f in files:
        if not os.access(f, os.R_OK):
            raise InputError(f"{f}: cannot open (permission denied)")
    sizes = [os.path.getsize(f) for f in files]
    parts = [lay.file_parts(len(files), tasks)] * len(files)
    minhash = None
    if config.minhash:
        from polyglot_jax.data.dedup import MinHasher, NearDuplicateIndex

        try:
            index = NearDuplicateIndex(config.minhash_threshold, config.minhash_num_perm)
        except ValueError as e:  # as local clean words it
            raise ConfigError(
                f"clean config: minhash_threshold={config.minhash_threshold} with "
                f"minhash_num_perm={config.minhash_num_perm}: {e}"
            ) from e
        hasher = MinHasher(config.minhash_num_perm, config.minhash_ngram, config.minhash_seed)
        per_band = math.ceil(tasks / index.bands)
        minhash = {
            "bands": index.bands,
            "rows": index.rows,
            "tasks_per_band": per_band,
            "bucket_tasks": index.bands * per_band,
            "permutations": hasher.permutations.tolist(),
        }
    tok = None
    if tokenizer is not None:
        from polyglot_jax.data.tokenizer import load_tokenizer

        loaded = load_tokenizer(tokenizer, eos_token=eos_token)
        tok = {
            "tokenizer": str(Path(tokenizer).absolute()),
            "path": str(Path(loaded.path).resolve()),
            "sha256": loaded.sha256,
            "eos_token": loaded.eos_token,
            "eos_id": loaded.eos_id,
            "block_tokens": block_tokens,
        }
    return {
        "format": lay.FORMAT,
        "files": files,
        "sizes": sizes,
        "parts": parts,
        "units": lay.assign_units(sizes, parts, tasks),
        "tasks": tasks,
        "block_docs": lay.BLOCK_DOCS,
        "clean": {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"},
        "minhash": minhash,
        "tokenize": tok,
        "shard_chars": shard_chars,
        "keep_work": keep_work,
        "merge_rows": merge_rows,
        "created": time.time(),
    }


def _first_difference(old: dict, new: dict) -> str | None:
    for key in sorted(set(old) | set(new)):
        if key in _NOT_IN_PLAN:
            continue
        if old.get(key) != new.get(key):
            return key
    return None


def prepare_output(
    output: str | os.PathLike,
    plan: dict[str, Any],
    inputs: Sequence[str | os.PathLike],
    *,
    overwrite: bool = False,
) -> tuple[lay.Layout, bool]:
    """(layout, resumed): writes `output/plan.json` for a new run, or checks that an existing one
    is this plan (InputError naming the first field that differs, unless `overwrite`)."""
    existing = [os.fspath(s) for s in inputs if os.path.exists(s)]
    target = check_output(output, [*existing, *plan["files"]], overwrite=True)
    plan_path = target / lay.PLAN
    resumed = False
    if plan_path.is_file():
        try:
            old = lay.read_json(plan_path)
        except ValueError as e:
            raise InputError(f"{plan_path}: not valid JSON ({e}); use a fresh --output") from e
        differs = _first_difference(old, plan)
        if differs is None:
            plan = {**plan, "created": old["created"]}
            resumed = True
        elif not overwrite:
            raise InputError(
                f"{output} holds a preprocess run with another {differs!r} (pass the same "
                "flags to resume it, --overwrite to start over, or use a fresh --output)"
            )
    elif target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InputError(f"output directory {output} is not empty (pass --overwrite to replace it)")
    if not resumed and target.is_dir():
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    if not resumed:
        lay.write_json(plan_path, plan)
    return lay.Layout(target, plan), resumed


# ----------------------------------------------------------------------------- the stages ---


def stage_pipelines(layout: lay.Layout, quiet: bool = False) -> list[tuple[str, list, int]]:
    """(name, datatrove pipeline, tasks) of every stage this plan runs, in order; `quiet`:
    without datatrove's logs (on the console and in logs/STAGE/logs/)."""
    plan, out, tasks = layout.plan, str(layout.root), layout.tasks
    config = CleanConfig(**plan["clean"])
    reader = ReadInputs(out, plan)
    rules = ApplyRules(config)
    stages: list[tuple[str, list, int]] = [
        ("clean", [reader, rules, Signatures(out, plan, reader, rules)], tasks)
    ]
    if config.exact_dedup:
        stages.append(("exact", [ExactDuplicates(out, plan)], tasks))
    if plan["minhash"] is not None:
        stages += [
            ("buckets", [MinhashBuckets(out, plan)], plan["minhash"]["bucket_tasks"]),
            ("clusters", [MinhashClusters(out, plan)], 1),
            ("resolve", [MinhashResolve(out, plan)], tasks),
        ]
    stages += [
        ("filter", [KeptDocuments(out, plan)], tasks),
        ("plan", [PlanShards(out, plan)], 1),
        ("write", [WriteShards(out, plan)], tasks),
        ("manifest", [WriteManifest(out, plan)], 1),
    ]
    for _, pipeline, _ in stages:
        for step in pipeline:
            step.quiet = quiet
    return stages


def _check_executor(executor: str, slurm: SlurmOptions) -> None:
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
    if executor == "slurm":
        if not slurm.partition:
            raise ConfigError("--executor=slurm needs --partition")
        if shutil.which("sbatch") is None:
            raise ConfigError("--executor=slurm: no sbatch on PATH (submit from a login node)")
        sizes = (slurm.cpus_per_task, slurm.mem_per_cpu_gb, slurm.cluster_mem_gb)
        if min(sizes) <= 0 or slurm.tasks_per_job < 1 or slurm.max_array_size < 1:
            raise ConfigError(
                "--cpus_per_task, --mem_per_cpu_gb, --cluster_mem_gb, --tasks_per_job and "
                "--max_array_size must be > 0"
            )
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("--executor=ray needs Ray: pip install 'ray[default]'")


def _until(stages: list, stop_after: str | None) -> list:
    if stop_after is None:
        return stages
    names = [s[0] for s in stages]
    if stop_after not in STAGES:
        raise ConfigError(f"--stop_after={stop_after!r}: choose one of {', '.join(STAGES)}")
    if stop_after not in names:
        raise ConfigError(f"--stop_after={stop_after}: this run has no such stage ({names})")
    return stages[: names.index(stop_after) + 1]


def run_local(
    layout: lay.Layout,
    stages: list[tuple[str, list, int]],
    workers: int,
    say: Callable[[str], None],
    start_method: str = "forkserver",
) -> dict[str, float]:
    """Runs the stages one after another with LocalPipelineExecutor; seconds per stage."""
    from datatrove.executor.local import LocalPipelineExecutor

    if start_method == "forkserver" and workers > 1:
        # datatrove starts a process pool per stage; a forkserver that has imported the stages
        # (and datasketch/scipy, ~1 s) once makes each worker start in milliseconds, not a second.
        import multiprocess

        preload = [
            "polyglot_jax.data.engine.steps_clean",
            "polyglot_jax.data.engine.steps_dedup",
            "polyglot_jax.data.engine.steps_output",
            "datasketch",
            "tokenizers",
        ]
        multiprocess.get_context("forkserver").set_forkserver_preload(preload)
    seconds = {}
    for i, (name, pipeline, tasks) in enumerate(stages, 1):
        executor = LocalPipelineExecutor(
            pipeline,
            tasks=tasks,
            workers=max(1, min(workers, tasks)),
            logging_dir=str(layout.logs(name)),
            skip_completed=True,
            start_method=start_method,
        )
        todo = len(executor.get_incomplete_ranks())
        if todo == 0:
            say(f"[{i}/{len(stages)}] {name}: all {tasks} task(s) done before")
            seconds[name] = 0.0
            continue
        say(
            f"[{i}/{len(stages)}] {name}: {todo} of {tasks} task(s) on {executor.workers} worker(s)"
        )
        start = time.perf_counter()
        executor.run()
        seconds[name] = round(time.perf_counter() - start, 3)
        say(f"[{i}/{len(stages)}] {name}: done in {seconds[name]:,.1f} s")
    return seconds


def submit(
    layout: lay.Layout,
    stages: list[tuple[str, list, int]],
    executor: str,
    workers: int,
    slurm: SlurmOptions,
    say: Callable[[str], None],
) -> None:
    """Chains one executor per stage (each depends on the previous) and launches the last: on
    Slurm that submits one job array per stage with afterok dependencies, and returns."""
    previous = None
    for name, pipeline, tasks in stages:
        common = {
            "tasks": tasks,
            "workers": workers if workers > 0 else -1,
            "cpus_per_task": slurm.cpus_per_task,
            "logging_dir": str(layout.logs(name)),
            "depends": previous,
            "skip_completed": True,
        }
        if executor == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor

            single = tasks == 1 and name == "clusters"
            mem = slurm.cluster_mem_gb / slurm.cpus_per_task if single else slurm.mem_per_cpu_gb
            venv = slurm.venv_path or (
                str(Path(sys.prefix) / "bin" / "activate") if sys.prefix != sys.base_prefix else ""
            )
            previous = SlurmPipelineExecutor(
                pipeline,
                **common,
                time=slurm.time,
                partition=slurm.partition,
                mem_per_cpu_gb=math.ceil(mem),
                job_name=f"{slurm.job_name}-{name}",
                qos=slurm.qos or None,
                venv_path=venv or None,
                sbatch_args=dict(slurm.sbatch_args) or None,
                max_array_size=slurm.max_array_size,
                tasks_per_job=slurm.tasks_per_job,
                slurm_logs_folder=str(layout.logs(name) / "slurm_logs"),
            )
        else:
            from datatrove.executor.ray import RayPipelineExecutor

            previous = RayPipelineExecutor(pipeline, **common, mem_per_cpu_gb=slurm.mem_per_cpu_gb)
    say(f"{executor}: launching {len(stages)} stage(s): {', '.join(s[0] for s in stages)}")
    if executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (or a cluster started on this node), else a local one
    previous.run()


def preprocess(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    config: CleanConfig | None = None,
    *,
    tasks: int = 1,
    workers: int = 1,
    executor: str = "local",
    tokenizer: str | os.PathLike | None = None,
    eos_token: str | None = None,
    block_tokens: int | None = None,
    shard_chars: int | None = None,
    merge_rows: int = BATCH_ROWS,
    overwrite: bool = False,
    keep_work: bool = False,
    stop_after: str | None = None,
    slurm: SlurmOptions | None = None,
    progress: bool = True,
    start_method: str = "forkserver",
) -> dict[str, Any]:
    """Cleans, deduplicates and (with `tokenizer`) tokenizes `inputs` into `output`; see the
    module docstring. Returns the report (local executor) or what was launched."""
    config = config or CleanConfig()
    slurm = slurm or SlurmOptions()
    if workers < 0:
        raise ConfigError(f"--workers={workers} must be >= 0 (0: one per CPU core, or no limit)")
    if executor == "local":
        workers = workers or os.cpu_count() or 1
    _check_executor(executor, slurm)
    plan = make_plan(
        inputs,
        config,
        tasks=tasks,
        tokenizer=tokenizer,
        eos_token=eos_token,
        block_tokens=block_tokens,
        shard_chars=shard_chars,
        keep_work=keep_work,
        merge_rows=merge_rows,
    )
    probe = lay.Layout(output, plan)
    _until(stage_pipelines(probe), stop_after)  # a bad --stop_after fails before any write
    layout, resumed = prepare_output(output, plan, inputs, overwrite=overwrite)
    stages = _until(stage_pipelines(layout, quiet=not progress), stop_after)

    def say(message: str) -> None:
        if progress:
            print(f"preprocess: {message}", file=sys.stderr, flush=True)

    if resumed:
        say(f"resuming the run in {layout.root}")
    report_path = layout.clean_dir / "report.json"
    if executor != "local":
        start = time.perf_counter()
        submit(layout, stages, executor, workers, slurm, say)
        result = {"submitted": [s[0] for s in stages], "output": str(layout.root)}
        if executor == "ray" and stages[-1][0] == "manifest" and report_path.is_file():
            # Ray runs every stage before returning
            result.update(seconds=round(time.perf_counter() - start, 3))
            result["report"] = lay.read_json(report_path)
        return result
    from loguru import logger

    start = time.perf_counter()
    if not progress:
        logger.disable("datatrove")
    try:
        seconds = run_local(layout, stages, workers, say, start_method)
    except PolyglotError:
        # Bad input found by a stage (e.g. no readable document): nothing of a new run is kept,
        # as local clean keeps nothing. An interrupted or crashed run stays to be resumed.
        if not resumed:
            shutil.rmtree(layout.root, ignore_errors=True)
        raise
    finally:
        logger.enable("datatrove")
    result: dict[str, Any] = {"stages_seconds": seconds, "output": str(layout.root)}
    result["seconds"] = round(time.perf_counter() - start, 3)
    if stages[-1][0] == "manifest" and report_path.is_file():
        result["report"] = lay.read_json(report_path)
    return result
