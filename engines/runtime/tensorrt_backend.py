"""TensorRT 10 backend: .plan engines built per GPU model + TensorRT version + precision by `inspector build`.

The fast path runs `tdad.<tag>.plan` (the whole fixed-step pipeline unrolled into one graph, see
engines/export.py) from device buffers allocated once for the plan's max batch, with pinned host memory,
one CUDA stream and, per batch size, a captured CUDA graph (H2D copy, all kernels, D2H copy) that is
replayed. The per-part plans (encoder, denoiser, fusion, decoder, segmenter) run the shared two-stage
loop on the host; they serve schedule overrides (no re-export needed) and stage-by-stage timings.
Importable without tensorrt/pycuda; creating the engine then fails with the install hint.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from engines.runtime.config import TensorRTSettings
from engines.runtime.staged import (
    file_sha256,
    open_exported_sku,
    preprocess_frames,
    run_parts,
    run_parts_timed,
)
from foundation.errors import EngineError
from foundation.log import get_logger

try:  # the [gpu] extra
    import pycuda.driver as cuda
    import tensorrt as trt
except ImportError:
    cuda = None
    trt = None

log = get_logger(__name__)

PART_NAMES = ("encoder", "denoiser", "fusion", "decoder", "segmenter")
UNROLLED_NAME = "tdad"


def require_tensorrt() -> None:
    """Raise EngineError naming the [gpu] extra when tensorrt or pycuda is not importable."""
    if trt is None or cuda is None:
        raise EngineError("TensorRT engines need TensorRT and pycuda, which are not installed: "
                          "pip install 'tdad-inspector[gpu]' (or use engine.backend = \"onnxruntime\")")


def _slug(text: str) -> str:
    """Lower-case file-name-safe form of a GPU name or version ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def plan_tag(gpu_name: str, trt_version: str, precision: str) -> str:
    """The part of a plan's file name that pins it to one GPU model, TensorRT version and precision."""
    return f"{_slug(gpu_name)}.trt{_slug(trt_version)}.{precision}"


def plan_path(sku_dir: Path, name: str, tag: str) -> Path:
    """`<sku_dir>/<name>.<gpu>.<trt>.<precision>.plan`; its sidecar is the same path with .json."""
    return sku_dir / f"{name}.{tag}.plan"


def check_plan(sku_dir: Path, name: str, tag: str, precision: str) -> Path:
    """The plan for `name` under `tag`, or EngineError saying how to build it (missing, stale or foreign)."""
    path = plan_path(sku_dir, name, tag)
    fix = f"run: inspector build --sku-dir {sku_dir} --precision {precision}"
    if not path.is_file():
        others = sorted(p.name for p in sku_dir.glob(f"{name}.*.plan"))
        found = f" (plans for other GPUs/TensorRT versions: {', '.join(others)})" if others else ""
        raise EngineError(f"no TensorRT plan {path} for this GPU/TensorRT/precision{found}; {fix}")
    sidecar = path.with_suffix(".json")
    onnx_path = sku_dir / f"{name}.onnx"
    if not sidecar.is_file():
        raise EngineError(f"TensorRT plan {path} has no sidecar {sidecar.name}; {fix}")
    info = json.loads(sidecar.read_text())
    if onnx_path.is_file() and info.get("onnx_sha256") != file_sha256(onnx_path):
        raise EngineError(f"TensorRT plan {path} was built from an older {onnx_path.name} (re-exported since); {fix}")
    return path


