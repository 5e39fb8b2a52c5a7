# Quick start: `make demo` runs the main job on the embedded testbed, `make test` the fast tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

# torch is installed only when missing: the pinned CPU build lies on this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,deploy]"
	touch $(STAMP)

demo: install
	$(BIN)/treeq demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/treeq bench fp
	$(BIN)/treeq bench ptq
	$(BIN)/treeq bench kernels

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
