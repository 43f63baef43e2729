# Set-up and checks. `make install` then `make test` is all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test test-repeat soak lint typecheck schemas docs bench clean

EXAMPLES := examples/fleet_counter

install: $(BIN)/supersim-worker $(VENV)/.examples-installed tests/node_modules/.installed
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server not found: installing it with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }
	@command -v redis-server >/dev/null 2>&1 && redis-server --version

$(BIN)/supersim-worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# The worked example of docs/handlers.md, a third-party handler package installed as one
# (its entry point registers it); tests/test_example_plugin.py runs its tests and replays it.
$(VENV)/.examples-installed: $(BIN)/supersim-worker $(EXAMPLES:%=%/pyproject.toml)
	$(BIN)/pip install -q $(EXAMPLES:%=-e %)
	@touch $@

tests/node_modules/.installed: tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# The suite runs in TEST_WORKERS processes (pytest-xdist), each with its own servers; a test
# file stays in one process, so a file's module-scoped scenarios run once. The files marked
# `alone` (many worker processes each) run afterwards, by themselves. TEST_WORKERS=0 runs
# the rest in this process too, one test after another.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q
PARALLEL := $(PYTEST) -n $(TEST_WORKERS) --dist loadfile
# The whole suite, extra pytest arguments in $(1); fails if either part fails.
SUITE = $(PARALLEL) -m "not alone" $(1); parallel=$$?; $(PYTEST) -m alone $(1); \
	alone=$$?; [ $$parallel = 0 ] && [ $$alone = 0 ]

test:
	$(call SUITE,)

# Flakiness check: the alert and multi-replica test files REPEAT times in a row, then the
# whole suite SUITE_REPEAT times; stops at the first failing run and says which.
REPEAT ?= 200
SUITE_REPEAT ?= 5
REPEAT_FILES ?= $(filter-out tests/test_alerts_live.py,$(sort $(wildcard tests/test_alerts_*.py tests/test_*replica*.py)))
test-repeat:
	@log=$$(mktemp); for i in $$(seq 1 $(REPEAT)); do \
		$(PARALLEL) -p no:cacheprovider $(REPEAT_FILES) >"$$log" 2>&1 \
			|| { echo "alert/replica files failed on run $$i of $(REPEAT):"; tail -40 "$$log"; exit 1; }; \
	done; echo "alert/replica files: $(REPEAT) of $(REPEAT) runs passed"
	@log=$$(mktemp); for i in $$(seq 1 $(SUITE_REPEAT)); do \
		( $(call SUITE,-p no:cacheprovider) ) >"$$log" 2>&1 \
			|| { echo "suite failed on run $$i of $(SUITE_REPEAT):"; tail -40 "$$log"; exit 1; }; \
	done; echo "whole suite: $(SUITE_REPEAT) of $(SUITE_REPEAT) runs passed"

soak:
	$(BIN)/python tests/soak/live_soak.py $(SOAK_ARGS)

lint:
	$(BIN)/ruff check worker tests examples
	$(BIN)/ruff format --check worker tests examples

typecheck:
	$(BIN)/mypy --strict worker $(EXAMPLES:%=%/src)

schemas:
	$(BIN)/python -m worker.events.schemas schemas

# The settings reference, generated from the settings models' field descriptions.
docs:
	$(BIN)/python -m worker.cli.settings_doc docs/settings.md

# Every benchmark of tests/bench, figures into BENCHMARKS.md; BENCH="peer startup" runs only
# those. `peer` makes async-kinesis' own virtualenv from PyPI under the system temp dir once.
BENCH ?=
bench: $(BIN)/supersim-worker tests/node_modules/.installed
	$(BIN)/python tests/bench/run.py $(BENCH)

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache .mypy_cache .ruff_cache build *.egg-info examples/*/src/*.egg-info
