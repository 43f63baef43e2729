# Set-up and checks. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test lint typecheck schemas bench clean

install: $(BIN)/supersim-worker tests/node_modules/.installed
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server not found: installing it with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v redis-server >/dev/null 2>&1 && redis-server --version

$(BIN)/supersim-worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

tests/node_modules/.installed: tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests

typecheck:
	$(BIN)/mypy --strict worker

schemas:
	$(BIN)/python -m worker.schema_files schemas

bench:
	$(BIN)/python tests/bench/run.py

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache .mypy_cache .ruff_cache build *.egg-info
