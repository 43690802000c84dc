#!/usr/bin/env bash
# A Cloud TPU VM pod from your machine: create it, copy this repository to every worker and install
# it there, start training on all workers at once (JAX finds its peers from the TPU metadata), follow
# the logs, stop the run, delete the pod. Every command is printed before it runs; DRY_RUN=1 only
# prints them.
#
# Usage, from the repository root (with gcloud installed and logged in):
#   export TPU_NAME=ko-v5p ZONE=us-east5-a PROJECT=my-project   # ACCELERATOR=v5p-64 by default
#   launch/tpu/pod.sh create
#   launch/tpu/pod.sh setup                       # copy the repo, install it + jax[tpu] (each worker)
#   launch/tpu/pod.sh exec 'sudo mount ...'       # any command on every worker (e.g. a shared mount)
#   WORKDIR=/mnt/shared/runs/ko-1.3b launch/tpu/pod.sh train --config.data.shards="('/mnt/shared/tokens',)"
#   launch/tpu/pod.sh logs                        # follow worker 0's log (WORKER=all: every worker)
#   launch/tpu/pod.sh stop                        # SIGTERM: finish the step, save, exit
#   launch/tpu/pod.sh delete
#
# Settings (environment variables):
#   TPU_NAME, ZONE  required
#   PROJECT         the Google Cloud project (default: gcloud's configured one)
#   ACCELERATOR     default v5p-64 (a v5p pod slice of 32 chips, 8 workers)
#   VERSION         the TPU VM image: v2-alpha-tpuv5 (v5p, the default), v2-alpha-tpuv5-lite (v5e),
#                   v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
#   SPOT=1          create on spot capacity
#   CONFIG          for train (default configs/polyglot_ko_1_3b.py)
#   WORKDIR         for train, required: a path that every worker sees the same, e.g. on a Filestore
#                   NFS mount on all workers (a gcsfuse mount may lack the flock the workdir's lock
#                   needs); process 0 writes checkpoints there
#   REMOTE_DIR      where the repository goes on each worker, under the home directory (polyglot_jax)
#   WORKER          for logs: the worker to follow (0) or all
#   DRY_RUN=1       print the commands, run nothing
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() {
  printf 'pod.sh: %s\n' "$1" >&2
  exit 2
}
# WORDS...: each one quoted for a POSIX shell where it needs it, joined by spaces.
shq() {
  local w q="'" out=()
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$w")
    else
      out+=("'${w//$q/$q\\$q$q}'")
    fi
  done
  printf '%s' "${out[*]}"
}
# Prints a command, then runs it unless DRY_RUN=1.
run() {
  printf '+ %s\n' "$(shq "$@")"
  if [[ ${DRY_RUN:-0} != 1 ]]; then "$@"; fi
}

usage='usage: pod.sh create | setup | train [TRAIN FLAGS...] | logs | stop | exec COMMAND | delete'
(($# > 0)) || fail "$usage"
action=$1
shift
[[ -n ${TPU_NAME:-} ]] || fail "set TPU_NAME (the pod's name)"
[[ -n ${ZONE:-} ]] || fail "set ZONE (e.g. us-east5-a)"
accelerator=${ACCELERATOR:-v5p-64}
version=${VERSION:-v2-alpha-tpuv5}
remote_dir=${REMOTE_DIR:-polyglot_jax}
[[ $remote_dir != /* && $remote_dir != *..* ]] || fail "REMOTE_DIR is a path under the home directory"

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then where+=(--project="$PROJECT"); fi
on_all() { run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

case $action in
  create)
    extra=()
    if [[ ${SPOT:-0} == 1 ]]; then extra+=(--spot); fi
    run "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${extra[@]}"
    ;;
  setup)
    # One tarball of the repository (no .git, .venv*, runs), to every worker, unpacked and installed.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tarball=$tmp/polyglot_jax.tgz
    COPYFILE_DISABLE=1 run tar -czf "$tarball" --exclude=.git --exclude='.venv*' --exclude=runs \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache .
    run "${tpu[@]}" scp "$tarball" "$TPU_NAME:polyglot_jax.tgz" "${where[@]}" --worker=all
    on_all "mkdir -p $(shq "$remote_dir") && tar -xzf polyglot_jax.tgz -C $(shq "$remote_dir") && bash $(shq "$remote_dir/launch/tpu/worker_setup.sh")"
    ;;
  train)
    [[ -n ${WORKDIR:-} ]] || fail "set WORKDIR to a path every worker sees (e.g. on a Filestore NFS mount)"
    on_all "bash $(shq "$remote_dir/launch/tpu/worker_train.sh" --config="${CONFIG:-configs/polyglot_ko_1_3b.py}" --workdir="$WORKDIR" "$@")"
    ;;
  logs)
    run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker="${WORKER:-0}" \
      --command="tail -n 100 -F $(shq "$remote_dir/train.log")"
    ;;
  stop)
    on_all "bash $(shq "$remote_dir/launch/tpu/worker_train.sh" stop)"
    ;;
  exec)
    (($# > 0)) || fail "exec needs a command"
    on_all "$*"
    ;;
  delete)
    run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *) fail "unknown action '$action' ($usage)" ;;
esac
