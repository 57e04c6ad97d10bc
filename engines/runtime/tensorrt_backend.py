"""TensorRT backend on cuda-python: .plan engines built per GPU model, TensorRT version and precision.

The fast path runs `tdad.<tag>.plan` (the whole fixed-step pipeline unrolled into one graph, engines/export.py)
from device buffers allocated once for the plan's max batch, with pinned host buffers and async copies on one
CUDA stream. Per batch size it keeps one execution context (its input shapes fixed) and, with cuda_graphs,
one CUDA graph captured from that context (H2D copy, all kernels, D2H copy) on the first call at that size
(warm-up captures batch 1), then replayed. A failed capture is logged with CUDA's reason and that batch size
runs as plain launches; the SKU still loads. The per-part plans (encoder, denoiser, fusion, decoder, segmenter)
run the shared two-stage loop on the host; they serve schedule overrides and stage-by-stage timings.

Every context is created without activation memory of its own (USER_MANAGED) and runs in one device scratch
shared by all plans of the engine, sized for the largest (device_memory_size_v2, its max batch): they all run
one after another on the one stream, so activation memory stays that of one plan at its max batch, whatever
batch sizes are seen. `load` refuses an engine.batch above the plans' max batch (every micro-batch and tile
chunk above it would fail), and frees what it opened when it fails part-way; `close` frees everything.

CUDA is reached through NVIDIA's cuda-python (`cuda.bindings.runtime`, a binary wheel that needs only the
driver). Importable without any of it: creating the engine reports what is missing (foundation/gpu.py).
"""

from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from engines.precision import check_graph, int8_outdated
from engines.runtime.config import TensorRTSettings
from engines.runtime.staged import (
    PART_NAMES,
    UNROLLED_NAME,
    file_sha256,
    infer_timed,
    open_exported_sku,
    preprocess_frames,
    run_parts,
    unrolled_applies,
)
from foundation.errors import EngineError
from foundation.gpu import check_cuda, cuda_device, cuda_runtime, import_tensorrt
from foundation.log import get_logger

log = get_logger(__name__)


def _slug(text: str) -> str:
    """Lower-case file-name-safe form of a GPU name or version ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def plan_tag(gpu_name: str, trt_version: str, precision: str) -> str:
    """The part of a plan's file name that pins it to one GPU model, TensorRT version and precision."""
    return f"{_slug(gpu_name)}.trt{_slug(trt_version)}.{precision}"


def plan_path(sku_dir: Path, name: str, tag: str) -> Path:
    """`<sku_dir>/<name>.<gpu>.<trt>.<precision>.plan`; its sidecar is plan_sidecar of it."""
    return sku_dir / f"{name}.{tag}.plan"


def plan_sidecar(plan: Path) -> Path:
    """What a plan was built for and from (GPU, TensorRT, ONNX sha256; engines/runtime/build.py writes it): the
    plan's path with .json."""
    return plan.with_suffix(".json")


def check_plan(sku_dir: Path, name: str, tag: str, precision: str, *, gpu: str | None = None,
               tensorrt: str | None = None) -> Path:
    """The plan for `name` under `tag`, or EngineError saying how to rebuild it (missing, stale or foreign).

    The sidecar must name the exact ONNX graph now on disk (by SHA-256) at this precision and, when given,
    this GPU model and TensorRT version.
    """
    path = plan_path(sku_dir, name, tag)
    fix = f"run: inspector build --sku-dir {sku_dir} --precision {precision}"
    if not path.is_file():
        others = sorted(p.name for p in sku_dir.glob(f"{name}.*.plan"))
        found = f" (plans for other GPUs/TensorRT versions/precisions: {', '.join(others)})" if others else ""
        raise EngineError(f"no TensorRT plan {path} for this GPU/TensorRT/precision{found}; {fix}")
    sidecar = plan_sidecar(path)
    if not sidecar.is_file():
        raise EngineError(f"TensorRT plan {path} has no sidecar {sidecar.name}; {fix}")
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        raise EngineError(f"TensorRT plan sidecar {sidecar} is not JSON; {fix}") from None
    graph = check_graph(sku_dir, name, precision)
    if info.get("onnx_sha256") != file_sha256(graph):
        raise EngineError(f"TensorRT plan {path} was built from another {graph.name} (re-exported since); {fix}")
    expected = {"precision": precision, "gpu": gpu, "tensorrt": tensorrt}
    for key, value in expected.items():
        if value is not None and info.get(key) != value:
            raise EngineError(f"TensorRT plan {path} was built for {key} {info.get(key)!r}, this is {value!r}; {fix}")
    return path


