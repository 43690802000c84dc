#!/usr/bin/env bash
# Submits `polyglot-jax preprocess` to a SLURM cluster: clean -> exact dedup -> MinHash (buckets,
# clusters, resolve) -> filter -> plan -> write (tokenize) -> manifest, one job array per stage,
# each after the previous one (afterok). Run it on a login node: it checks the inputs, the rules
# and the tokenizer, writes OUTPUT/plan.json and submits (datatrove's SlurmPipelineExecutor
# writes each array's sbatch script to OUTPUT/logs/STAGE/launch_script.slurm); it returns once
# everything is queued. Running the same command again after a failure (a node lost, a time
# limit) resubmits only the tasks without a completion marker in OUTPUT/logs/STAGE/completions/.
# For a corpus that one big node can do, launch/slurm/preprocess.sbatch runs the same stages
# inside a single job instead.
#
# Usage, from the repository root on a login node (arguments after the script go to
# `polyglot-jax preprocess`, e.g. any `clean` rule flag):
#   INPUT=/shared/raw OUTPUT=/shared/prep TOKENIZER=/shared/tokenizer PARTITION=cpu \
#       launch/slurm/preprocess.sh
#   INPUT=/shared/raw OUTPUT=/shared/prep PARTITION=cpu TASKS=1024 TIME=12:00:00 \
#       launch/slurm/preprocess.sh --min_chars=20 --nominhash
#
# Settings (environment variables):
#   INPUT          required: input files, directories or globs (comma-separated), on a
#                  filesystem every node sees
#   OUTPUT         required: the output directory, on that filesystem too (it needs about the
#                  input's size again for the stages' files under OUTPUT/work/)
#   PARTITION      required: the SLURM partition
#   TOKENIZER      a tokenizer directory: also write OUTPUT/tokens/ (shards + manifest.json);
#                  without it the run stops at the cleaned text (OUTPUT/clean/)
#   TASKS          tasks of each parallel stage (default 512; about one per input file is right)
#   WORKERS        at most this many tasks of a stage at once (default: no limit)
#   TIME           time limit of each task (default 24:00:00)
#   CPUS_PER_TASK  default 1 (every task is one process)
#   MEM_PER_CPU_GB default 4
#   CLUSTER_MEM_GB memory of the one-task MinHash clusters stage (default 64)
#   QOS            the QOS (default: the cluster's)
#   VENV           the virtualenv every job activates (default .venv; empty: none, e.g. modules
#                  loaded in your shell profile)
set -euo pipefail

fail() {
  printf 'preprocess.sh: %s\n' "$1" >&2
  exit 2
}
is_count() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1)); }

input=${INPUT:-}
output=${OUTPUT:-}
partition=${PARTITION:-}
tokenizer=${TOKENIZER:-}
tasks=${TASKS:-512}
workers=${WORKERS:-0}
time_limit=${TIME:-24:00:00}
cpus=${CPUS_PER_TASK:-1}
mem=${MEM_PER_CPU_GB:-4}
cluster_mem=${CLUSTER_MEM_GB:-64}
qos=${QOS:-}
venv=${VENV-.venv}

[[ -n $input ]] || fail "set INPUT to the input files, directories or globs"
[[ -n $output ]] || fail "set OUTPUT to a directory on a filesystem that every node sees"
[[ -n $partition ]] || fail "set PARTITION to the SLURM partition"
is_count "$tasks" || fail "TASKS must be a count, got '$tasks'"
[[ $workers =~ ^[0-9]+$ ]] || fail "WORKERS must be a count (0: no limit), got '$workers'"
is_count "$cpus" || fail "CPUS_PER_TASK must be a count, got '$cpus'"
command -v sbatch >/dev/null || fail "sbatch is not on PATH (run this on a SLURM login node)"
activate=''
if [[ -n $venv ]]; then
  [[ -f $venv/bin/activate ]] || fail "VENV=$venv has no bin/activate (VENV= uses the environment as it is)"
  activate=$(cd "$venv" && pwd)/bin/activate
  # shellcheck source=/dev/null
  source "$activate"
fi
command -v polyglot-jax >/dev/null || fail "polyglot-jax is not on PATH (pip install -e '.[scale]' into VENV)"

cmd=(
  polyglot-jax preprocess --executor=slurm
  --input="$input" --output="$output" --partition="$partition" --tasks="$tasks"
  --workers="$workers" --time="$time_limit" --cpus_per_task="$cpus" --mem_per_cpu_gb="$mem"
  --cluster_mem_gb="$cluster_mem"
)
[[ -n $tokenizer ]] && cmd+=(--tokenizer="$tokenizer")
[[ -n $qos ]] && cmd+=(--qos="$qos")
[[ -n $activate ]] && cmd+=(--venv="$activate")
cmd+=("$@")

printf 'preprocess.sh:'
printf ' %q' "${cmd[@]}"
printf '\n'
exec "${cmd[@]}"
