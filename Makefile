# One command each for the main job and the tests; both install into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data)
TORCH ?= torch==2.13.0

.PHONY: install demo test bench gpu-check clean

$(BIN)/multimix: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/multimix

# The main job: prepare the built-in synthetic demo set, train MultiMix on a local Ray, evaluate.
demo: install
	$(BIN)/multimix demo --out out/demo

# The tests (real-data tests read MULTIMIX_DATA; they skip with a reason when it is unset).
test: install
	MULTIMIX_DATA=$${MULTIMIX_DATA:-$(DATA)} $(BIN)/python -m pytest -q

bench: install
	$(BIN)/multimix bench step
	$(BIN)/multimix bench data

# On a fresh GPU node (no install needed; see scripts/README.md): collectives, bench step/train
# on CUDA, a 2-epoch GPU run + evaluate; summary in out/gpu-check/gpu_check.{json,md}
gpu-check:
	scripts/gpu_check.sh

clean:
	rm -rf $(VENV) out runs
