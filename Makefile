# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   the main job on the built-in default (the CPU demo)
#   make test   the whole test suite (what .ci/run calls)
# Both create .venv on first use and pin every package to constraints.txt.
#
# The newer line: PYTHON=python3.12 make test (jax 0.12) uses .venv-py312 and constraints-py312.txt;
# make test-py312 runs its version-sensitive subset (a quick check; .ci/run runs both whole suites).

PYTHON ?= python3.11

# The interpreter itself: PYTHON as given when it runs, else pyenv's own copy of it (a pyenv shim
# such as python3.12 fails unless PYENV_VERSION selects that version).
PYENV_VERSIONS := $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions
PYTHON_EXE := $(shell if $(PYTHON) -c '' >/dev/null 2>&1; then command -v $(PYTHON); \
	else ls -d $(PYENV_VERSIONS)/*/bin/$(notdir $(PYTHON)) 2>/dev/null | sort -V | tail -n 1; fi)
PY_LINE := $(if $(PYTHON_EXE),$(shell $(PYTHON_EXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))

# One venv and one constraints file per Python line.
ifeq ($(PY_LINE),3.12)
VENV := .venv-py312
CONSTRAINTS := constraints-py312.txt
else
VENV := .venv
CONSTRAINTS := constraints.txt
endif
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS)

# make test-py312: the tests that differ most between the jax lines (Pallas kernels, the model and
# its FLOPs, the loss, generation, checkpoints, sharding, the watchdog's threads, the device
# report, the GPU suite's rehearsal): a few minutes of the whole 3.12 suite's 21 (measured on 2
# cores, 2026-12-03), for a quick look after a version bump. The whole 3.12 suite (what .ci/run
# runs beside the 3.11 one) is PYTHON=python3.12 make test.
PY312_TESTS := tests/kernels tests/test_model.py tests/test_flops.py tests/test_generate.py \
	tests/test_checkpoint.py tests/test_distributed.py tests/test_optimizer.py tests/test_loss.py \
	tests/test_watchdog.py tests/test_device_suite.py \
	tests/cli/test_info.py::test_show_devices_names_the_backend_platform_version_and_every_device

.PHONY: demo test test-py312 lint format install clean-venv check-python bench-wheels

check-python:
	@test -n "$(PYTHON_EXE)" || { echo "make: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	@case "$(PY_LINE)" in 3.11|3.12) ;; *) echo "make: $(PYTHON) is Python $(PY_LINE); this project pins 3.11 (constraints.txt) and 3.12 (constraints-py312.txt)" >&2; exit 2;; esac

$(BIN)/python: | check-python
	$(PYTHON_EXE) -m venv $(VENV)

# Stamps re-run the install only when the package metadata or the pins change.
$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml $(CONSTRAINTS) $(VENV)/.installed
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

install: check-python $(VENV)/.installed

demo: check-python $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash launch/demo.sh

test: check-python $(VENV)/.installed-test $(VENV)/.installed-tf4
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-py312:
	$(MAKE) --no-print-directory test PYTHON=python3.12 PYTEST_ARGS="$(PY312_TESTS) $(PYTEST_ARGS)"

format: check-python $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)

# bench/wheels: the Python 3.12 wheels the GPU machine's image lacks (bench/device_suite.sh
# installs them there into a temporary directory; the device tool carries this directory).
# Versions from constraints-py312.txt; downloaded here, where PyPI is reachable.
BENCH_WHEELS := grain array_record ml_collections zstandard cloudpickle portpicker pytest pluggy iniconfig pygments

bench-wheels: check-python $(VENV)/.installed
	rm -rf bench/wheels
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps \
		--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -c constraints-py312.txt -d bench/wheels $(BENCH_WHEELS)
	@ls bench/wheels
