"""The torch reference engine: loads a SKU directory and maps uint8 frames to [0, 1] float32 maps; its CUDA
graphs' device, stream and capture mode (through a strict stand-in of torch.cuda) and its speed levers on the CPU."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engines.runtime.base import Engine
from engines.runtime.config import TorchSettings, engine_settings
from engines.runtime.torch_backend import CudaGraphs, TorchEngine
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


class _Stream:
    """A stand-in CUDA stream that only knows its device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wait_stream(self, other: _Stream) -> None:
        assert other.device == self.device, f"a stream of {self.device} waits on one of {other.device}"


class StrictCuda:
    """The few torch.cuda calls CudaGraphs makes, each recorded with the device current on its thread (a thread
    starts on cuda:0, as in CUDA), with torch's keyword names; anything else is an AttributeError. No machine here
    has CUDA: this stands in for torch.cuda only to check which device, stream and capture mode a capture uses."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.calls: list[tuple[str, torch.device, dict[str, Any]]] = []

    def _record(self, name: str, **details: Any) -> None:
        self.calls.append((name, getattr(self._local, "device", torch.device("cuda", 0)), details))

    @contextmanager
    def device(self, device: torch.device) -> Iterator[None]:
        before = getattr(self._local, "device", torch.device("cuda", 0))
        self._local.device = device
        try:
            yield
        finally:
            self._local.device = before

    def Stream(self, device: torch.device) -> _Stream:
        self._record("Stream", device=device)
        return _Stream(device)

    def current_stream(self, device: torch.device) -> _Stream:
        return _Stream(device)

    @contextmanager
    def stream(self, stream: _Stream) -> Iterator[None]:
        self._record("stream", device=stream.device)
        yield

    def graph_pool_handle(self) -> tuple[int, int]:
        return (0, 1)

    def CUDAGraph(self) -> Any:
        record = self._record

        class Graph:
            def replay(self) -> None:
                record("replay")

        return Graph()

    @contextmanager
    def graph(self, graph: Any, *, pool: Any, stream: _Stream, capture_error_mode: str) -> Iterator[None]:
        self._record("graph", device=stream.device, capture_error_mode=capture_error_mode)
        yield

    def synchronize(self, device: torch.device) -> None:
        self._record("synchronize", device=device)


def test_cuda_graphs_capture_and_replay_in_the_engines_device_context_on_any_thread() -> None:
    """Issue 31, defects 1 and 4: with engine.device_id >= 1 the graph was captured on a stream of the thread's
    current device (0), so it was empty and every frame got the warm-up's map; and a capture on the changeover
    thread ran in torch's "global" mode, where the old engine inferring on the inference thread breaks it (or it
    the old engine). The tensors of this stand-in live on the CPU, the device the engine names."""
    device = torch.device("cpu")
    cuda = StrictCuda()
    graphs = CudaGraphs(lambda x: x * 2.0, device, cuda)
    host = torch.ones(2, 3)
    assert graphs.run(host) is not None  # the changeover thread: warm-up, capture, first replay
    replayed = threading.Thread(target=graphs.run, args=(host,))  # the inference thread: replay only
    replayed.start()
    replayed.join()
    assert graphs.captured() == [2]
    names = [name for name, _, _ in cuda.calls]
    assert names.count("graph") == 1 and names.count("replay") == 2
    for name, current, details in cuda.calls:
        assert current == device, f"{name} ran with {current} current, not the engine's {device}"
        assert details.get("device", device) == device, f"{name} on {details['device']}"
    (capture,) = [details for name, _, details in cuda.calls if name == "graph"]
    assert capture["capture_error_mode"] == "thread_local"


def test_a_failed_capture_runs_that_batch_eagerly() -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    cuda = StrictCuda()
    graphs = CudaGraphs(forward, torch.device("cpu"), cuda)
    assert graphs.run(torch.ones(1, 3)) is None and graphs.captured() == []
    assert cuda.calls[-1] == ("synchronize", torch.device("cpu"), {"device": torch.device("cpu")})


def test_preprocess_on_device_gives_the_same_maps_bit_for_bit(sku_dir: Path, engine: TorchEngine) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    lever = TorchEngine(TorchSettings(threads=1, preprocess_on_device=True))
    lever.load(sku_dir)
    assert lever.host_input(frames).dtype == torch.uint8
    np.testing.assert_array_equal(lever.infer(frames), engine.infer(frames))


def test_channels_last_gives_the_maps_to_float_rounding(sku_dir: Path, engine: TorchEngine) -> None:
    frames = np.random.default_rng(2).integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    lever = TorchEngine(TorchSettings(threads=1, channels_last=True, cudnn_benchmark=True))
    lever.load(sku_dir)
    assert lever.model is not None and lever.model.decoder.conv_out.weight.is_contiguous(
        memory_format=torch.channels_last)
    np.testing.assert_allclose(lever.infer(frames), engine.infer(frames), atol=1e-5)
    assert lever.describe()["levers"]["channels_last"] is True


@pytest.mark.slow
def test_compiled_forward_gives_the_maps_to_float_rounding(sku_dir: Path, engine: TorchEngine) -> None:
    """With the other levers too, as bench/gpu_check.sh measures it (a numpy scalar in the device preprocess once
    broke the compiled guards)."""
    frames = np.random.default_rng(3).integers(0, 256, (1, S, S, 3), dtype=np.uint8)
    settings = TorchSettings(threads=1, compile="default", channels_last=True, preprocess_on_device=True)
    lever = TorchEngine(settings, schedule_override={"steps1": 1, "steps2": 1})
    lever.load(sku_dir)
    reference = TorchEngine(TorchSettings(threads=1), schedule_override={"steps1": 1, "steps2": 1})
    reference.load(sku_dir)
    np.testing.assert_allclose(lever.infer(frames), reference.infer(frames), atol=1e-4)


def test_reduce_overhead_needs_the_engines_own_graphs_off() -> None:
    with pytest.raises(EngineError, match="cuda_graphs = false"):
        engine_settings("torch", device="cuda", compile="reduce-overhead")
    assert engine_settings("torch", device="cuda", compile="reduce-overhead", cuda_graphs=False).compile
    with pytest.raises(EngineError, match=r"engine\.compile"):
        engine_settings("torch", compile="fast")
