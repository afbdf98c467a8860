"""Suite-wide test setup: GPU tests skip cleanly where there is no CUDA device or no CuPy."""

from __future__ import annotations

import importlib.util

import pytest


def _gpu_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_ready():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
