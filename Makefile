# make demo: the main job (train the embedded tiny model, then evaluate it, on CPU)
# make test: the test suite (includes the end-to-end runs and a local SLURM cluster), in
# TEST_WORKERS processes (pytest-xdist, a test file per worker, longest files first (the order
# is tests/conftest.py's FILE_ORDER), one torch thread each: our runs are small, so two workers
# use two cores better than one); make test-fast: the quick loop
# Both create/refresh the virtualenv first. TORCH_SPEC picks the torch build; the default
# matches the CPU wheel cached on our machines (elsewhere pip fetches it from PyPI).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TEST_WORKERS ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmalign-installed

# make wheelhouse: lmalign and its dependencies as wheels in wheelhouse/, for a machine without
# network (README, "Offline install"); PYTHON_VERSION, PLATFORM, EXTRAS and EXCLUDE (the target's
# `pip list --format=freeze`, or bare names: present at any version) describe the target; empty
# means this machine, no extras.
PYTHON_VERSION ?=
PLATFORM ?=
EXTRAS ?=
EXCLUDE ?=
WHEELHOUSE ?= wheelhouse
BNB_CUDA ?=

.PHONY: setup demo test test-fast test-wheelhouse wheelhouse bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m lmalign

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 -m "not wheelhouse" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not wheelhouse" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

wheelhouse: $(STAMP)
	$(BIN)/python scripts/wheelhouse.py --python-version "$(PYTHON_VERSION)" \
		--platform "$(PLATFORM)" --extras "$(EXTRAS)" --exclude "$(EXCLUDE)" --out "$(WHEELHOUSE)" \
		--bitsandbytes-cuda "$(BNB_CUDA)"

# Builds a wheelhouse and installs it into a fresh virtualenv with --no-index (a few minutes;
# CI runs it after make test)
test-wheelhouse: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m wheelhouse tests/test_wheelhouse.py

bench: $(STAMP)
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf outputs multirun runs .pytest_cache wheelhouse
