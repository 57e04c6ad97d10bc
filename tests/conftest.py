"""Shared test set-up: GPU-marked tests skip cleanly on machines without CUDA + TensorRT + pycuda."""

from __future__ import annotations

import importlib.util
import os

import pytest

# Tests share 2 CPU cores; one BLAS/torch thread per process keeps timings stable and runs predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _gpu_available() -> bool:
    if not all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda")):
        return False
    try:
        import pycuda.driver as cuda

        cuda.init()
        return cuda.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _gpu_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with tensorrt and pycuda ([gpu] extra)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
