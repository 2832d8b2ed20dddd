# make run: install into .venv, migrate the database (SQLite by default), serve on $(PORT)
# (sandbox mode: the simulator on $(SANDBOX_PORT), by default the port after $(PORT)).
# make test: install with dev extras and run the whole suite (TEST_DATABASE_URL picks PostgreSQL).
# make bench: install the bench extras and run bench/ (SQLite and a throw-away PostgreSQL); see bench/README.md.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
SANDBOX_PORT ?=
BIN := $(VENV)/bin

.PHONY: run test test-pg migrate demo clean bench bench-instructions bench-profile

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

# With credentials: the Procfile's own command. Without: sandbox mode (a local Twilio simulator, loud banner).
# Only one of the two: refused, naming the missing one (not a sandbox under another account).
run: $(VENV)/.run-installed
	@if [ -n "$$TWILIO_ACCOUNT_SID" ] && [ -n "$$TWILIO_AUTH_TOKEN" ]; then \
	  $(BIN)/flask --app proxy db upgrade && \
	  PATH="$(abspath $(BIN)):$$PATH" PORT=$(PORT) exec bash -c "exec $$(sed -n 's/^web: //p' Procfile)"; \
	elif [ -n "$$TWILIO_ACCOUNT_SID" ] || [ -n "$$TWILIO_AUTH_TOKEN" ]; then \
	  if [ -n "$$TWILIO_ACCOUNT_SID" ]; then set -- TWILIO_ACCOUNT_SID TWILIO_AUTH_TOKEN; else set -- TWILIO_AUTH_TOKEN TWILIO_ACCOUNT_SID; fi; \
	  echo "$$1 is set but $$2 is not: set both to serve for real, or neither for the sandbox." >&2; exit 2; \
	else \
	  echo "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN are not set: starting in SANDBOX mode."; \
	  exec $(BIN)/flask --app proxy sandbox up --port $(PORT)$(if $(SANDBOX_PORT), --sandbox-port $(SANDBOX_PORT)); \
	fi

# A scripted conversation through the proxy and the simulator; exits non-zero if a step misbehaves.
demo: $(VENV)/.run-installed
	env -u TWILIO_ACCOUNT_SID -u TWILIO_AUTH_TOKEN $(BIN)/flask --app proxy sandbox demo

test: $(VENV)/.dev-installed
	$(BIN)/pytest $(PYTEST_ARGS)

# Starts a throw-away PostgreSQL on 127.0.0.1:25432 (needs root and apt-get) and runs the suite on it.
test-pg: $(VENV)/.dev-installed
	TEST_DATABASE_URL="$$(.ci/start-postgres)" $(BIN)/pytest $(PYTEST_ARGS)

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[bench]'
	touch $@ $(VENV)/.run-installed

# Benchmarks (about 11 minutes). PostgreSQL: BENCH_POSTGRES_URL, else a throw-away cluster started on
# 127.0.0.1:$(BENCH_PGPORT) (needs root; without it only SQLite runs), stopped and removed afterwards.
# wrk is installed with apt-get when possible, else the aiohttp client generates the load.
BENCH_PGPORT ?= 25440
BENCH_PGDIR ?= /tmp/bench-postgres
# PostgreSQL as deployed: every commit flushed to disk (BENCH_PG_FSYNC=off measures without it).
BENCH_PG_FSYNC ?= on
bench: $(VENV)/.bench-installed
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || \
	  echo "wrk unavailable: the aiohttp client generates the load"
	@url="$$BENCH_POSTGRES_URL"; ours=""; \
	if [ -z "$$url" ]; then url=$$(PG_FSYNC=$(BENCH_PG_FSYNC) PGPORT=$(BENCH_PGPORT) PGDIR=$(BENCH_PGDIR) .ci/start-postgres) \
	  && ours=1 || url=""; fi; \
	BENCH_POSTGRES_URL="$$url" PYTHONPATH="$(CURDIR)" $(BIN)/python -m bench.run; status=$$?; \
	if [ -n "$$ours" ]; then PGDIR=$(BENCH_PGDIR) .ci/stop-postgres; fi; exit $$status

# Instructions a request costs one worker, counted by valgrind (repeatable where timings are not; ~5 minutes a
# database): installs valgrind and gcc with apt-get when missing; BENCH_POSTGRES_URL adds PostgreSQL.
bench-instructions: $(VENV)/.bench-installed
	@{ command -v valgrind && command -v cc; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind gcc >/dev/null; } || \
	  echo "valgrind or a C compiler unavailable: the benchmark will say which"
	PYTHONPATH="$(CURDIR)" $(BIN)/python -m bench.instructions

# py-spy on one worker under load: make bench-profile SCENARIO=gateway DB=sqlite [PROFILE_ARGS=--gil]
SCENARIO ?= gateway
DB ?= sqlite
bench-profile: $(VENV)/.bench-installed
	PYTHONPATH="$(CURDIR)" $(BIN)/python -m bench.profile $(SCENARIO) --db $(DB) $(PROFILE_ARGS)

# Not instance/: it holds the default database (windows, held messages, the outbox), and the sandbox's.
clean:
	rm -rf $(VENV) build *.egg-info
