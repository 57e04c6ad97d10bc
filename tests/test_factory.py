"""create_engine: backend registry, errors an operator can cause, loaded engines that satisfy Engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engines.runtime import BACKENDS, create_engine, engine_settings
from engines.runtime.base import Engine
from foundation.errors import EngineError
from tests.fixtures_engines import random_frames


@pytest.fixture
def sku(exported_random_sku: Path) -> Path:
    return exported_random_sku


def test_unknown_backend_lists_the_valid_ones(sku: Path) -> None:
    with pytest.raises(EngineError, match="torch, onnxruntime, tensorrt"):
        create_engine(engine_settings("openvino"), sku)


def test_unknown_precision_is_refused(sku: Path) -> None:
    with pytest.raises(EngineError, match="precision"):
        create_engine(engine_settings("onnxruntime", precision="fp8"), sku)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_the_gpu_extra_names_the_install(sku: Path) -> None:
    with pytest.raises(EngineError, match=r"pip install 'tdad-inspector\[gpu\]'"):
        create_engine(engine_settings("tensorrt"), sku)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cpu_backends_come_back_loaded(sku: Path, backend: str) -> None:
    engine = create_engine(engine_settings(backend, threads=1), sku)
    assert isinstance(engine, Engine)
    assert engine.backend == backend and engine.image_size == 64
    maps = engine.infer(random_frames(2))
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert engine.describe()["backend"] == backend


def test_registry_names_every_backend() -> None:
    assert set(BACKENDS) == {"torch", "onnxruntime", "tensorrt"}
