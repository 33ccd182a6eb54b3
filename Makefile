# Quick start: `make run` serves on 127.0.0.1:8000, `make test` runs the whole suite.
# Both create .venv and install what is missing; nothing else needs to be on the machine
# but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench bench-full lint format typecheck lock clean screenshots

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ledgerlake serve --host 127.0.0.1 --port 8000 --data-dir ./.ledgerlake

test: $(STAMP)
	$(BIN)/python -m pytest -n 2

# Benchmarks against the raw limits (docs/BENCHMARKS.md): a few minutes at the default
# sizes; bench-full uses the full sizes (10M rows, 1M events) and takes much longer.
bench: $(STAMP)
	$(BIN)/python -m bench

bench-full: $(STAMP)
	$(BIN)/python -m bench --full

# The console's screenshots in docs/console/, taken by its browser tests.
screenshots: $(STAMP)
	mkdir -p docs/console
	LEDGERLAKE_TEST_SCREENSHOTS=$(CURDIR)/docs/console $(BIN)/python -m pytest -q tests/console/test_browser.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

# Re-resolve from pyproject.toml alone and record every version in constraints.txt.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet '.[dev]'
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^ledgerlake'; } > constraints.new && mv constraints.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
