# gapbench — setup, tests, and the experiments of the README.
# Every target uses the Python on PATH: activate a virtual environment first
# if you want one (python3 -m venv .venv && . .venv/bin/activate).

PYTHON ?= python3
# The CPU build of torch on this pin is what CI tests against; an existing
# torch >= 2.2 (a CUDA build, say) is kept as it is.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

# Cremer, Li & Duvenaud (2018), Table 2: dataset x encoder family.
TABLE2_RUNS = mnist_ffg mnist_flow fashion_ffg fashion_flow cifar10_ffg cifar10_flow
TABLE2_OUT ?= results/cremer2018
SMALL_OUT ?= results/cremer2018-small

FOLLOWUPS = encoder-capacity decoder-capacity train-vs-heldout gaps-over-training
# Checkpoints of the gaps-over-training experiment: the ends of the IWAE schedule's stages
# (3^i epochs each), and a CPU-budget ladder up to small.yaml's 50 epochs.
OVER_TRAINING_EPOCHS ?= 13 40 121 364 1093 3280
OVER_TRAINING_EPOCHS_SMALL ?= 5 10 25 50

.PHONY: help setup test test-fast quickstart bench bench-speed bench-evaluation bench-before-after gpu-check clean-runs reproduce-table2 \
	reproduce-table2-mnist reproduce-table2-fashion reproduce-table2-cifar10 \
	reproduce-table2-small reproduce-table2-small-mnist reproduce-table2-small-fashion reproduce-table2-small-cifar10 \
	reproduce-followups reproduce-followups-small reproduce-methods-digits reproduce-methods-small reproduce-methods \
	$(foreach f,$(FOLLOWUPS),reproduce-$(f) reproduce-$(f)-small)

help:
	@echo "make setup       install gapbench (and torch $(TORCH_VERSION) if no torch is installed) with test extras"
	@echo "make test        run the whole test suite (what CI runs)"
	@echo "make test-fast   skip tests marked slow"
	@echo "make quickstart  gapbench run recipes/quickstart.yaml"
	@echo "make bench       speed and accuracy benchmarks: bench-speed (the estimators) and bench-evaluation"
	@echo "make bench-evaluation   every evaluate-gaps stage of the CPU-budget Fashion-MNIST FFG model, against a 4x-budget reference"
	@echo "make bench-before-after   evaluate-gaps of the commit before the fast evaluation against this checkout, side by side"
	@echo "make gpu-check   one GPU, under 8 minutes: bench, compiled AIS, the paper's AIS settings -> results/gpu/<device>/"
	@echo "                 (GPU_CHECK_ARGS=\"--data-dir DIR\" for Fashion-MNIST; \"--quick --device cpu\" for a CPU smoke run)"
	@echo "make reproduce-table2   Cremer et al. 2018 Table 2 at the paper's settings (GPU-days; needs mnist, fashion-mnist, cifar10)"
	@echo "make reproduce-table2-fashion   the same for Fashion-MNIST only (likewise -mnist, -cifar10)"
	@echo "make reproduce-table2-small     the same models on a CPU budget (50 epochs, 100 points); -small-fashion etc. too"
	@echo "make reproduce-followups        the paper's follow-ups on Fashion-MNIST: $(FOLLOWUPS)"
	@echo "                                (each alone: make reproduce-encoder-capacity etc.; add -small for the CPU budget)"
	@echo "make reproduce-methods-digits   every training method (recipes/methods/) on the digits VAE, with diagnostics and 100"
	@echo "                                training points each, one report (methods.md); -small: Fashion-MNIST at the CPU budget"
	@echo "make reproduce-methods          the same at the paper's budget (recipes/methods/fashion_full.yaml; GPU-days)"

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart:
	gapbench run recipes/quickstart.yaml

# Both benchmarks: the estimators against reference implementations, then the whole evaluation.
bench: bench-speed bench-evaluation

bench-speed:
	$(PYTHON) benchmarks/speed.py --compile $(BENCH_ARGS)