class _Plan:
    """One deserialised engine with its execution context and I/O buffers sized for the max batch."""

    def __init__(self, runtime: Any, path: Path) -> None:
        self.name = path.name
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {path}; rebuild it with inspector build")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(self.engine.get_tensor_profile_shape(n, 0)[2]))
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = trt.nptype(self.engine.get_tensor_dtype(n))
            self.host[n] = cuda.pagelocked_empty(shape, dtype)
            self.device[n] = cuda.mem_alloc(self.host[n].nbytes)
            self.context.set_tensor_address(n, int(self.device[n]))
        self.bound_batch = self.max_batch

    def bind(self, n: int) -> None:
        """Set the input shapes for batch n (addresses stay: buffers are sized for the max batch)."""
        if n > self.max_batch:
            raise EngineError(f"batch {n} exceeds the max batch {self.max_batch} {self.name} was built for; "
                              "rebuild with inspector build --max-batch N")
        if n != self.bound_batch:
            for name in self.inputs:
                self.context.set_input_shape(name, (n, *self.host[name].shape[1:]))
            self.bound_batch = n

    def upload(self, name: str, array: np.ndarray, stream: Any) -> None:
        """Copy a host array into the input's pinned staging buffer and on to the device (async)."""
        staged = self.host[name][: array.shape[0]]
        np.copyto(staged, array, casting="same_kind")
        cuda.memcpy_htod_async(self.device[name], staged, stream)

    def enqueue(self, stream: Any) -> None:
        """Queue the engine on the stream (shapes already bound)."""
        if not self.context.execute_async_v3(stream.handle):
            raise EngineError(f"TensorRT execution of {self.name} failed (see the TensorRT log)")

    def download(self, name: str, n: int, stream: Any) -> np.ndarray:
        """Queue the copy of output `name` for batch n to its pinned buffer; valid after the stream syncs."""
        out = self.host[name][:n]
        cuda.memcpy_dtoh_async(out, self.device[name], stream)
        return out

    def __call__(self, stream: Any, **feeds: np.ndarray) -> np.ndarray:
        """Run synchronously on host arrays named like the inputs -> a copy of the first output."""
        n = next(iter(feeds.values())).shape[0]
        self.bind(n)
        for name in self.inputs:
            self.upload(name, feeds[name], stream)
        self.enqueue(stream)
        out = self.download(self.outputs[0], n, stream)
        stream.synchronize()
        return out.copy()


