"""Fixtures for kernel tests: the device Triton kernels run on and seeded random generators.

`-m cuda` tests need a CUDA GPU; with TRITON_INTERPRET=1 (and triton installed) they also run on the
CPU through Triton's interpreter, which is how kernels are debugged without a GPU.
"""

import os

import pytest
import torch

from tierkv.kernels.dispatch import triton_version


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_version() is not None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Lift tests/conftest.py's no-GPU skip from this folder's `cuda` tests while Triton interprets."""
    if torch.cuda.is_available() or not _interpreting():
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("cuda"):
            item.own_markers[:] = [m for m in item.own_markers if m.name != "skip"]


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels run in this session: the GPU, or the CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so failures reproduce."""
    return torch.Generator().manual_seed(1234)
