#!/usr/bin/env bash
# Runs on every TPU VM worker (`launch/tpu/pod.sh setup` calls it): makes .venv in the repository
# with Python 3.11 (installed with apt when missing: TPU VM images are Ubuntu 22.04) and installs
# this package, pinned to constraints.txt (constraints-py312.txt under Python 3.12), with jax[tpu]
# at the pinned jax version.
#
# Usage, on a worker: bash polyglot_jax/launch/tpu/worker_setup.sh   (PYTHON=python3.12 for another)
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3.11}
if ! command -v "$python" >/dev/null; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$python" "$python-venv"
fi
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
# The pins of the interpreter's line: constraints-py312.txt for 3.12 (jax 0.12), else 3.11's.
constraints="constraints.txt"
if [[ $(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])') == 3.12 ]]; then
  constraints="constraints-py312.txt"
fi
jax_version=$(sed -n 's/^jax==//p' "$constraints")
[[ -n $jax_version ]] || {
  echo "worker_setup.sh: $constraints pins no jax version" >&2
  exit 2
}
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" -c "$constraints" -e . "jax[tpu]==$jax_version"
.venv/bin/python -c 'import jax, polyglot_jax; print("worker ready: jax", jax.__version__)'