class _PlanParts:
    """The per-part plans as `staged.Parts` on numpy arrays (each call is synchronous)."""

    def __init__(self, plans: dict[str, _Plan], stream: Any) -> None:
        self.plans = plans
        self.stream = stream
        self.cond_channels = int(plans["denoiser"].host["cond"].shape[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.plans["encoder"](self.stream, image=x)

    def denoise(self, z_t: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        return self.plans["denoiser"](self.stream, z_t=z_t, t=np.full(z_t.shape[0], t, np.int64), cond=cond)

    def fuse(self, z: np.ndarray, z_rec1: np.ndarray) -> np.ndarray:
        return self.plans["fusion"](self.stream, z=z, z_rec1=z_rec1)

    def zero_cond(self, z: np.ndarray) -> np.ndarray:
        return np.zeros((z.shape[0], self.cond_channels, *z.shape[2:]), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.plans["decoder"](self.stream, z=z)

    def segment(self, x: np.ndarray, x_rec: np.ndarray) -> np.ndarray:
        return self.plans["segmenter"](self.stream, image=x, reconstruction=x_rec)

    def sync(self) -> None:
        self.stream.synchronize()


class TensorRTEngine:
    """Engine on an NVIDIA GPU through TensorRT plans; fp16/int8 as built by `inspector build`."""

    backend = "tensorrt"

    def __init__(self, settings: TensorRTSettings, *, schedule_override: dict[str, Any] | None = None) -> None:
        require_tensorrt()
        self.settings = settings
        self.device_id = settings.device_id
        self.precision = settings.precision
        self.schedule_override = schedule_override or {}
        self.cuda_graphs = settings.cuda_graphs
        self.image_size = 0
        self._graphs: dict[int, Any] = {}
        self._unrolled: _Plan | None = None

    def load(self, sku_dir: Path) -> None:
        """Deserialise the plans for this GPU/TensorRT/precision; EngineError tells to build them if absent."""
        self.sku_dir = Path(sku_dir)
        sku = open_exported_sku(self.sku_dir, self.schedule_override)
        meta, self.image_size, self.schedule, self._noises = sku.meta, sku.image_size, sku.schedule, sku.noises

        cuda.init()
        device = cuda.Device(self.device_id)
        self._cuda_context = device.retain_primary_context()
        self._cuda_context.push()
        try:
            self.gpu_name = device.name()
            tag = plan_tag(self.gpu_name, trt.__version__, self.precision)
            self._trt_logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(self._trt_logger)
            self.stream = cuda.Stream()
            plans = {name: _Plan(runtime, check_plan(self.sku_dir, name, tag, self.precision)) for name in PART_NAMES}
            self._parts = _PlanParts(plans, self.stream)
            unrolled = plan_path(self.sku_dir, UNROLLED_NAME, tag)
            baked_info = meta.get("export", {}).get("unrolled_schedule")
            if unrolled.is_file() and self.schedule.to_dict() == baked_info:
                self._unrolled = _Plan(runtime, check_plan(self.sku_dir, UNROLLED_NAME, tag, self.precision))
        finally:
            self._cuda_context.pop()
        log.info("tensorrt_engine_loaded", sku_dir=str(self.sku_dir), tag=tag,
                 unrolled=self._unrolled is not None, cuda_graphs=self.cuda_graphs)

    def _run_unrolled(self, plan: _Plan, x: np.ndarray) -> np.ndarray:
        """One launch of the unrolled plan for batch n: a replayed CUDA graph, or the plain sequence."""
        n = x.shape[0]
        plan.bind(n)
        np.copyto(plan.host[plan.inputs[0]][:n], x)
        if self.cuda_graphs and n not in self._graphs:
            self._graphs[n] = self._capture(plan, n)
        graph = self._graphs.get(n)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._sequence(plan, n)
        self.stream.synchronize()
        return plan.host[plan.outputs[0]][:n].copy()

    def _sequence(self, plan: _Plan, n: int) -> None:
        """Queue H2D of the pinned input, the plan's kernels and D2H of the output for batch n."""
        cuda.memcpy_htod_async(plan.device[plan.inputs[0]], plan.host[plan.inputs[0]][:n], self.stream)
        plan.enqueue(self.stream)
        cuda.memcpy_dtoh_async(plan.host[plan.outputs[0]][:n], plan.device[plan.outputs[0]], self.stream)

    def _capture(self, plan: _Plan, n: int) -> Any:
        """`_sequence` for batch n captured into an instantiated CUDA graph; None (plain launches) on failure."""
        plan.enqueue(self.stream)  # TensorRT wants one enqueue after a shape change before capture
        self.stream.synchronize()
        try:
            self.stream.begin_capture()
            try:
                self._sequence(plan, n)
            finally:  # never leave the stream capturing
                graph = self.stream.end_capture()
            return graph.instantiate()
        except cuda.Error as exc:
            log.warning("cuda_graph_capture_failed", batch=n, error=str(exc))
            return None

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float32 N x S x S anomaly maps in [0, 1]."""
        x = preprocess_frames(images_u8_nhwc, self.image_size)
        self._cuda_context.push()
        try:
            if self._unrolled is not None:
                return self._run_unrolled(self._unrolled, x)
            return run_parts(self._parts, x, self.schedule, *self._noises)
        finally:
            self._cuda_context.pop()

    def infer_timed(self, images_u8_nhwc: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """`infer` through the per-part plans with wall milliseconds per stage (host round trips included)."""
        t0 = time.perf_counter()
        x = preprocess_frames(images_u8_nhwc, self.image_size)
        pre_ms = (time.perf_counter() - t0) * 1e3
        self._cuda_context.push()
        try:
            maps, ms = run_parts_timed(self._parts, x, self.schedule, *self._noises)
        finally:
            self._cuda_context.pop()
        return maps, {"preprocess": pre_ms, **ms}

    def warmup(self) -> None:
        """One batch of 1 through both paths (also captures the batch-1 CUDA graph)."""
        frame = np.zeros((1, self.image_size, self.image_size, 3), np.uint8)
        self.infer(frame)
        self.infer_timed(frame)

    def device_memory_used(self) -> int:
        """Bytes of GPU memory in use on this device (all processes), for the benchmark."""
        self._cuda_context.push()
        try:
            free, total = cuda.mem_get_info()
        finally:
            self._cuda_context.pop()
        return int(total - free)

    def describe(self) -> dict[str, Any]:
        """Backend, precision, GPU, TensorRT version, schedule and which path runs."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "image_size": self.image_size,
            "gpu": self.gpu_name,
            "tensorrt": trt.__version__,
            "schedule": self.schedule.to_dict(),
            "unrolled": self._unrolled is not None,
            "cuda_graphs": self.cuda_graphs,
            "max_batch": min(p.max_batch for p in self._parts.plans.values()),
        }
