#!/usr/bin/env bash
# The CPU demo (`make demo`): the whole path on the built-in Korean sample, in a few minutes.
#   raw text -> clean -> train a tokenizer -> tokenize -> train configs/tiny.py -> export to HF -> generate
# Outputs go to $DEMO_DIR (default runs/demo). Running it again reuses what is there: the trainer
# resumes (and finds its steps done), the other stages overwrite their outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_DIR:-runs/demo}
mkdir -p "$out"
start=$SECONDS
step() { printf '\n== %s\n' "$*"; }

step "1/7 the built-in Korean sample (konlpy's constitution and bills; NSMC reviews when present)"
polyglot-jax sample-corpus --out="$out/raw.jsonl"

step "2/7 clean: whitespace (newlines kept), PII masks, HTML/code/repeats, exact + near dedup"
polyglot-jax clean --input="$out/raw.jsonl" --output="$out/clean" --overwrite

step "3/7 train a morpheme-aware byte-level BPE tokenizer (4,096 ids)"
polyglot-jax train-tokenizer --input="$out/clean" --vocab_size=4096 --output="$out/tokenizer" --overwrite

step "4/7 tokenize into ArrayRecord shards"
polyglot-jax tokenize --tokenizer="$out/tokenizer" --input="$out/clean" --output="$out/tokens"

step "5/7 train configs/tiny.py (300 steps, checkpoints every 100)"
polyglot-jax train --config=configs/tiny.py --workdir="$out/run" \
  --config.data.shards="('$out/tokens',)" --config.data.tokenizer="$out/tokenizer"
python - "$out/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"loss: step {rows[0]['step']} {rows[0]['loss']:.3f} -> step {rows[-1]['step']} {rows[-1]['loss']:.3f}")
PY

step "6/7 export to a Hugging Face GPTNeoXForCausalLM directory (safetensors)"
polyglot-jax convert to-hf --workdir="$out/run" --out="$out/hf" --dtype=float32 --overwrite

step "7/7 generate from the exported model"
polyglot-jax generate --hf="$out/hf" --prompt="대한민국의 주권은" --max_new_tokens=40 --temperature=0.8

printf '\nDemo done in %ds. Outputs:\n' $((SECONDS - start))
printf '  %-14s %s\n' "clean text" "$out/clean (report.json: what each rule did)" \
  "tokenizer" "$out/tokenizer (loads with transformers.AutoTokenizer)" \
  "shards" "$out/tokens (manifest.json)" \
  "run" "$out/run (checkpoints/, metrics.jsonl, tb/, config.json)" \
  "HF model" "$out/hf (AutoModelForCausalLM.from_pretrained)"