def max_batch_error(sku_dir: Path, precision: str, batch: int, max_batch: int, plans: str) -> str:
    """The one line refusing an engine.batch above the max batch of `plans` (the daemon's micro-batch and a tiled
    SKU's tile chunk are engine.batch frames)."""
    return (f"engine.batch = {batch}, but {plans} take at most {max_batch} frames per call (engine.batch is the "
            f"daemon's micro-batch and a tiled SKU's tile chunk); run: inspector build --sku-dir {sku_dir} "
            f"--precision {precision} --max-batch {batch}, or lower engine.batch")


def _pinned(rt: Any, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
    """Page-locked host memory (cudaMallocHost) as a numpy array of `shape`; returns (pointer, array)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    pointer = int(check_cuda(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
    raw = (ctypes.c_byte * nbytes).from_address(pointer)
    return pointer, np.frombuffer(raw, dtype=dtype).reshape(shape)


class _Plan:
    """One deserialised engine: pinned host + device I/O buffers for its max batch, one context per batch size
    (each without activation memory of its own: `scratch`, the engine's shared device memory, is set on it)."""

    def __init__(self, trt: Any, runtime: Any, path: Path, stream: Any) -> None:
        self.trt, self.rt, self.stream, self.name = trt, cuda_runtime(), stream, path.name
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        self._host_ptrs: list[int] = []
        self.contexts: dict[int, Any] = {}
        self.scratch = (0, 0)  # (pointer, bytes) of the activation memory the engine shares among its plans
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {path} (see the TensorRT log); rebuild it with "
                              "inspector build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        self.scratch_bytes = int(self.engine.device_memory_size_v2)  # at the max batch, the largest need
        sizing = self._new_context()
        for n in self.inputs:
            self._set_shape(sizing, n, tuple(self.engine.get_tensor_profile_shape(n, 0)[2]))
        try:
            for n in names:
                shape = tuple(int(d) for d in sizing.get_tensor_shape(n))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                pointer, self.host[n] = _pinned(self.rt, shape, dtype)
                self._host_ptrs.append(pointer)
                self.device[n] = int(check_cuda(self.rt.cudaMalloc(self.host[n].nbytes), f"cudaMalloc for {n}"))
        except BaseException:
            self.release()  # the buffers allocated before the failure
            raise

    def _new_context(self) -> Any:
        """An execution context without activation memory of its own (it runs in `scratch`)."""
        context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.name} "
                              "(GPU memory exhausted?)")
        return context

    def _set_shape(self, context: Any, name: str, shape: tuple[int, ...]) -> None:
        """Set input `name`'s shape on `context`; EngineError where TensorRT refuses it (outside the profile)."""
        if not context.set_input_shape(name, shape):
            raise EngineError(f"TensorRT refused shape {shape} for input {name} of {self.name} (outside its "
                              "optimisation profile, see the TensorRT log); rebuild it with inspector build")

    def context(self, n: int) -> Any:
        """The execution context bound to batch n (created on first use; addresses are the shared buffers)."""
        if n > self.max_batch:
            raise EngineError(f"batch {n} exceeds the max batch {self.max_batch} {self.name} was built for; "
                              "rebuild with inspector build --max-batch N")
        if n not in self.contexts:
            context = self._new_context()
            for name in self.inputs:
                self._set_shape(context, name, (n, *self.host[name].shape[1:]))
            for name, pointer in self.device.items():
                context.set_tensor_address(name, pointer)
            context.set_device_memory(*self.scratch)
            self.contexts[n] = context
        return self.contexts[n]

    def copy_in(self, name: str, n: int) -> None:
        """Queue the H2D copy of input `name`'s first n rows from its pinned buffer."""
        nbytes = self.host[name][:n].nbytes
        check_cuda(self.rt.cudaMemcpyAsync(self.device[name], self.host[name].ctypes.data, nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                   f"cudaMemcpyAsync to {name}")

    def copy_out(self, name: str, n: int) -> None:
        """Queue the D2H copy of output `name`'s first n rows into its pinned buffer."""
        nbytes = self.host[name][:n].nbytes
        check_cuda(self.rt.cudaMemcpyAsync(self.host[name].ctypes.data, self.device[name], nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                   f"cudaMemcpyAsync from {name}")

    def sequence(self, n: int) -> None:
        """Queue H2D of every input, the engine for batch n, and D2H of every output."""
        for name in self.inputs:
            self.copy_in(name, n)
        if not self.context(n).execute_async_v3(int(self.stream)):
            raise EngineError(f"TensorRT execution of {self.name} failed (see the TensorRT log)")
        for name in self.outputs:
            self.copy_out(name, n)

    def sync(self) -> None:
        """Wait for the stream."""
        check_cuda(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        """Run synchronously on host arrays named like the inputs -> a copy of the first output."""
        n = next(iter(feeds.values())).shape[0]
        self.context(n)  # checks the max batch before anything is copied
        for name in self.inputs:
            np.copyto(self.host[name][:n], feeds[name], casting="same_kind")
        self.sequence(n)
        self.sync()
        return self.host[self.outputs[0]][:n].copy()

    def release(self) -> None:
        """Drop the contexts, then the engine, and free the device and pinned buffers (and the arrays over them)."""
        self.contexts.clear()
        self.engine = None
        for pointer in self.device.values():
            self.rt.cudaFree(pointer)
        for pointer in self._host_ptrs:
            self.rt.cudaFreeHost(pointer)
        self.device.clear()
        self.host.clear()
        self._host_ptrs.clear()


class _PlanParts:
    """The per-part plans as `staged.Parts` on numpy arrays (each call is synchronous)."""

    def __init__(self, plans: dict[str, _Plan]) -> None:
        self.plans = plans
        self.cond_channels = int(plans["denoiser"].host["cond"].shape[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.plans["encoder"](image=x)

    def denoise(self, z_t: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        return self.plans["denoiser"](z_t=z_t, t=np.full(z_t.shape[0], t, np.int64), cond=cond)

    def fuse(self, z: np.ndarray, z_rec1: np.ndarray) -> np.ndarray:
        return self.plans["fusion"](z=z, z_rec1=z_rec1)

    def zero_cond(self, z: np.ndarray) -> np.ndarray:
        return np.zeros((z.shape[0], self.cond_channels, *z.shape[2:]), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.plans["decoder"](z=z)

    def segment(self, x: np.ndarray, x_rec: np.ndarray) -> np.ndarray:
        return self.plans["segmenter"](image=x, reconstruction=x_rec)

    def sync(self) -> None:
        """Each part call already synchronised."""


class TensorRTEngine:
    """Engine on an NVIDIA GPU through TensorRT plans of the SKU's fp32, fp16 or int8 graphs."""

    backend = "tensorrt"

    def __init__(self, settings: TensorRTSettings, *, schedule_override: dict[str, Any] | None = None) -> None:
        self.trt = import_tensorrt()
        self.rt = cuda_runtime()
        self.settings = settings
        self.device_id = settings.device_id
        self.precision = settings.precision
        self.schedule_override = schedule_override or {}
        self.cuda_graphs = settings.cuda_graphs
        self.image_size = 0
        self._graphs: dict[int, Any] = {}  # batch -> instantiated CUDA graph, or None where capture failed
        self._unrolled: _Plan | None = None
        self._plans: list[_Plan] = []
        self.stream: Any = None
        self._scratch: int | None = None  # the device memory every context runs in
        self.max_batch = 0

    def load(self, sku_dir: Path) -> None:
        """Deserialise the plans for this GPU/TensorRT/precision; EngineError says what to build or install."""
        trt = self.trt
        self.sku_dir = Path(sku_dir)
        sku = open_exported_sku(self.sku_dir, self.schedule_override)
        self.image_size, self.schedule, self._noises = sku.image_size, sku.schedule, sku.noises
        self._residual = sku.manifest.model.residual  # segmenter input x + decode(z_rec) - decode(z0)
        self._memory_only = sku.manifest.model.memory_only
        if self.precision == "int8" and (outdated := int8_outdated(self.sku_dir, sku.export)):
            log.warning("int8_graphs_outdated", sku_dir=str(self.sku_dir), message=outdated)
        self.gpu = cuda_device(self.device_id)
        tag = plan_tag(self.gpu.name, trt.__version__, self.precision)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self.stream = check_cuda(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")
        try:
            self._open_plans(trt.Runtime(self._trt_logger), tag, unrolled_applies(sku))
        except BaseException:
            self.close()  # a load that fails part-way frees the plans, buffers and stream it made
            raise
        log.info("tensorrt_engine_loaded", sku_dir=str(self.sku_dir), tag=tag, gpu=self.gpu.name,
                 unrolled=self._unrolled is not None, cuda_graphs=self.cuda_graphs)

    def _open_plans(self, runtime: Any, tag: str, unrolled_current: bool) -> None:
        """Deserialise the part plans (and the unrolled one when its schedule is the one in use), refuse an
        engine.batch above their max batch, and allocate the activation memory they share."""
        identity = {"gpu": self.gpu.name, "tensorrt": self.trt.__version__}

        def open_plan(name: str) -> _Plan:
            plan = _Plan(self.trt, runtime, check_plan(self.sku_dir, name, tag, self.precision, **identity),
                         self.stream)
            self._plans.append(plan)
            return plan

        self._parts = _PlanParts({name: open_plan(name) for name in PART_NAMES})
        if plan_path(self.sku_dir, UNROLLED_NAME, tag).is_file() and unrolled_current:
            self._unrolled = open_plan(UNROLLED_NAME)
        smallest = min(self._plans, key=lambda p: p.max_batch)
        self.max_batch = smallest.max_batch
        if self.settings.batch > self.max_batch:
            raise EngineError(max_batch_error(self.sku_dir, self.precision, self.settings.batch, self.max_batch,
                                              f"the TensorRT plans ({smallest.name})"))
        size = max(p.scratch_bytes for p in self._plans)
        self._scratch = int(check_cuda(self.rt.cudaMalloc(size), f"cudaMalloc({size}) for TensorRT activations"))
        for plan in self._plans:
            plan.scratch = (self._scratch, size)

    def _run_unrolled(self, plan: _Plan, x: np.ndarray) -> np.ndarray:
        """One launch of the unrolled plan for batch n: a replayed CUDA graph, or the plain sequence."""
        n = x.shape[0]
        plan.context(n)
        np.copyto(plan.host[plan.inputs[0]][:n], x)
        if self.cuda_graphs and n not in self._graphs:
            self._graphs[n] = self._capture(plan, n)
        graph = self._graphs.get(n)
        if graph is not None:
            check_cuda(self.rt.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
        else:
            plan.sequence(n)
        plan.sync()
        return plan.host[plan.outputs[0]][:n].copy()

    def _capture(self, plan: _Plan, n: int) -> Any:
        """`plan.sequence(n)` captured into an instantiated CUDA graph; None (plain launches) when capture fails."""
        rt = self.rt
        plan.sequence(n)  # TensorRT wants one enqueue with the context's shapes before capture
        plan.sync()
        graph = None
        try:
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            check_cuda(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            try:
                plan.sequence(n)
            finally:  # never leave the stream capturing, whatever failed inside
                err, graph = rt.cudaStreamEndCapture(self.stream)
            check_cuda((err,), "cudaStreamEndCapture")
            return check_cuda(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EngineError as exc:
            rt.cudaGetLastError()  # clear the sticky capture error so plain launches work
            log.warning("cuda_graph_capture_failed", plan=plan.name, batch=n, error=str(exc),
                        fallback="plain launches for this batch size")
            return None
        finally:
            if graph is not None:
                rt.cudaGraphDestroy(graph)  # the instantiated graph keeps what it needs

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float32 N x S x S anomaly maps in [0, 1]."""
        x = preprocess_frames(images_u8_nhwc, self.image_size)
        check_cuda(self.rt.cudaSetDevice(self.device_id), "cudaSetDevice")  # the daemon calls from its worker thread
        if self._unrolled is not None:
            return self._run_unrolled(self._unrolled, x)
        return run_parts(self._parts, x, self.schedule, *self._noises, residual=self._residual)

    def infer_timed(self, images_u8_nhwc: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """`infer` through the per-part plans with wall milliseconds per stage (host round trips included); a
        memory-only SKU (nothing reconstructed) through its one plan, timed as its segment stage."""
        check_cuda(self.rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        unrolled = self._unrolled
        whole = (lambda x: self._run_unrolled(unrolled, x)) if self._memory_only and unrolled is not None else None
        return infer_timed(images_u8_nhwc, self.image_size, whole, self._parts, self.schedule, *self._noises,
                           residual=self._residual)

    def warmup(self) -> None:
        """One batch of 1 through both paths (also captures the batch-1 CUDA graph)."""
        frame = np.zeros((1, self.image_size, self.image_size, 3), np.uint8)
        self.infer(frame)
        self.infer_timed(frame)

    def device_memory_used(self) -> int:
        """Bytes of GPU memory in use on this device (all processes), for the benchmark."""
        free, total = check_cuda(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(total - free)

    def close(self) -> None:
        """Free what load made: CUDA graphs, contexts, plans, buffers, the shared activation memory and the stream.
        The daemon calls it on the engine a changeover retires; a failed load calls it on what it opened."""
        rt = self.rt
        if self.stream is not None:
            rt.cudaStreamSynchronize(self.stream)  # nothing may still run in what is freed below
        for graph in self._graphs.values():
            if graph is not None:
                rt.cudaGraphExecDestroy(graph)
        self._graphs.clear()
        for plan in self._plans:
            plan.release()
        self._plans.clear()
        if self._scratch is not None:
            rt.cudaFree(self._scratch)
            self._scratch = None
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def describe(self) -> dict[str, Any]:
        """Backend, precision, GPU, TensorRT version, schedule, which path runs and which graphs were captured."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "image_size": self.image_size,
            "gpu": self.gpu.name,
            "compute_capability": self.gpu.compute_capability,
            "tensorrt": self.trt.__version__,
            "schedule": self.schedule.to_dict(),
            "unrolled": self._unrolled is not None,
            "cuda_graphs": self.cuda_graphs,
            "captured_batches": sorted(n for n, g in self._graphs.items() if g is not None),
            "max_batch": self.max_batch,
        }
