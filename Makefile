# The two commands of the README: `make train` (the default run) and `make test` (the suite).
# Both create the virtual environment when it is missing and install what changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact CPU/GPU build of torch is installed first: an open range would pull a
# different build (and several GB of CUDA wheels) through another package's requirement.
TORCH ?= torch==2.13.0

.PHONY: install train test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/distlm train $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check distlm tests benchmarks
	$(BIN)/ruff format --check distlm tests benchmarks

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
