# make run: install into .venv, migrate the database (SQLite by default), serve on $(PORT).
# make test: install with dev extras and run the whole suite (TEST_DATABASE_URL picks PostgreSQL).
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
BIN := $(VENV)/bin

.PHONY: run test test-pg migrate clean

$(BIN)/activate:
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-installed

migrate: $(VENV)/.run-installed
	$(BIN)/flask --app proxy db upgrade

# The same command the Procfile gives a hosting platform.
run: migrate
	PATH="$(abspath $(BIN)):$$PATH" PORT=$(PORT) bash -c "exec $$(sed -n 's/^web: //p' Procfile)"

test: $(VENV)/.dev-installed
	$(BIN)/pytest $(PYTEST_ARGS)

# Starts a throw-away PostgreSQL on 127.0.0.1:54329 (needs root and apt-get) and runs the suite on it.
test-pg: $(VENV)/.dev-installed
	TEST_DATABASE_URL="$$(.ci/start-postgres)" $(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) instance build *.egg-info
