# gapbench — setup, tests, and the experiments of the README.
# Every target uses the Python on PATH: activate a virtual environment first
# if you want one (python3 -m venv .venv && . .venv/bin/activate).

PYTHON ?= python3
# The CPU build of torch on this pin is what CI tests against; an existing
# torch >= 2.2 (a CUDA build, say) is kept as it is.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: help setup test test-fast quickstart bench clean-runs

help:
	@echo "make setup       install gapbench (and torch $(TORCH_VERSION) if no torch is installed) with test extras"
	@echo "make test        run the whole test suite (what CI runs)"
	@echo "make test-fast   skip tests marked slow"
	@echo "make quickstart  gapbench run recipes/quickstart.yaml"
	@echo "make bench       speed and accuracy benchmarks"

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart:
	gapbench run recipes/quickstart.yaml

bench:
	$(PYTHON) benchmarks/bdmc_fixture.py

clean-runs:
	rm -rf runs
