# Llamaship: `make demo` runs the stack end to end; `make test` runs the whole test suite.
# Both set everything up themselves (virtual environment in $(VENV), dependencies, stubs).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.llamaship-installed
PYTEST_ARGS ?=

.PHONY: setup demo test protos check-protos bench bench-quick clean

setup: $(STAMP)
	@# Debian's Redis 7 for the Redis Cluster / Sentinel / TLS tests, only where it is missing and apt-get exists
	@if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null || ! command -v redis-cli >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server redis-sentinel redis-tools; \
	  else echo "setup: install Redis 7 (redis-server, redis-sentinel, redis-cli) for the Redis tests"; fi; \
	fi
	@# iproute2's `ip` for the multi-host test (network namespaces; tests/test_cluster_netns.py), where missing
	@if ! command -v ip >/dev/null && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq iproute2; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned, so that a CPU machine takes the CPU wheel (override TORCH_SPEC for CUDA).
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

protos: setup
	$(PY) scripts/gen_protos.py

demo: setup
	$(PY) -m llamaship.cli demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m llamaship.cli bench

bench-quick: setup
	$(PY) -m llamaship.cli bench --quick

clean:
	rm -rf .llamaship .pytest_cache
