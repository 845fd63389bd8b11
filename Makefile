# Each target does its own setup: a virtualenv in .venv with the CPU build
# of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
# The package is installed editable in "compat" mode (a path entry, not an
# import hook), so a folder named `lineage` in the current directory (the
# clone, seen from its parent) can never shadow the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: setup demo test test-all lint clean

$(BIN)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# test-all also installs mergekit (the `merge` extra): lineage certify and the
# evaluation set's real mergekit merges are tested with it.
$(BIN)/.ready-merge: $(BIN)/.ready
	$(BIN)/pip install -q -e '.[test,merge]' --config-settings editable_mode=compat
	touch $@

setup: $(BIN)/.ready

demo: setup
	RAY_AUTH_MODE=disabled $(BIN)/lineage audit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The quick loop: everything but the tests marked slow (Ray clusters, killed
# and interrupted runs, the evaluation set, the limits).
test: lint
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

# Everything, as CI runs it.
test-all: lint $(BIN)/.ready-merge
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
