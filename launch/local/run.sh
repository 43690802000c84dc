#!/usr/bin/env bash
# Runs NUM_PROCESSES copies of COMMAND on this machine as one JAX distributed job: for tests, a
# laptop, or one multi-GPU box. Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i, and every line it prints is prefixed "[pI] " (its
# stderr stays on stderr).
#
# Usage:
#   launch/local/run.sh [-n NUM_PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-g GPUS_PER_PROCESS] [-p PORT] -- COMMAND [ARGS...]
#   launch/local/run.sh -n 2 -d 4 -- polyglot-jax train --config=configs/tiny.py --workdir=/tmp/run
#
#   -n N  number of processes (default 2)
#   -d D  D fake CPU devices per process: JAX_PLATFORMS=cpu, and
#         --xla_force_host_platform_device_count=D appended to XLA_FLAGS (replacing such a flag there)
#   -g K  K GPUs per process: CUDA_VISIBLE_DEVICES is process i's block of K GPUs, taken from the
#         CUDA_VISIBLE_DEVICES list already set, else GPUs i*K .. i*K+K-1
#   -p P  the coordinator's port (default 12355; 0 picks a free one)
#
# Exit status: 0 when every process exits 0. When one exits non-zero, the others get SIGTERM
# (SIGKILL about STOP_GRACE_S seconds later, default 5), run.sh prints one line
# "run.sh: process I exited with code C; stopped the others" and exits with code C.
# SIGINT and SIGTERM sent to run.sh (SIGHUP as SIGTERM) go to every process (training saves a
# checkpoint and exits 0), and run.sh waits for them; a Ctrl-C on the terminal reaches them once,
# through run.sh. (Started with `&` from another script, run.sh cannot catch SIGINT: bash ignores
# it there; use SIGTERM.) Bad usage: one line on stderr, exit 2.
set -euo pipefail

usage='usage: run.sh [-n NUM_PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-g GPUS_PER_PROCESS] [-p PORT] -- COMMAND [ARGS...]'
bad_usage() {
  printf 'run.sh: %s (%s)\n' "$1" "$usage" >&2
  exit 2
}
is_count() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1)); }

num=2 cpu_devices='' gpus='' port=12355
while getopts ':n:d:g:p:h' opt; do
  case $opt in
    n) num=$OPTARG ;;
    d) cpu_devices=$OPTARG ;;
    g) gpus=$OPTARG ;;
    p) port=$OPTARG ;;
    h)
      printf '%s\n' "$usage"
      exit 0
      ;;
    :) bad_usage "option -$OPTARG needs a value" ;;
    *) bad_usage "unknown option -$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
(($# > 0)) || bad_usage "no command given"
is_count "$num" || bad_usage "-n must be an integer >= 1, got '$num'"
num=$((10#$num))
if [[ -n $cpu_devices ]] && ! is_count "$cpu_devices"; then
  bad_usage "-d must be an integer >= 1, got '$cpu_devices'"
fi
if [[ -n $gpus ]] && ! is_count "$gpus"; then
  bad_usage "-g must be an integer >= 1, got '$gpus'"
fi
if ! [[ $port =~ ^[0-9]+$ ]] || ((10#$port > 65535)); then
  bad_usage "-p must be a port number, got '$port'"
fi
port=$((10#$port))
if ((port == 0)); then
  port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
grace=${STOP_GRACE_S:-5}
[[ $grace =~ ^[0-9]+$ ]] || bad_usage "STOP_GRACE_S must be whole seconds, got '$grace'"

# The environment every process shares.
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num"
if [[ -n $cpu_devices ]]; then
  read -ra old_flags <<<"${XLA_FLAGS:-}"
  flags=()
  for flag in "${old_flags[@]}"; do
    [[ $flag == --xla_force_host_platform_device_count=* ]] || flags+=("$flag")
  done
  flags+=("--xla_force_host_platform_device_count=$cpu_devices")
  export JAX_PLATFORMS=cpu XLA_FLAGS="${flags[*]}"
fi
if [[ -n $gpus ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra gpu_list <<<"$CUDA_VISIBLE_DEVICES"
  else
    gpu_list=()
    for ((k = 0; k < num * gpus; k++)); do gpu_list+=("$k"); done
  fi
  if ((${#gpu_list[@]} < num * gpus)); then
    bad_usage "-n $num -g $gpus needs $((num * gpus)) GPUs, CUDA_VISIBLE_DEVICES lists ${#gpu_list[@]}"
  fi
fi

# Prefixes each line; ignores INT and TERM so that a process saving on a signal can still print.
prefix() {
  trap '' INT TERM
  exec sed -u "s/^/[p$1] /"
}

# Each process in its own process group (set -m): a Ctrl-C on the terminal reaches run.sh alone,
# which forwards it once, and signals reach a command's own children too.
pids=()
set -m
for ((i = 0; i < num; i++)); do
  env_args=("JAX_PROCESS_ID=$i")
  if [[ -n $gpus ]]; then
    block=("${gpu_list[@]:i*gpus:gpus}")
    env_args+=("CUDA_VISIBLE_DEVICES=$(IFS=,; printf '%s' "${block[*]}")")
  fi
  env "${env_args[@]}" "$@" </dev/null > >(prefix "$i") 2> >(prefix "$i" >&2) &
  pids[i]=$!
done
set +m

codes=()      # exit code of each process that has ended
alive=$num    # processes not yet ended
signalled=''  # set once a signal was forwarded
first_code=0  # the first non-zero exit code
kill_at=''    # when the processes told to stop get SIGKILL

send() { # SIGNAL: to every process still running (its whole group, else the process itself)
  local j
  for ((j = 0; j < num; j++)); do
    [[ -z ${codes[j]:-} ]] || continue
    kill -s "$1" -- "-${pids[j]}" 2>/dev/null || kill -s "$1" "${pids[j]}" 2>/dev/null || true
  done
}
trap 'signalled=1; send INT' INT
trap 'signalled=1; send TERM' TERM HUP

# The loop's stderr is /dev/null, which silences bash's own "Killed" notices; run.sh's lines go
# to fd 3, the real stderr.
exec 3>&2
while ((alive > 0)); do
  for ((i = 0; i < num; i++)); do
    # Ended (and reaped by bash, so `wait` returns at once) once kill -0 finds no such process.
    if [[ -n ${codes[i]:-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    code=0
    wait "${pids[i]}" || code=$?
    codes[i]=$code
    alive=$((alive - 1))
    if ((code != 0 && first_code == 0)); then
      first_code=$code
      if [[ -n $signalled ]]; then
        printf 'run.sh: process %d exited with code %d\n' "$i" "$code" >&3
      else
        printf 'run.sh: process %d exited with code %d; stopped the others\n' "$i" "$code" >&3
        send TERM
        kill_at=$((SECONDS + grace))
      fi
    fi
  done
  if [[ -n $kill_at ]] && ((SECONDS >= kill_at)); then
    send KILL
    kill_at=''
  fi
  if ((alive > 0)); then sleep 0.1 || true; fi # (a Ctrl-C ends the sleep too)
done 2>/dev/null
exit "$first_code"
