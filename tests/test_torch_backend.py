"""The torch reference engine: loads a SKU directory and maps uint8 frames to [0, 1] float32 maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.runtime.base import Engine
from engines.runtime.config import TorchSettings, engine_settings
from engines.runtime.torch_backend import TorchEngine
from foundation.errors import EngineError
from tdad.model import ModelConfig, TDADModel, save_sku
from tdad.schedule import Schedule

S = 64


@pytest.fixture(scope="module")
def sku_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_sku(TDADModel(ModelConfig(image_size=S), Schedule(steps1=2, steps2=2)),
                    tmp_path_factory.mktemp("sku"))


@pytest.fixture(scope="module")
def engine(sku_dir: Path) -> TorchEngine:
    engine = TorchEngine(TorchSettings(threads=1))
    engine.load(sku_dir)
    return engine


def test_infer_returns_n_s_s_float32_maps_in_unit_range(engine: TorchEngine) -> None:
    assert isinstance(engine, Engine) and engine.image_size == S
    frames = np.random.default_rng(0).integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    maps = engine.infer(frames)
    assert maps.shape == (3, S, S) and maps.dtype == np.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    np.testing.assert_allclose(engine.infer(frames[1:2]), maps[1:2], atol=1e-5)  # fixed noise: batch-independent


def test_describe_and_warmup(engine: TorchEngine) -> None:
    engine.warmup()
    info = engine.describe()
    assert info["backend"] == "torch" and info["image_size"] == S and info["schedule"]["steps1"] == 2


def test_schedule_override_applies(sku_dir: Path) -> None:
    engine = TorchEngine(TorchSettings(threads=1), schedule_override={"t2": 200, "steps2": None})
    engine.load(sku_dir)
    assert engine.describe()["schedule"]["t2"] == 200 and engine.describe()["schedule"]["steps2"] == 2


def test_operator_errors_are_engine_errors(engine: TorchEngine, tmp_path: Path, sku_dir: Path) -> None:
    with pytest.raises(EngineError, match=r"meta\.json"):
        TorchEngine(TorchSettings()).load(tmp_path)
    with pytest.raises(EngineError, match="frames"):
        engine.infer(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(EngineError, match="precision"):
        engine_settings("torch", precision="int8")
    with pytest.raises(EngineError, match="t1"):
        TorchEngine(TorchSettings(), schedule_override={"t1": 5000}).load(sku_dir)
