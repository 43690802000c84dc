#!/usr/bin/env bash
# The GPU questions of issue #18 in one command, within ~8 minutes on one H100/H200:
#   1. device      what jax and torch see (device.json)
#   2. kernels     tests/kernels/test_on_device.py natively on the GPU (kernels.xml)
#   3. train_step  bench/train_step.py, Polyglot-Ko 1.3B at seq 2048, per attention_impl; the
#                  first one also times transformers + torch AdamW in the same process
#                  (train_step_1_3b_IMPL.json; the other impls run last); then 2 steps under
#                  jax.profiler: its `profile` says where the device time went (busy, idle,
#                  by kernel category, the longest kernels), traces/ keeps the Perfetto trace
#   4. attention   bench/attention.py at seq 2048: pallas, pallas_hopper (each also with fused
#                  RoPE), cudnn, xla; fwd and fwd+bwd TFLOP/s, head_dim 128 and 256 (attention.json)
#   5. generate    bench/generate.py, 1.3B in bfloat16 against transformers on CUDA (generate.json)
# Each step runs under its own time limit and is recorded in OUT/summary.json (status, seconds,
# command, log) whatever the others do; logs in OUT/logs/. The summary also holds issue #18's
# goals, met, missed or why unknown (bench/goals.py), and the last lines print them. Exit status:
# 0 when every step passed (or was skipped for a stated reason: generate without torch).
#
#   bash bench/device_suite.sh [OUT]              # default OUT: bench/results/device-<UTC stamp>
#   bash bench/device_suite.sh --rehearse [OUT]   # CPU: the same steps at tiny sizes (CI runs it)
#   bash bench/device_suite.sh --pack DEST        # on the device tool: DEST gets 2 files
#
# --pack: the suite writes into a temporary OUT and, after every step, puts summary.json and
# suite.tar.gz (OUT whole) into DEST (bench/suite_record.py): the device tool brings back at most
# 8 files, and a suite killed between steps still leaves what it finished there. Locally:
# tar xzf FILES_AT/suite.tar.gz -C bench/results/device-<stamp>.
# The GPU image has jax, flax, optax, orbax, torch and transformers but not grain, array_record,
# ml-collections or pytest: `make bench-wheels` puts their Python 3.12 wheels in bench/wheels/
# (ignored by git), which the device tool must carry, writing under its $OUT so that the results
# come back: run(command='bash bench/device_suite.sh "$OUT/suite"', carry=["bench/wheels"]).
# They are installed into a temporary directory put first on PYTHONPATH (the image's own
# packages stay as they are).
# Environment: IMPLS (attention_impls for train_step, default "cudnn pallas_hopper pallas xla"),
# TRAIN_BATCH (the 1.3B batch, default 8), SUITE_BUDGET_S (below), STEPS (run only these steps,
# e.g. STEPS="device kernels train_step"; the rest are recorded as skipped). With the device
# tool's 15 minutes in all, one call with the default budget, or two with STEPS split, fits.
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse=0
pack=""
while [ $# -gt 0 ]; do
    case $1 in
    --rehearse) rehearse=1 ;;
    --pack)
        [ $# -ge 2 ] || { echo "device_suite: --pack needs a directory" >&2; exit 2; }
        pack=$2
        shift
        ;;
    -*) echo "device_suite: unknown option $1" >&2; exit 2 ;;
    *) break ;;
    esac
    shift
