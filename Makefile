# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and (re)installs the project when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.toolpool-installed

export CREWAI_DISABLE_TELEMETRY := true
export CREWAI_TRACING_ENABLED := false
export OTEL_SDK_DISABLED := true
export ANONYMIZED_TELEMETRY := false
export LANGCHAIN_TRACING_V2 := false
export LANGSMITH_TRACING := false
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: test demo bench lint typecheck install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[all,dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check packages tests benchmarks examples
	$(BIN)/ruff format --check packages tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest tests $(wildcard examples/notebooks/*.ipynb) --nbmake

demo: $(STAMP)
	$(BIN)/python examples/storm_demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --repeat 3 --json benchmarks/out/overhead.json
	$(BIN)/python benchmarks/storm.py --repeat 3 --json benchmarks/out/storm.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-output
