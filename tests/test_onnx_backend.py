"""OnnxEngine: real ONNX Runtime sessions on an exported random-init SKU; fast path, part graphs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.runtime.config import OnnxRuntimeSettings, engine_settings
from engines.runtime.onnx_backend import OnnxEngine, session_options
from engines.runtime.staged import STAGES
from foundation.errors import EngineError
from tests.fixtures_engines import copy_sku, random_frames


@pytest.fixture
def sku(exported_random_sku: Path) -> Path:
    return exported_random_sku


def _engine(sku: Path, **kw: object) -> OnnxEngine:
    engine = OnnxEngine(OnnxRuntimeSettings(threads=1), **kw)  # type: ignore[arg-type]
    engine.load(sku)
    return engine


def test_infer_returns_maps_in_unit_range_for_any_batch(sku: Path) -> None:
    engine = _engine(sku)
    engine.warmup()
    for n in (1, 3):
        maps = engine.infer(random_frames(n))
        assert maps.shape == (n, 64, 64) and maps.dtype == np.float32
        assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_unrolled_graph_and_part_graphs_agree(sku: Path) -> None:
    fast, parts = _engine(sku), _engine(sku, unrolled=False)
    assert fast.describe()["unrolled"] and not parts.describe()["unrolled"]
    frames = random_frames(2)
    np.testing.assert_allclose(fast.infer(frames), parts.infer(frames), rtol=0, atol=1e-5)


def test_a_map_does_not_depend_on_its_batch(sku: Path) -> None:
    engine = _engine(sku)
    frames = random_frames(3)
    np.testing.assert_allclose(engine.infer(frames)[1:2], engine.infer(frames[1:2]), rtol=0, atol=1e-5)


def test_infer_timed_reports_every_stage_and_the_same_maps(sku: Path) -> None:
    engine = _engine(sku)
    frames = random_frames(1)
    maps, ms = engine.infer_timed(frames)
    assert set(ms) == set(STAGES)
    assert all(v >= 0.0 for v in ms.values()) and ms["stage1"] > 0.0 and ms["segment"] > 0.0
    np.testing.assert_allclose(maps, engine.infer(frames), rtol=0, atol=1e-5)


def test_schedule_override_runs_the_part_graphs(sku: Path) -> None:
    engine = _engine(sku, schedule_override={"steps1": 2, "steps2": 3, "t1": None})
    info = engine.describe()
    assert not info["unrolled"]
    assert (info["schedule"]["steps1"], info["schedule"]["steps2"]) == (2, 3)
    assert not np.allclose(engine.infer(random_frames(1)), _engine(sku).infer(random_frames(1)), atol=1e-6)


def test_invalid_schedule_override_is_an_engine_error(sku: Path) -> None:
    with pytest.raises(EngineError, match="schedule override"):
        _engine(sku, schedule_override={"steps2": 10_000})


def test_missing_graph_names_the_export_command(sku: Path, tmp_path: Path) -> None:
    broken = copy_sku(sku, tmp_path / "sku")
    (broken / "denoiser.onnx").unlink()
    with pytest.raises(EngineError, match=r"denoiser\.onnx is missing; run: inspector export --sku-dir"):
        _engine(broken)


def test_corrupt_graph_is_an_engine_error(sku: Path, tmp_path: Path) -> None:
    broken = copy_sku(sku, tmp_path / "sku")
    (broken / "encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(EngineError, match=r"encoder\.onnx: ONNX Runtime cannot load it"):
        _engine(broken)


def test_missing_meta_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"meta\.json"):
        _engine(tmp_path)


def test_wrong_frame_size_and_precision_are_refused(sku: Path) -> None:
    with pytest.raises(EngineError, match="64 x 64"):
        _engine(sku).infer(random_frames(1, size=32))
    with pytest.raises(EngineError, match=r"engine\.precision: Input should be 'fp32' or 'int8'"):
        engine_settings("onnxruntime", precision="fp16")


def test_session_options_are_tuned_for_latency() -> None:
    options = session_options(3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_graphs_from_other_weights_are_refused(sku: Path, tmp_path: Path) -> None:
    retrained = copy_sku(sku, tmp_path / "retrained")
    with (retrained / "model.safetensors").open("ab") as f:
        f.write(b"\0")  # stands in for new weights written by a retraining
    with pytest.raises(EngineError, match=r"exported from other weights.*inspector export --sku-dir"):
        _engine(retrained)
    meta = json.loads((retrained / "meta.json").read_text())
    del meta["export"]  # save_sku rewrites meta.json without the export record
    (retrained / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="no export record"):
        _engine(retrained)
