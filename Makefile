# Set-up and common tasks. Everything runs inside a virtual environment in .venv, created on
# first use: torch==2.13.0 is installed first where it is missing (an unpinned torch would pull
# several GB of CUDA packages), then this project in editable mode with its dev extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast test-parity-full test-wheel parity lint format bench clean

help:
	@echo "make demo       run the built-in demo (no downloads)"
	@echo "make test       run the whole test suite (what CI runs)"
	@echo "make test-fast  the suite without the tests marked slow"
	@echo "make test-parity-full  the full-size cases make test leaves out (CI runs them too)"
	@echo "make test-wheel the package as pip install . installs it: wheel, fresh venv, commands"
	@echo "make parity     regenerate benchmarks/parity.md (the whole parity suite's table)"
	@echo "make lint       ruff"
	@echo "make bench      benchmarks; results under benchmarks/"
	@echo "make install    only create .venv and install"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nonlocal_net.tools.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-parity-full: $(STAMP)
	$(PY) -m pytest --parity-full -m parity_full $(PYTEST_ARGS)

test-wheel: $(STAMP)
	$(PY) tests/wheel_check.py

parity: $(STAMP)
	$(PY) tests/parity_table.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	@set -e; for f in benchmarks/bench_*.py; do \
		[ -e "$$f" ] || { echo "no benchmarks yet"; break; }; \
		echo "== $$f"; $(PY) "$$f"; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
