"""Shared fixtures: the real SmolLM2 model on the CPU, its text and the device for parity tests (helpers that
are not fixtures live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist workers (CI runs two on its two cores): one thread each
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the parity tests (cpu or cuda); default cpu")


@pytest.fixture(scope="session")
def device(request) -> str:
    """Where the parity tests run our forward and transformers' (`pytest --device cuda` on a GPU machine)."""
    return request.config.getoption("--device")


def pytest_collection_modifyitems(config, items):
    """Every test that runs the real model (the `smol` fixture, directly or through another fixture) is `slow`, so
    `pytest -m "not slow"` is the fast local loop; `cuda` tests are skipped without a GPU."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if skip is not None and "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core runner a second one thrashes (measured 7x slower decode, 200x per
    call on tiny tensors)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """The default model converted to a safetensors folder (GGUF converted once, cached)."""
    from tierkv.models.weights import default_model_path, resolve_model

    return resolve_model(default_model_path())


@pytest.fixture(scope="session")
def smol(smol_folder):
    """SmolLM2-135M-Instruct in fp32 on the CPU, loaded once."""
    import tierkv

    return tierkv.load(str(smol_folder), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def text_ids(smol):
    """Real English text (pydoc topics, shipped with Python) as SmolLM2 token ids."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return smol.tokenizer(text, add_special_tokens=False)["input_ids"]
