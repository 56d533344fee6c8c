# The two commands a newcomer needs:
#   make run    - install everything, fetch the default model, start sidecar + service
#   make test   - install everything and run the whole test suite
# Both are idempotent: a second run only re-installs when pyproject.toml changed.
# CI also runs `make test-deploy`: the compose stack on a private Docker engine (root only).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2-135m-instruct

# CPU machines get the pinned CPU wheel (an unpinned torch pulls gigabytes of CUDA
# packages); machines with an NVIDIA driver get a CUDA build at or above the floor.
ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
TORCH_REQ ?= torch==2.13.0
else
TORCH_REQ ?= torch>=2.11
endif

.PHONY: run test lint format test-deploy install model system-deps proto clean help

help:
	@echo "make run    install, fetch $(MODEL), start the sidecar and the service on 127.0.0.1"
	@echo "make test   install, lint (ruff) and run the test suite"
	@echo "make format apply ruff's formatter and its safe fixes"
	@echo "make test-deploy  build and run the compose stack on a private Docker engine (root)"
	@echo "make proto  regenerate specdec/ from proto/"

install: $(STAMP)

# A new top-level package needs a re-install too: the editable install maps each one.
$(STAMP): pyproject.toml $(wildcard */__init__.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_REQ)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[service,dev]"
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/specdec-fetch-model $(MODEL)

# A real Prometheus server for the telemetry tests (Debian package).
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (Debian package) for the tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

run: $(STAMP) model
	VENV=$(VENV) MODEL=$(MODEL) scripts/run_stack.sh

test: lint model system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff: the linter and the formatter, configured in pyproject.toml (one line length, 110).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The compose stack built and run on a real Docker engine (scripts/test_deploy.sh says how);
# needs root, and skips with a message elsewhere.
test-deploy: $(STAMP)
	VENV=$(VENV) scripts/test_deploy.sh

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache
