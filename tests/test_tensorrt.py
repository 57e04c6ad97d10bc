"""TensorRT backend: plan naming and identity checks (anywhere); strongly typed fp32/fp16/int8 builds, parity with
the torch engine, CUDA-graph capture and its fallback, device errors (GPU only: fail, never skip, where
nvidia-smi sees a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.runtime.staged import file_sha256
from engines.runtime.tensorrt_backend import check_plan, plan_path, plan_tag
from foundation.errors import EngineError
from tests.fixtures_engines import copy_sku, random_frames
from tests.test_parity import rel_error

FP16_BOUND = 1e-2
INT8_BOUND = 0.2  # random-init weights; int8 accuracy is judged on a trained SKU in tests/test_quantize.py


def test_plan_tag_pins_gpu_trt_and_precision() -> None:
    tag = plan_tag("NVIDIA H100 80GB HBM3", "10.3.0", "fp16")
    assert tag == "nvidia-h100-80gb-hbm3.trt10.3.0.fp16"
    assert plan_path(Path("/s"), "tdad", tag) == Path("/s/tdad.nvidia-h100-80gb-hbm3.trt10.3.0.fp16.plan")


def _fake_plan(sku: Path, name: str, tag: str, onnx_sha: str, **identity: str) -> Path:
    path = plan_path(sku, name, tag)
    path.write_bytes(b"plan")
    path.with_suffix(".json").write_text(json.dumps({"onnx_sha256": onnx_sha, "precision": "fp32", **identity}))
    return path


def test_check_plan_refuses_missing_foreign_and_stale_plans(tmp_path: Path) -> None:
    (tmp_path / "encoder.onnx").write_bytes(b"graph v1")
    here = plan_tag("NVIDIA H100 80GB HBM3", "10.16.1.11", "fp32")
    other = plan_tag("NVIDIA A2", "10.16.1.11", "fp32")
    _fake_plan(tmp_path, "encoder", other, file_sha256(tmp_path / "encoder.onnx"))
    with pytest.raises(EngineError, match=r"other GPUs.*nvidia-a2.*inspector build --sku-dir .* --precision fp32"):
        check_plan(tmp_path, "encoder", here, "fp32")
    identity = {"gpu": "NVIDIA H100 80GB HBM3", "tensorrt": "10.16.1.11"}
    good = _fake_plan(tmp_path, "encoder", here, file_sha256(tmp_path / "encoder.onnx"), **identity)
    assert check_plan(tmp_path, "encoder", here, "fp32", **identity) == good
    with pytest.raises(EngineError, match=r"built for tensorrt '10\.16\.1\.11', this is '11\.4\.0\.106'"):
        check_plan(tmp_path, "encoder", here, "fp32", gpu=identity["gpu"], tensorrt="11.4.0.106")
    (tmp_path / "encoder.onnx").write_bytes(b"graph v2")  # re-exported after the build
    with pytest.raises(EngineError, match=r"built from another encoder\.onnx"):
        check_plan(tmp_path, "encoder", here, "fp32")
    good.with_suffix(".json").unlink()
    with pytest.raises(EngineError, match="no sidecar"):
        check_plan(tmp_path, "encoder", here, "fp32")


def test_plans_of_derived_precisions_name_their_graph(exported_random_sku: Path, tmp_path: Path) -> None:
    sku = copy_sku(exported_random_sku, tmp_path / "sku")
    tag = plan_tag("NVIDIA H100 80GB HBM3", "11.4.0.106", "fp16")
    _fake_plan(sku, "encoder", tag, "0" * 64)
    with pytest.raises(EngineError, match=r"encoder\.fp16\.onnx is missing.*inspector export --sku-dir .* --fp16"):
        check_plan(sku, "encoder", tag, "fp16")


@pytest.fixture(scope="module")
def trt_sku(exported_random_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init SKU with fp32, fp16 and int8 plans (max batch 4) for this GPU."""
    from engines.runtime.build import build_sku
    from tdad.training.sample_data import write_good_folder

    root = tmp_path_factory.mktemp("trt")
    sku = copy_sku(exported_random_sku, root / "sku")
    good = write_good_folder(root / "good", 8, 64)
    for precision in ("fp32", "fp16", "int8"):
        build_sku(sku, precision, max_batch=4, opt_batch=1, calib_dir=good, calib_images=8)
    return sku


def _sidecar(sku: Path, precision: str) -> dict:
    (path,) = sku.glob(f"tdad.*.{precision}.json")
    return json.loads(path.read_text())


@pytest.mark.gpu
def test_plans_are_strongly_typed_and_really_of_their_precision(trt_sku: Path) -> None:
    for precision, kind in (("fp32", "FP32"), ("fp16", "FP16"), ("int8", "Int8")):
        info = _sidecar(trt_sku, precision)
        assert info["strongly_typed"] and info["precision"] == precision
        assert info["onnx"] == ("tdad.onnx" if precision == "fp32" else f"tdad.{precision}.onnx")
        types = info["layer_output_types"]
        assert types.get(kind, 0) > 0, (precision, types)
    assert _sidecar(trt_sku, "fp16")["layer_output_types"].get("FP16", 0) > \
        _sidecar(trt_sku, "fp16")["layer_output_types"].get("FP32", 0)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "bound"), [("fp32", 1e-3), ("fp16", FP16_BOUND), ("int8", INT8_BOUND)])
def test_plans_match_torch_with_graphs_replayed_and_parts(trt_sku: Path, precision: str, bound: float) -> None:
    from engines.runtime import create_engine, engine_settings

    frames = random_frames(3, seed=4)
    ref = create_engine(engine_settings("torch"), trt_sku).infer(frames)
    engine = create_engine(engine_settings("tensorrt", precision=precision), trt_sku)
    engine.warmup()
    assert rel_error(engine.infer(frames), ref) < bound  # unrolled plan, captures the batch-3 graph
    assert rel_error(engine.infer(frames), ref) < bound  # graph replay
    info = engine.describe()
    assert info["unrolled"] and info["captured_batches"] == [1, 3], info
    maps, ms = engine.infer_timed(frames)  # per-part plans through the shared loop
    assert rel_error(maps, ref) < bound
    assert ms["stage1"] > 0 and ms["segment"] > 0
    assert engine.device_memory_used() > 0
    plain = create_engine(engine_settings("tensorrt", precision=precision, cuda_graphs=False), trt_sku)
    np.testing.assert_allclose(plain.infer(frames), engine.infer(frames), atol=1e-5)
    assert plain.describe()["captured_batches"] == []


@pytest.mark.gpu
def test_tensorrt_refuses_batches_over_the_plan_max(trt_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    engine = create_engine(engine_settings("tensorrt", precision="fp16"), trt_sku)
    with pytest.raises(EngineError, match="max batch 4"):
        engine.infer(random_frames(5))


@pytest.mark.gpu
def test_bad_device_id_and_missing_plans_are_one_line(trt_sku: Path, exported_random_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    with pytest.raises(EngineError, match=r"engine\.device_id = 64, but this machine has \d+ CUDA GPU"):
        create_engine(engine_settings("tensorrt", precision="fp16", device_id=64), trt_sku)
    with pytest.raises(EngineError, match="inspector build"):  # the shared SKU has graphs but no plans
        create_engine(engine_settings("tensorrt", precision="fp16"), exported_random_sku)

