# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install exactly the versions in requirements.lock (reinstalled
# when the lock or pyproject.toml changes), so a fresh clone installs today what it installed
# yesterday. `make lock` refreshes the lock; `make test-latest` runs the suite on the newest
# releases in a separate venv (.venv-latest) to learn early when upstream breaks something.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.toolpool-installed
LOCK := requirements.lock
LATEST := .venv-latest

export CREWAI_DISABLE_TELEMETRY := true
export CREWAI_TRACING_ENABLED := false
export OTEL_SDK_DISABLED := true
export ANONYMIZED_TELEMETRY := false
export LANGCHAIN_TRACING_V2 := false
export LANGSMITH_TRACING := false
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: test test-latest demo bench lint typecheck install lock clean suite redis-server unasync

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The lock pins every package of `.[all,dev]`; the project itself goes in editable, without deps.
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# Re-resolve `.[all,dev]` to the newest releases that fit pyproject.toml's ranges.
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv>=0.4"
	$(BIN)/python -m uv pip compile --quiet --python $(BIN)/python --extra all --extra dev \
		--custom-compile-command "make lock" pyproject.toml -o $(LOCK)

# Besides ruff: the import contracts (import-linter, see pyproject.toml) and no import cycle
# of more than 2 modules, counting every import statement (tools/import_cycles.py).
lint: $(STAMP)
	$(BIN)/ruff check packages tests benchmarks examples tools
	$(BIN)/ruff format --check packages tests benchmarks examples tools
	$(BIN)/python tools/unasync.py --check
	$(BIN)/python tools/lint_imports.py
	$(BIN)/python tools/lint_imports.py --self-test
	$(BIN)/python tools/import_cycles.py --max 2

# The thread driver's request path is generated from the asyncio driver's (tools/unasync.py):
# edit packages/core/toolpool/_async/request.py, then run this.
unasync: $(STAMP)
	$(BIN)/python tools/unasync.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The fleet tests start a real redis-server (the Debian package) on a free loopback port.
# Installed here when missing and we are root with apt-get; otherwise the exact command to run.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (Debian package) for the fleet tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "the fleet tests need redis-server; run: sudo apt-get install -y redis-server" >&2; \
	    exit 1; \
	  fi; }

# The suite itself, with whichever venv BIN points at (the locked one by default).
suite: redis-server
	$(BIN)/python -m pytest tests $(wildcard examples/notebooks/*.ipynb) --nbmake

test: lint typecheck
	$(MAKE) suite

# The same suite on the newest releases (no lock): run it after `make lock`, before a release,
# and whenever a fresh clone behaves differently from yours.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[all,dev]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/mypy
	$(MAKE) suite BIN=$(LATEST)/bin

demo: $(STAMP)
	$(BIN)/python examples/storm_demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --repeat 3 --json benchmarks/out/overhead.json
	$(BIN)/python benchmarks/storm.py --repeat 3 --json benchmarks/out/storm.json

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache .mypy_cache .ruff_cache demo-output
