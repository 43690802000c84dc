# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   the main job on the built-in default (the CPU demo)
#   make test   the whole test suite (what .ci/run calls)
# Both create .venv on first use and pin every package to constraints.txt.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint format install clean-venv

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install only when the package metadata or the pins change.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml constraints.txt $(VENV)/.installed
	$(PIP) -e '.[test]'
	@touch $@

# transformers 4.x for tests/hf/test_transformers4.py (exports must load with 4.x too): only the
# three packages that differ from the venv's 5.x stack, installed into a directory of their own that
# the test puts first on PYTHONPATH, so torch, numpy, safetensors... stay the venv's. Pinned here,
# not in constraints.txt, which pins transformers 5.
TF4 := $(VENV)/tf4
TF4_PINS := transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2

$(VENV)/.installed-tf4: Makefile | $(BIN)/python
	rm -rf $(TF4)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --target $(TF4) $(TF4_PINS)
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

test: $(VENV)/.installed-test $(VENV)/.installed-tf4
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
