#!/usr/bin/env bash
# The CPU demo (make demo): what the package does, on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
for config in configs/tiny.py configs/polyglot_ko_1_3b.py configs/polyglot_ko_3_8b.py \
    configs/polyglot_ko_5_8b.py configs/polyglot_ko_12_8b.py; do
  echo "== polyglot-jax info --config=$config"
  polyglot-jax info --config="$config" | head -n 3
done