done
if [ -n "$pack" ]; then
    [ $# -eq 0 ] || { echo "device_suite: --pack DEST takes no OUT" >&2; exit 2; }
    mkdir -p "$pack" 2>/dev/null && pack=$(cd "$pack" && pwd) ||
        { echo "device_suite: --pack $pack is not a directory this can write" >&2; exit 2; }
    out=$(mktemp -d)/suite
else
    out=${1:-bench/results/device-$(date -u +%Y%m%d-%H%M%S)}
fi
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
: >"$out/steps.jsonl"

needed="grain array_record ml_collections zstandard pytest absl jax flax optax orbax.checkpoint"
missing=$($py - $needed <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    if compgen -G "bench/wheels/*.whl" >/dev/null; then
        echo "device_suite: installing carried wheels for: $missing"
        site=$(mktemp -d)
        $py -m pip install --quiet --no-index --no-deps --target "$site" bench/wheels/*.whl \
            >"$out/logs/wheels.log" 2>&1 || echo "device_suite: wheel install failed (logs/wheels.log)"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "device_suite: missing $missing and no bench/wheels/ (make bench-wheels, then carry it)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the checkout's package, not an installed one

# skip NAME REASON [STATUS]: records a step that did not run; "skipped" (the default: it cannot
# run here) still lets the summary pass, any other status does not.
skip() {
    local status=${3:-skipped}
    echo "device_suite: $1: $status: $2"
    $py - "$out/steps.jsonl" "$1" "$2" "$status" <<'EOF'
import json, sys
path, name, reason, status = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "status": status, "reason": reason}) + "\n")
EOF
    record
}
# record [--final]: summary.json (and, with --pack, DEST's two files) as the steps so far left them.
record() {
    $py bench/suite_record.py "$out" "$rehearse" ${pack:+--pack "$pack"} "$@"
}
# step NAME LIMIT_S COMMAND...: runs it, logs it, records it; never stops the suite. A step gets
# at most what is left of the suite's budget (SUITE_BUDGET_S, default 540: the device tool allows
# 600 s a command), and is skipped, saying so, when under 30 s are left.
budget=${SUITE_BUDGET_S:-540}
deadline=$((SECONDS + budget))
step() {
    local name=$1 limit=$2
    shift 2
    local base=$name
    case $name in train_step_*) base=train_step ;; esac
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $base "* ]]; then
        skip "$name" "not in STEPS ($STEPS)"
        return
    fi
    local left=$((deadline - SECONDS))
    if [ $left -lt 30 ]; then
        skip "$name" "the suite's ${budget} s budget was spent" "not run"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "device_suite: $name: $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
    local rc=$?
    local status=passed
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timed out after ${limit}s"
    elif [ $rc -ne 0 ]; then status="failed (exit $rc)"; fi
    echo "device_suite: $name: $status in $((SECONDS - start)) s"
    $py - "$out/steps.jsonl" "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "$@" <<'EOF'
import json, sys
path, name, status, rc, seconds, limit, *command = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                        "limit_s": int(limit), "command": command,
                        "log": f"logs/{name}.log"}) + "\n")
EOF
    record
}

torch_here=1
$py -c "import torch, transformers" 2>/dev/null || torch_here=0

step device 120 $py - "$out/device.json" <<'EOF'
import importlib.metadata, json, platform, sys
import jax
info = {"python": platform.python_version(), "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [{"kind": d.device_kind, "platform": d.platform,
                     "compute_capability": getattr(d, "compute_capability", None)}
                    for d in jax.devices()]}
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "grain",
             "ml_collections", "triton"):
    try:
        info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info[name] = None
try:
    import torch
    info["torch_cuda"] = torch.cuda.is_available()
    info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except ImportError:
    info["torch_cuda"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

# tests/conftest.py defaults JAX_PLATFORMS to cpu (the fake-device meshes): here the GPU is the
# point. test_on_device.py fails, rather than skips, when a GPU is present but jax runs on CPU.
platforms=cpu
[ $rehearse = 1 ] || platforms=${JAX_PLATFORMS:-cuda,cpu}
step kernels 180 env JAX_PLATFORMS="$platforms" $py -m pytest -q -p no:cacheprovider \
    tests/kernels/test_on_device.py -rs --junitxml="$out/kernels.xml"

# One sequence of steps for both modes; only the sizes differ, so the rehearsal runs the GPU's
# own commands and logic.
if [ $rehearse = 1 ]; then
    # CPU: the tiny config, interpret-mode kernels (one per family), the tiny generate model.
    impls=${IMPLS:-xla pallas}
    tag=tiny
    train=(--config=configs/tiny.py --remat_policies=none --steps=1 --rounds=1 --torch_compile=false)
    attention=(--smoke --impls pallas xla)
    generate=(--size=tiny --batches 1 --new-tokens 4 --repeats 1)
else
    impls=${IMPLS:-cudnn pallas_hopper pallas xla}
    tag=1_3b
    train=(--config=configs/polyglot_ko_1_3b.py --config.train.batch_size="${TRAIN_BATCH:-8}"
        --config.train.grad_accum=1 --remat_policies= --steps=3 --rounds=2)
    # The kernels the goals are about, with and without fused RoPE, and the two references
    # (each a compile per head_dim and mode; every variant would not fit the budget).
    attention=(--seqs 2048 --impls pallas pallas+rope pallas_hopper pallas_hopper+rope cudnn xla)
    generate=(--size=1.3b --dtype=bfloat16 --device=cuda --batches 1 16)
fi
train_step() { # IMPL TORCH_FLAG
    step "train_step_$1" 240 $py bench/train_step.py "${train[@]}" \
        --config.model.attention_impl="$1" "$2" --out="$out/train_step_${tag}_$1.json" \
        --profile_steps=2 --trace_out="$out/traces/train_step_${tag}_$1.trace.json.gz"
}
# By priority, so that a spent budget drops the least needed: the step beside transformers (once,
# with the first implementation); attention; generation; the other implementations.
first=${impls%% *}
train_step "$first" --torch
step attention 180 $py bench/attention.py "${attention[@]}" --out="$out/attention.json"
if [ $torch_here = 1 ]; then
    step generate 200 $py bench/generate.py "${generate[@]}" --out="$out/generate.json"
else
    skip generate "torch/transformers not importable here (the bench compares with them)"
fi
for impl in ${impls#"$first"}; do
    train_step "$impl" --notorch
done

record --final
