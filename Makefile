# gapbench — setup, tests, and the experiments of the README.
# Every target uses the Python on PATH: activate a virtual environment first
# if you want one (python3 -m venv .venv && . .venv/bin/activate).

PYTHON ?= python3
# The CPU build of torch on this pin is what CI tests against; an existing
# torch >= 2.2 (a CUDA build, say) is kept as it is.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

# Cremer, Li & Duvenaud (2018), Table 2: dataset x encoder family.
TABLE2_RUNS = mnist_ffg mnist_flow fashion_ffg fashion_flow cifar10_ffg cifar10_flow
TABLE2_OUT ?= results/cremer2018
SMALL_OUT ?= results/cremer2018-small

.PHONY: help setup test test-fast quickstart bench clean-runs reproduce-table2 \
	reproduce-table2-mnist reproduce-table2-fashion reproduce-table2-cifar10 \
	reproduce-table2-small reproduce-table2-small-mnist reproduce-table2-small-fashion reproduce-table2-small-cifar10

help:
	@echo "make setup       install gapbench (and torch $(TORCH_VERSION) if no torch is installed) with test extras"
	@echo "make test        run the whole test suite (what CI runs)"
	@echo "make test-fast   skip tests marked slow"
	@echo "make quickstart  gapbench run recipes/quickstart.yaml"
	@echo "make bench       speed and accuracy benchmarks"
	@echo "make reproduce-table2   Cremer et al. 2018 Table 2 at the paper's settings (GPU-days; needs mnist, fashion-mnist, cifar10)"
	@echo "make reproduce-table2-fashion   the same for Fashion-MNIST only (likewise -mnist, -cifar10)"
	@echo "make reproduce-table2-small     the same models on a CPU budget (50 epochs, 100 points); -small-fashion etc. too"

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
	$(PYTHON) benchmarks/speed.py $(BENCH_ARGS)

clean-runs:
	rm -rf runs

# One `gapbench run` per Table 2 model, then one report across all of them.
# Each run resumes where it stopped and skips finished stages, so rerunning is cheap.
$(TABLE2_OUT)/%/report/table.md:
	gapbench run recipes/cremer2018/$*.yaml --out $(TABLE2_OUT)/$*

reproduce-table2: $(foreach r,$(TABLE2_RUNS),$(TABLE2_OUT)/$(r)/report/table.md)
	gapbench report $(addprefix $(TABLE2_OUT)/,$(TABLE2_RUNS)) --out $(TABLE2_OUT)/report

reproduce-table2-mnist reproduce-table2-fashion reproduce-table2-cifar10: reproduce-table2-%: \
		$(TABLE2_OUT)/%_ffg/report/table.md $(TABLE2_OUT)/%_flow/report/table.md
	gapbench report $(TABLE2_OUT)/$*_ffg $(TABLE2_OUT)/$*_flow --out $(TABLE2_OUT)/report-$*

# The CPU budget: recipes/cremer2018-small/ (50 epochs, gaps on 100 points).
$(SMALL_OUT)/%/report/table.md:
	gapbench run recipes/cremer2018-small/$*.yaml --out $(SMALL_OUT)/$*

reproduce-table2-small: $(foreach r,$(TABLE2_RUNS),$(SMALL_OUT)/$(r)/report/table.md)
	gapbench report $(addprefix $(SMALL_OUT)/,$(TABLE2_RUNS)) --out $(SMALL_OUT)/report

reproduce-table2-small-mnist reproduce-table2-small-fashion reproduce-table2-small-cifar10: reproduce-table2-small-%: \
		$(SMALL_OUT)/%_ffg/report/table.md $(SMALL_OUT)/%_flow/report/table.md
	gapbench report $(SMALL_OUT)/$*_ffg $(SMALL_OUT)/$*_flow --out $(SMALL_OUT)/report-$*
