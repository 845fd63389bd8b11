# Each target does its own setup: a virtualenv in .venv with the CPU build
# of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.ready

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/python -m jobs.audit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
