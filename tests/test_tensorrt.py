"""TensorRT backend: plan naming and stale-plan checks (anywhere), build + parity + INT8 accuracy (GPU only)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from engines.runtime.staged import file_sha256
from engines.runtime.tensorrt_backend import check_plan, plan_path, plan_tag
from foundation.errors import EngineError
from tests.fixtures_engines import copy_sku, random_frames
from tests.test_parity import part_frames, rel_error

FP16_BOUND = 1e-2
INT8_AUROC_POINTS = 0.5


def test_plan_tag_pins_gpu_trt_and_precision() -> None:
    tag = plan_tag("NVIDIA H100 80GB HBM3", "10.3.0", "fp16")
    assert tag == "nvidia-h100-80gb-hbm3.trt10.3.0.fp16"
    assert plan_path(Path("/s"), "tdad", tag) == Path("/s/tdad.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.plan")


def _fake_plan(sku: Path, name: str, tag: str, onnx_sha: str) -> Path:
    path = plan_path(sku, name, tag)
    path.write_bytes(b"plan")
    path.with_suffix(".json").write_text(json.dumps({"onnx_sha256": onnx_sha}))
    return path


def test_check_plan_refuses_missing_foreign_and_stale_plans(tmp_path: Path) -> None:
    (tmp_path / "encoder.onnx").write_bytes(b"graph v1")
    here = plan_tag("NVIDIA H100 80GB HBM3", "10.3.0", "fp16")
    other = plan_tag("NVIDIA A2", "10.3.0", "fp16")
    _fake_plan(tmp_path, "encoder", other, file_sha256(tmp_path / "encoder.onnx"))
    with pytest.raises(EngineError, match=r"other GPUs.*nvidia-a2.*inspector build --sku-dir .* --precision fp16"):
        check_plan(tmp_path, "encoder", here, "fp16")
    good = _fake_plan(tmp_path, "encoder", here, file_sha256(tmp_path / "encoder.onnx"))
    assert check_plan(tmp_path, "encoder", here, "fp16") == good
    (tmp_path / "encoder.onnx").write_bytes(b"graph v2")  # re-exported after the build
    with pytest.raises(EngineError, match=r"older encoder\.onnx"):
        check_plan(tmp_path, "encoder", here, "fp16")
    good.with_suffix(".json").unlink()
    with pytest.raises(EngineError, match="no sidecar"):
        check_plan(tmp_path, "encoder", here, "fp16")


@pytest.fixture(scope="module")
def fp16_sku(exported_random_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engines.runtime.build import build_sku

    sku = copy_sku(exported_random_sku, tmp_path_factory.mktemp("trt") / "sku")
    build_sku(sku, "fp16", max_batch=4, opt_batch=1)
    return sku


@pytest.mark.gpu
def test_fp16_plans_match_torch(fp16_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    frames = random_frames(3, seed=4)
    ref = create_engine(engine_settings("torch"), fp16_sku).infer(frames)
    engine = create_engine(engine_settings("tensorrt", precision="fp16"), fp16_sku)
    info = engine.describe()
    assert info["unrolled"] and info["cuda_graphs"]
    assert rel_error(engine.infer(frames), ref) < FP16_BOUND  # unrolled plan, captured CUDA graph
    assert rel_error(engine.infer(frames), ref) < FP16_BOUND  # graph replay
    maps, ms = engine.infer_timed(frames)  # per-part plans through the shared loop
    assert rel_error(maps, ref) < FP16_BOUND
    assert ms["stage1"] > 0 and ms["segment"] > 0
    assert engine.device_memory_used() > 0


@pytest.mark.gpu
def test_tensorrt_refuses_batches_over_the_plan_max(fp16_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    engine = create_engine(engine_settings("tensorrt", precision="fp16"), fp16_sku)
    with pytest.raises(EngineError, match="max batch 4"):
        engine.infer(random_frames(5))


@pytest.mark.gpu
def test_tensorrt_without_plans_for_this_precision_says_build(fp16_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    with pytest.raises(EngineError, match="inspector build"):
        create_engine(engine_settings("tensorrt", precision="int8"), fp16_sku)


@pytest.mark.gpu
@pytest.mark.slow
def test_int8_image_auroc_within_half_a_point_of_fp32(tmp_path: Path) -> None:
    from calibration.metrics import image_auroc
    from engines.export import export_sku
    from engines.runtime import create_engine, engine_settings
    from engines.runtime.build import build_sku
    from engines.sample_data import write_good_folder
    from engines.scoring import image_scores
    from engines.train import PRESETS, TrainConfig, train_sku

    good = write_good_folder(tmp_path / "good", 64, 64)
    cfg = TrainConfig(data=good, out=tmp_path / "sku", device="cuda", progress=False, **PRESETS["tiny"])
    sku = train_sku(dataclasses.replace(cfg, checkpoint_every=10_000))
    export_sku(sku)
    build_sku(sku, "fp32", max_batch=8)
    build_sku(sku, "int8", max_batch=8, calib_dir=good)
    frames = part_frames(64, 64, seed=5)
    labels = np.arange(64) % 2
    engines = {p: create_engine(engine_settings("tensorrt", precision=p), sku) for p in ("fp32", "int8")}
    auroc = {p: image_auroc(labels, image_scores(engine.infer(frames))) for p, engine in engines.items()}
    assert abs(auroc["int8"] - auroc["fp32"]) * 100 <= INT8_AUROC_POINTS, auroc


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_build_without_the_gpu_extra_names_the_install(exported_random_sku: Path) -> None:
    from engines.runtime.build import build_sku

    with pytest.raises(EngineError, match=r"pip install 'tdad-inspector\[gpu\]'"):
        build_sku(exported_random_sku, "fp16")
