# The two set-up commands: `make demo` and `make test`. Each creates .venv and installs everything first.
# `make test` lints (ruff, configured in pyproject.toml) and runs every test; `make test-fast` runs the fast tier
# alone (unit tests of heads, sampling, metrics: no nnU-Net process), `make lint` the linter alone.
PYTHON ?= python3
VENV ?= .venv
# torch pinned to a release nnunetv2 supports; override e.g. TORCH="torch==2.5.1 torchvision==0.20.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.nndiffseg-installed

.PHONY: install demo lint test test-fast benchmark clean

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "nndiffseg needs Python 3.10 or newer; set PYTHON=python3.X")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nnDiffSeg_demo -o demo_output --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

# each trainer's training and prediction time against nnUNetTrainer's, on toy data (a few minutes)
benchmark: $(STAMP)
	rm -rf benchmark_output/timing
	$(BIN)/python benchmarks/timing.py --work_dir benchmark_output/timing

clean:
	rm -rf $(VENV) demo_output benchmark_output *.egg-info
