"""TensorRT backend: plan naming and identity checks; the build and the runtime (batching, CUDA-graph capture and
its fallback, the max batch, changeover, close, failed loads, activation memory) on the strict fakes of
tests/fake_tensorrt.py, everywhere; strongly typed fp32/fp16/int8 builds, parity with the torch engine and device
errors on a real GPU (fail, never skip, where nvidia-smi sees one)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
from cuda.bindings import runtime as real_runtime
from structlog.testing import capture_logs

from calibration.thresholds import save_calibration
from engines.runtime import OnnxRuntimeSettings, create_engine, engine_settings
from engines.runtime.staged import UNROLLED_NAME, file_sha256
from engines.runtime.tensorrt_backend import TensorRTEngine, check_plan, plan_path, plan_tag
from foundation.errors import ConfigError, EngineError
from inspector.cli import main
from inspector.config import load_config
from inspector.pipeline import ENGINE_ERROR, Pipeline
from inspector.service import load_sku
from inspector.verdict import Verdict
from tests import fake_tensorrt
from tests.fake_tensorrt import FakeGpu, install, mark_uncapturable
from tests.fixtures_engines import copy_sku, random_frames
from tests.test_decider import make_calibration
from tests.test_parity import rel_error
from tests.test_pipeline import ListSource, active
from tests.test_tensorrt_api import SUPPORTED_ENDS, in_bindings
from tests.waiting import wait_until

# TensorRT builds fp32 plans with TF32 on by default (10-bit mantissas in convolutions and matmuls), so they get
# the bound of the torch CUDA engine's fp32, whose convolutions run in TF32 too (tests/test_gpu.py), not 1e-3
FP32_BOUND = 5e-3
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


# ---- the build and the runtime on the fake TensorRT + CUDA stack (tests/fake_tensorrt.py) --------------------

@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    """The fake TensorRT + CUDA stack (tests/fake_tensorrt.py) on a fake H100, for one test."""
    return install(monkeypatch)


def test_the_fakes_use_only_names_of_the_real_bindings() -> None:
    """Every name of the fake tensorrt is in the real bindings of both supported ends; every name of the fake
    runtime is in the installed cuda-bindings' runtime."""
    names: set[str] = set()
    for value in (*fake_tensorrt.TENSORRT_NAMES, *fake_tensorrt.TENSORRT_OBJECTS):
        names.add(value.__name__)
        if isinstance(value, type):  # a class's methods, properties and enum members
            names |= {n for n in vars(value) if not n.startswith("_")}
    for version in SUPPORTED_ENDS:
        assert not [n for n in sorted(names) if not in_bindings(n, version)], version
    module = fake_tensorrt.runtime_module()
    assert not [n for n in vars(module) if not n.startswith("_") and not hasattr(real_runtime, n)]


def test_the_fakes_are_strict_and_capture_fails_on_a_synchronous_call(fake_gpu: FakeGpu) -> None:
    import tensorrt as trt
    from cuda.bindings import runtime as rt

    for module, name in ((trt, "BuilderFlag"), (rt, "cudaMallocAsync")):
        with pytest.raises(AttributeError):
            getattr(module, name)
    with pytest.raises(TypeError):
        rt.cudaMalloc("64")
    with pytest.raises(TypeError):
        rt.cudaStreamBeginCapture(rt.cudaStream_t(1))
    ok = rt.cudaError_t.cudaSuccess
    _, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    _, device = rt.cudaMalloc(64)
    _, host = rt.cudaMallocHost(64)
    ctypes.memset(host, 7, 64)
    h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    assert rt.cudaMemcpyAsync(device, host, 64, h2d, stream) == (ok,)
    assert fake_gpu.device_span(device, 64)[0] == 0xFF  # queued, not run: work runs at a synchronisation
    assert rt.cudaStreamSynchronize(stream) == (ok,) and fake_gpu.device_span(device, 64)[0] == 7
    assert rt.cudaMemcpyAsync(device, host + 32, 64, h2d, stream) == (rt.cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal) == (ok,)
    assert rt.cudaMemcpyAsync(device, host, 64, h2d, stream) == (ok,)
    assert rt.cudaMalloc(64)[0] == rt.cudaError_t.cudaErrorStreamCaptureUnsupported
    err, _ = rt.cudaStreamEndCapture(stream)
    assert err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated and fake_gpu.capture_violations == ["cudaMalloc(64)"]
    assert rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal) == (ok,)
    assert rt.cudaMemcpy(device, host, 64, h2d) == (rt.cudaError_t.cudaErrorStreamCaptureUnsupported,)
    assert rt.cudaStreamEndCapture(stream)[0] == rt.cudaError_t.cudaErrorStreamCaptureInvalidated
    assert rt.cudaMemcpy(device, host, 64, h2d) == (ok,) and rt.cudaDeviceSynchronize() == (ok,)
    for call in (rt.cudaFree(device), rt.cudaFreeHost(host), rt.cudaStreamDestroy(stream)):
        assert call == (ok,)
    assert fake_gpu.alive() == {}


