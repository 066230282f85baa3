# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs into .venv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build on machines without a GPU; override for CUDA, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test faults bench lint clean redis-server
AZURITE := .tools/node_modules/.bin/azurite-blob

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[worker,dev]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found; installing it with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; } || { \
	  echo "Could not install redis-server. Install it yourself: apt-get install redis-server (or brew install redis)"; exit 1; }

# Azurite, Microsoft's Blob Storage emulator, for the storage tests (npm, loopback only).
$(AZURITE):
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js (apt-get install nodejs npm)"; exit 1; }
	mkdir -p .tools && cd .tools && npm install --silent --no-audit --no-fund azurite@3

demo: $(STAMP) redis-server
	$(PY) -m diffqueue.cli demo --workdir .demo

# pytest exits 5 when no test ran; make turns any non-zero exit into a failure.
test: $(STAMP) redis-server $(AZURITE)
	$(PY) -m pytest tests -q

# The long fault-injection run (the short one is part of `make test`); its table also lands in faults-report.md.
faults: $(STAMP) redis-server $(AZURITE)
	DIFFQUEUE_FAULTS=long DIFFQUEUE_FAULTS_REPORT=faults-report.md $(PY) -m pytest tests/faults -q

bench: $(STAMP) redis-server
	$(PY) -m bench.run

lint: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu

clean:
	rm -rf .demo bench/results .pytest_cache .tools faults-report.md