# Trains recipes/cremer2018-small/fashion_ffg.yaml's model into runs/bench (once; about 8 minutes on a CPU),
# times each evaluation stage on 16 of its test points against a 4x-budget reference and beside the local
# fits of before the fast procedure (about 15 minutes more); EVAL_BENCH_ARGS="--run DIR --points 8" etc.
bench-evaluation:
	$(PYTHON) benchmarks/evaluation.py --before $(EVAL_BENCH_ARGS)

# The code of before the fast evaluation (BEFORE: the commit the work began from) against this checkout,
# on the same run (BA_RUN, trained by bench-evaluation) and points, both at once, one thread each: every
# stage's seconds, the local fits' steps, and the estimates side by side; BA_ARGS="--points 100" etc.
BEFORE ?= ec25fb7
BA_RUN ?= runs/bench/fashion_ffg_50ep
bench-before-after:
	$(PYTHON) benchmarks/before_after.py --run $(BA_RUN) --before $(BEFORE) $(BA_ARGS)

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

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

# ---------------------------------------------------------------- follow-up experiments
# Cremer et al.'s follow-ups, on Fashion-MNIST with the FFG encoder, each into
# results/<experiment>[-small]/ and ending with a report there. The -small targets
# use the CPU budget of reproduce-table2-small with FFG local fits only
# (recipes/cremer2018-followups-small/).

.PRECIOUS: $(TABLE2_OUT)/%/checkpoint.pt $(SMALL_OUT)/%/checkpoint.pt

# The trained Table 2 model the follow-ups compare with (results in git carry no checkpoints:
# on a fresh clone this retrains it, to the same weights for the same seed on a CPU).
$(TABLE2_OUT)/%/checkpoint.pt:
	gapbench run recipes/cremer2018/$*.yaml --out $(TABLE2_OUT)/$*

$(SMALL_OUT)/%/checkpoint.pt:
	gapbench run recipes/cremer2018-small/$*.yaml --out $(SMALL_OUT)/$*

reproduce-followups: $(foreach f,$(FOLLOWUPS),reproduce-$(f))
reproduce-followups-small: $(foreach f,$(FOLLOWUPS),reproduce-$(f)-small)

# A variant of Table 2's Fashion-MNIST FFG model, then a report of the two side by side:
# $(1) experiment folder, $(2) recipe in $(4), $(3) the Table 2 results folder.
define against_table2
	gapbench run $(4)/$(2).yaml --out results/$(1)/fashion_ffg_$(2)
	gapbench report $(3)/fashion_ffg results/$(1)/fashion_ffg_$(2) --out results/$(1)/report
endef

# A larger encoder (500-unit layers): does the amortization gap shrink?
reproduce-encoder-capacity: $(TABLE2_OUT)/fashion_ffg/checkpoint.pt
	$(call against_table2,encoder-capacity,encoder500,$(TABLE2_OUT),recipes/cremer2018-followups)

reproduce-encoder-capacity-small: $(SMALL_OUT)/fashion_ffg/checkpoint.pt
	$(call against_table2,encoder-capacity-small,encoder500,$(SMALL_OUT),recipes/cremer2018-followups-small)

# A larger decoder (500-unit layers).
reproduce-decoder-capacity: $(TABLE2_OUT)/fashion_ffg/checkpoint.pt
	$(call against_table2,decoder-capacity,decoder500,$(TABLE2_OUT),recipes/cremer2018-followups)

reproduce-decoder-capacity-small: $(SMALL_OUT)/fashion_ffg/checkpoint.pt
	$(call against_table2,decoder-capacity-small,decoder500,$(SMALL_OUT),recipes/cremer2018-followups-small)

# Table 2's model on training points beside its held-out (test) points: one column each.
reproduce-train-vs-heldout: $(TABLE2_OUT)/fashion_ffg/checkpoint.pt
	gapbench evaluate-gaps $(TABLE2_OUT)/fashion_ffg --split train --resume
	gapbench report $(TABLE2_OUT)/fashion_ffg --split train,test --out results/train-vs-heldout/report