def _plans(sku: Path, max_batch: int = 4) -> Path:
    """`sku` with fp32 plans for the fake H100 (built by engines/runtime/build.py through the fake TensorRT)."""
    from engines.runtime.build import build_sku

    build_sku(sku, "fp32", max_batch=max_batch, opt_batch=1)
    return sku


def _engine(sku: Path, **settings: object) -> TensorRTEngine:
    engine = create_engine(engine_settings("tensorrt", precision="fp32", **settings), sku)
    assert isinstance(engine, TensorRTEngine)
    return engine


def test_the_runtime_batches_captures_and_replays_graphs_in_bounded_memory_and_close_frees_all(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    assert {json.loads(p.read_text())["max_batch"] for p in sku.glob("*.fp32.json")} == {4}
    engine = _engine(sku, batch=4)
    reference = create_engine(OnnxRuntimeSettings(threads=1), sku)  # the same graphs on ONNX Runtime
    engine.warmup()  # batch 1 through both paths, the batch-1 graph captured
    memory = fake_gpu.device_bytes()
    for n in (1, 2, 3, 4):
        frames = random_frames(n, seed=n)
        expected = reference.infer(frames)
        np.testing.assert_array_equal(engine.infer(frames), expected)  # the graph captured at n
        launches = fake_gpu.counts["graph launches"]
        np.testing.assert_array_equal(engine.infer(frames), expected)  # replayed
        assert fake_gpu.counts["graph launches"] == launches + 1
        np.testing.assert_array_equal(engine.infer_timed(frames)[0], expected)  # the part plans
    info = engine.describe()
    assert info["captured_batches"] == [1, 2, 3, 4] and info["max_batch"] == 4 and info["unrolled"]
    assert fake_gpu.capture_violations == []
    assert fake_gpu.device_bytes() == memory, "activation memory grew with the batch sizes seen"
    with pytest.raises(EngineError, match=r"batch 5 exceeds the max batch 4 .*inspector build --max-batch"):
        engine.infer(random_frames(5))
    engine.close()
    assert fake_gpu.alive() == {}


def test_int8_plans_of_graphs_quantized_the_old_way_run_and_say_how_to_remake_them(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    from engines.quantize import quantize_int8
    from engines.runtime.build import build_sku
    from tdad.manifest import read_manifest, with_derived, write_manifest
    from tdad.training.sample_data import write_good_folder

    sku = copy_sku(exported_random_sku, tmp_path / "sku")
    quantize_int8(sku, write_good_folder(tmp_path / "calib", 4, 64, seed=2), threads=1)
    build_sku(sku, "int8", max_batch=2, opt_batch=1)
    manifest = read_manifest(sku)
    assert manifest.export is not None and manifest.export.int8 is not None
    write_manifest(sku, with_derived(manifest, "int8", manifest.export.int8.model_copy(update={"method": "older"})))
    with capture_logs() as logs:
        engine = create_engine(engine_settings("tensorrt", precision="int8"), sku)
    (warning,) = [e for e in logs if e["event"] == "int8_graphs_outdated"]
    assert "'older'" in warning["message"] and "--int8 --calib" in warning["message"]
    assert engine.infer(random_frames(1)).shape[0] == 1
    engine.close()


def test_memory_skus_run_on_the_plans_and_a_memory_only_one_times_its_one_plan(
        fake_gpu: FakeGpu, tmp_path: Path) -> None:
    """A SKU with a memory and a fine memory (the product's: its map's H x W come out of shape arithmetic) runs
    on its fp32 and int8 plans as on ONNX Runtime; made memory-only (a quick SKU), its one plan also runs under
    a schedule override, and the stage timing is that plan."""
    from engines.export import export_sku
    from engines.quantize import quantize_int8
    from engines.runtime.benchmark import make_random_sku
    from engines.runtime.build import build_sku
    from tdad.model import load_sku as load_model
    from tdad.model import save_sku
    from tdad.training.sample_data import write_good_folder
    from tdad.training.train import memory_only

    sku = _plans(make_random_sku(tmp_path / "sku", 64, memory=64, fine_memory=32, profile=True))
    quantize_int8(sku, write_good_folder(tmp_path / "calib", 4, 64, seed=2), threads=1)
    build_sku(sku, "int8", max_batch=4, opt_batch=1)
    frames = random_frames(2, seed=5)
    for precision in ("fp32", "int8"):  # int8: the Q/DQ graphs, the memory searches' Gemm quantized
        engine = create_engine(engine_settings("tensorrt", precision=precision), sku)
        reference = create_engine(OnnxRuntimeSettings(threads=1, precision=precision), sku)
        np.testing.assert_allclose(engine.infer(frames), reference.infer(frames), atol=1e-6, rtol=0)
        engine.close()
    model = load_model(sku)
    memory_only(model)
    save_sku(model, sku)
    export_sku(sku)
    _plans(sku)
    expected = create_engine(OnnxRuntimeSettings(threads=1), sku).infer(frames)
    engine = create_engine(engine_settings("tensorrt", precision="fp32"), sku, schedule_override={"steps1": 2})
    assert isinstance(engine, TensorRTEngine) and engine.describe()["unrolled"]
    np.testing.assert_allclose(engine.infer(frames), expected, atol=1e-6, rtol=0)
    maps, stages = engine.infer_timed(frames)
    assert set(stages) == {"preprocess", "segment"}
    np.testing.assert_allclose(maps, expected, atol=1e-6, rtol=0)
    engine.close()
    assert fake_gpu.alive() == {}


def test_a_failed_capture_runs_plain_launches(fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    (unrolled,) = sku.glob(f"{UNROLLED_NAME}.*.plan")
    mark_uncapturable(unrolled)  # every enqueue synchronises, as with data-dependent shapes
    engine = _engine(sku)
    frames = random_frames(2, seed=3)
    with capture_logs() as logs:
        maps = engine.infer(frames)
    failed = [e for e in logs if e["event"] == "cuda_graph_capture_failed"]
    assert len(failed) == 1 and failed[0]["batch"] == 2, logs
    assert fake_gpu.capture_violations and "while the stream is captured" in fake_gpu.trt_log[-1]
    np.testing.assert_array_equal(maps, create_engine(OnnxRuntimeSettings(threads=1), sku).infer(frames))
    np.testing.assert_array_equal(engine.infer(frames), maps)  # plain launches, no second capture
    assert engine.describe()["captured_batches"] == [] and fake_gpu.counts["graph launches"] == 0
    engine.close()
    assert fake_gpu.alive() == {}


def test_an_engine_batch_above_the_plans_max_batch_is_refused_at_load(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"), max_batch=2)
    with pytest.raises(EngineError, match=r"^engine\.batch = 4, but the TensorRT plans \(.*\.plan\) take at most 2 "
                                          r"frames .*tile chunk.*; run: inspector build --sku-dir .* --precision fp32 "
                                          r"--max-batch 4, or lower engine\.batch$"):
        _engine(sku, batch=4)
    assert fake_gpu.alive() == {}
    _engine(sku, batch=2).close()


def test_config_check_judges_the_plans_this_box_loads_among_those_for_other_gpus(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    """A SKU with plans for this (fake H100) box at max batch 2 and for an A2 at 8: on this box engine.batch = 4
    is fatal (the A2's plans do not help it); where the GPU cannot say which it is, only a warning."""
    from inspector.config import SkuConfig
    from inspector.preflight import check_sku_dir
    from tests.test_decider import make_calibration

    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"), max_batch=2)
    save_calibration(make_calibration(), sku / "calibration.json")
    for plan in list(sku.glob("*.fp32.plan")):  # the same parts built for another GPU model, for batch 8
        other = plan.with_name(plan.name.replace(fake_gpu_tag(fake_gpu), "nvidia-a2.trt10.8.0.43"))
        other.write_bytes(b"plan")
        other.with_suffix(".json").write_text(json.dumps({"max_batch": 8}))
    settings = engine_settings("tensorrt", precision="fp32", batch=4)
    (problem,) = [p for p in check_sku_dir(SkuConfig(model_dir=sku), settings, "part") if p.key == "engine.batch"]
    assert problem.fatal and problem.message.startswith("engine.batch = 4, but the TensorRT plans (")
    assert "nvidia-a2" not in problem.message and "--max-batch 4" in problem.message
    elsewhere = engine_settings("tensorrt", precision="fp32", batch=4, device_id=1)  # no such GPU to ask
    (warning,) = [p for p in check_sku_dir(SkuConfig(model_dir=sku), elsewhere, "part") if p.key == "engine.batch"]
    assert not warning.fatal and "(the plans for nvidia-a2.trt10.8.0.43 take it)" in warning.message


def fake_gpu_tag(gpu: FakeGpu) -> str:
    """The "<gpu>.<trt>" part of the fake GPU's plan names."""
    return plan_tag(gpu.name, gpu.trt_version, "fp32").removesuffix(".fp32")


def test_a_shape_tensorrt_refuses_is_one_line(fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    (unrolled,) = sku.glob(f"{UNROLLED_NAME}.*.plan")
    plan = json.loads(unrolled.read_bytes())
    plan["profile"]["image"]["min"][0] = 2  # a plan whose profile starts at batch 2
    unrolled.write_text(json.dumps(plan))
    engine = _engine(sku)
    with pytest.raises(EngineError, match=r"^TensorRT refused shape \(1, 3, 64, 64\) for input image of tdad\..*\.plan "
                                          r"\(outside its optimisation profile, see the TensorRT log\); rebuild it"):
        engine.infer(random_frames(1))
    engine.close()
    assert fake_gpu.alive() == {}


def test_a_load_that_fails_part_way_frees_what_it_opened(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    engine = _engine(sku)
    needed = fake_gpu.device_bytes()
    engine.close()
    for memory in (needed - 1, needed // 16):  # no room for the activation memory; none for a plan's buffers
        small = install(monkeypatch, FakeGpu(memory_bytes=memory))
        with pytest.raises(EngineError, match=r"CUDA error in cudaMalloc.*cudaErrorMemoryAllocation"):
            _engine(sku)
        assert small.alive() == {}, memory
    (segmenter,) = sku.glob("segmenter.*.plan")
    segmenter.unlink()  # the fifth plan is missing: four are open when the load fails
    with pytest.raises(EngineError, match=r"no TensorRT plan .*segmenter.*inspector build"):
        _engine(sku)
    assert small.alive() == {}


def test_a_changeover_closes_the_retired_engine_and_close_frees_the_last(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    engine_a, engine_b = _engine(sku, batch=2), _engine(sku, batch=2)
    for engine in (engine_a, engine_b):
        engine.warmup()  # as the daemon's SKU loading does
    streams = len(fake_gpu.streams)
    published: list[Verdict] = []
    source = ListSource(list(random_frames(40, seed=1)), interval_s=0.01)
    pipeline = Pipeline(source, active(engine_a, "a"), lambda v, m: published.append(v), batch=2)
    pipeline.start()
    try:
        assert wait_until(lambda: len(published) >= 3)
        pipeline.swap_sku(active(engine_b, "b"))
        assert wait_until(lambda: any(v.sku == "b" for v in published))
        assert len(fake_gpu.streams) == streams - 1  # a's stream, buffers, contexts and graphs went at the swap
        assert pipeline.wait(30)
    finally:
        pipeline.stop(10)  # before the fake goes, whatever failed
    assert sorted(v.frame_id for v in published) == list(range(1, 41))
    assert not [v for v in published if v.reason == ENGINE_ERROR]  # the retired engine was never called again
    engine_b.close()
    assert fake_gpu.alive() == {}


def test_a_sku_refused_after_its_engine_loaded_frees_the_engine(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path) -> None:
    sku = _plans(copy_sku(exported_random_sku, tmp_path / "sku"))
    save_calibration(make_calibration(), sku / "calibration.json")
    config = tmp_path / "inspector.toml"
    config.write_text(f'active_sku = "a"\n[engine]\nbackend = "tensorrt"\nprecision = "fp32"\n'
                      f'[skus.a]\nmodel_dir = "{sku}"\ninput_size = 32\n')
    with pytest.raises(ConfigError, match=r"skus\.a\.input_size = 32 but the model .* takes 64 px"):
        load_sku(load_config(config), "a")
    assert fake_gpu.alive() == {}


def test_build_takes_engine_batch_as_its_max_batch_and_refuses_a_smaller_one(
        fake_gpu: FakeGpu, exported_random_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sku = copy_sku(exported_random_sku, tmp_path / "sku")
    config = tmp_path / "inspector.toml"
    config.write_text(f'active_sku = "a"\n[engine]\nbatch = 12\n[skus.a]\nmodel_dir = "{sku}"\n')
    common = ["build", "--config", str(config), "--sku-dir", str(sku), "--precision", "fp32"]
    assert main([*common, "--max-batch", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --max-batch 4 is below engine.batch = 12 of the config: the daemon would refuse these "
                   "plans; pass --max-batch 12 (or more), or lower engine.batch"]
    assert not list(sku.glob("*.plan"))
    assert main(common) == 0
    sidecars = [json.loads(p.read_text()) for p in sku.glob("*.fp32.json")]
    assert len(sidecars) == 6 and all((s["max_batch"], s["opt_batch"]) == (12, 12) for s in sidecars)


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
@pytest.mark.parametrize(("precision", "bound"), [("fp32", FP32_BOUND), ("fp16", FP16_BOUND), ("int8", INT8_BOUND)])
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

