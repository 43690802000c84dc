#!/usr/bin/env bash
# Runs on every TPU VM worker (`launch/tpu/pod.sh train` and `stop` call it). Starts
# `polyglot-jax train ARGS...` detached from the ssh session (nohup), appending its output to
# train.log and writing its pid to train.pid in the repository, and returns at once; `stop` sends
# that process SIGTERM (it finishes its step, process 0 saves a checkpoint, all exit 0).
#
# Usage, on a worker: bash polyglot_jax/launch/tpu/worker_train.sh --config=FILE --workdir=DIR [FLAGS...]
#                     bash polyglot_jax/launch/tpu/worker_train.sh stop
set -euo pipefail
cd "$(dirname "$0")/../.."
log=$PWD/train.log
pidfile=$PWD/train.pid
host=$(hostname)

running_pid() { # the pid in train.pid if that process still runs
  local pid
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

if [[ ${1:-} == stop ]]; then
  if pid=$(running_pid); then
    kill -TERM "$pid"
    echo "worker $host: sent SIGTERM to $pid"
  else
    echo "worker $host: no run going"
  fi
  exit 0
fi
if pid=$(running_pid); then
  echo "worker_train.sh: worker $host already runs pid $pid (launch/tpu/pod.sh stop first)" >&2
  exit 1
fi
# shellcheck source=/dev/null
source .venv/bin/activate
printf '\n== %s: polyglot-jax train %s\n' "$(date)" "$*" >>"$log"
nohup polyglot-jax train "$@" >>"$log" 2>&1 </dev/null &
echo "$!" >"$pidfile"
echo "worker $host: started pid $! (log $log)"