reproduce-train-vs-heldout-small: $(SMALL_OUT)/fashion_ffg/checkpoint.pt
	gapbench evaluate-gaps $(SMALL_OUT)/fashion_ffg --recipe recipes/cremer2018-followups-small/fashion_ffg.yaml --split train --resume
	gapbench report $(SMALL_OUT)/fashion_ffg --split train,test --out results/train-vs-heldout-small/report

# The gaps of one model at several points of its training: each checkpoint folder starts
# as a copy of the previous one and trains on (resuming exactly), then is evaluated.
# One training keeping the weights at each epoch of $(2) (train.keep_checkpoints), then the gaps of
# each kept epoch (gaps/epoch_<e>/ of the run folder) and one report with a column per epoch.
# An epoch after an early stop is not kept: it is skipped, with a line saying so.
define over_training
	@set -e; run=results/$(1)/run; keep=$$(echo $(2) | tr ' ' ','); last=$$(echo $(2) | awk '{print $$NF}'); \
	echo "gapbench run $(3) --set train.num_epochs=$$last --set train.keep_checkpoints=[$$keep] --out $$run"; \
	gapbench run $(3) --set train.num_epochs=$$last --set "train.keep_checkpoints=[$$keep]" --out $$run; \
	evaluated=; for e in $(2); do \
	  if [ ! -f $$run/checkpoints/epoch_$$e.pt ]; then echo "epoch $$e: not kept (training stopped early)"; continue; fi; \
	  echo "gapbench evaluate-gaps $$run --checkpoint $$e --resume"; \
	  gapbench evaluate-gaps $$run --checkpoint $$e --resume; \
	  evaluated="$$evaluated$${evaluated:+,}$$e"; done; \
	gapbench report $$run --checkpoint $$evaluated --out results/$(1)/report
endef

# Every training method of recipes/methods/ on one model, then one report across them:
# -digits on the quickstart's digits VAE (minutes each), -small on Table 2's Fashion-MNIST FFG model at the CPU budget.
METHODS ?= vae iwae svi savae iterative aggressive hmc air bsvi

# Each method's run, then 100 of its training points (the encoder's generalization), then one
# report: the gaps table, methods.md (a column per method, paired against vae) and diagnostics.md.
define methods_experiment
	@set -e; for m in $(METHODS); do \
	  gapbench run $(2) --out results/$(1)/$(3)_$$m; \
	  gapbench evaluate-gaps results/$(1)/$(3)_$$m --recipe $(2) --split train --resume; done
	gapbench report $(foreach m,$(METHODS),results/$(1)/$(3)_$(m)) --out results/$(1)/report
endef

reproduce-methods-digits:
	$(call methods_experiment,methods-digits,recipes/methods/digits_$$m.yaml,digits)

reproduce-methods-small:
	$(call methods_experiment,methods-small,recipes/methods/fashion_$$m.yaml,fashion)

# The paper's budget (GPU-days on a CPU): one recipe, the method set on the command line.
reproduce-methods:
	@set -e; for m in $(METHODS); do \
	  gapbench run recipes/methods/fashion_full.yaml --set train.method=$$m --set name=fashion_$$m \
	    --out results/methods/fashion_$$m; \
	  gapbench evaluate-gaps results/methods/fashion_$$m --recipe recipes/methods/fashion_full.yaml \
	    --split train --resume; done
	gapbench report $(foreach m,$(METHODS),results/methods/fashion_$(m)) --out results/methods/report

reproduce-gaps-over-training:
	$(call over_training,gaps-over-training,$(OVER_TRAINING_EPOCHS),recipes/cremer2018/fashion_ffg.yaml)

reproduce-gaps-over-training-small:
	$(call over_training,gaps-over-training-small,$(OVER_TRAINING_EPOCHS_SMALL),recipes/cremer2018-followups-small/fashion_ffg.yaml)
