"""Strict fakes of `tensorrt` and `cuda.bindings.runtime`, backed by ONNX Runtime on the CPU, so the TensorRT
backend's own logic (engines/runtime/build.py, tensorrt_backend.py) runs in CI: building and deserialising plans,
profiles and the max batch, execution contexts, device and pinned buffers, async copies, streams, CUDA graph
capture and replay, and everything that must be freed. Only the API the code uses is there, under the real
names (tests/test_tensorrt.py holds every name to the real bindings of both supported TensorRT ends and to the
installed cuda-bindings); anything else raises AttributeError, and wrong argument types raise TypeError.

Where the real stack fails, the fakes fail the same way:
- CUDA calls return `(cudaError_t, *values)` and never raise on a CUDA error. Work queued on a stream runs at
  the next synchronisation, so a missing cudaStreamSynchronize reads stale output; a kernel or copy that touches
  memory outside a live allocation is cudaErrorIllegalAddress, sticky: every later call returns it.
- A synchronous call (cudaMalloc/MallocHost/Free/FreeHost, cudaMemcpy, cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaStreamDestroy) while a capture is open in the calling thread (ThreadLocal) or any
  thread (Global) returns cudaErrorStreamCaptureUnsupported and invalidates the capture, whose
  cudaStreamEndCapture then returns cudaErrorStreamCaptureInvalidated; each is recorded in `capture_violations`.
- TensorRT: set_input_shape outside the plan's profile returns False (logged), as does execute_async_v3 with an
  input shape or a tensor address missing, no activation memory (USER_MANAGED without set_device_memory), or an
  unknown stream; the first enqueue at new input shapes synchronises (so a capture needs one enqueue before it),
  and a plan marked uncapturable (`mark_uncapturable`: data-dependent shapes) synchronises on every enqueue. A
  STATIC context holds the plan's device_memory_size_v2 of device memory while it lives.
- A plan is a small JSON file naming its ONNX graph (and that graph's SHA-256), its profile and the TensorRT
  version that built it; another version refuses it, as real TensorRT does.

`FakeGpu` is the device: its ledger (`alive()`) lists what is still allocated, so a test can show nothing leaked
after a close, a changeover or a failed load. `install` puts the fakes in sys.modules for one test (through
pytest's monkeypatch: the `fake_gpu` fixture of tests/test_tensorrt.py); never shipped in the package.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import gc
import hashlib
import json
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cuda.bindings import runtime as _real  # the real enums and handle types; never asked to reach a driver

from engines.runtime.onnx_backend import session_options

Err = _real.cudaError_t
Op = Callable[[], Any]  # queued device work: returns a cudaError_t
DEVICE_BASE = 1 << 52  # fake device addresses: far above any host address, so the two never mix up
ALIGNMENT = 256

_current: FakeGpu | None = None


def _gpu() -> FakeGpu:
    """The installed fake device (`install`)."""
    if _current is None:
        raise RuntimeError("the fake GPU is not installed: call install(monkeypatch)")
    return _current


def _need(value: Any, types: type | tuple[type, ...], what: str) -> None:
    """TypeError, as the real bindings raise it, unless value is of `types` (a bool is no int here)."""
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise TypeError(f"{what}: expected {' or '.join(t.__name__ for t in allowed)}, got {type(value).__name__}")


def _trt_error(msg: str) -> None:
    """An error TensorRT reports through its logger (kept in the fake GPU's trt_log)."""
    _gpu().trt_log.append(f"ERROR: {msg}")


@dataclass
class _Capture:
    mode: Any
    thread: int
    ops: list[Op] = field(default_factory=list)
    invalid: str | None = None


@dataclass
class _Stream:
    queue: list[Op] = field(default_factory=list)
    capture: _Capture | None = None


class FakeGpu:
    """One fake CUDA device: allocations, streams, graphs and TensorRT contexts, with a ledger of what lives."""

    def __init__(self, *, name: str = "NVIDIA H100 80GB HBM3", memory_bytes: int = 8 << 30,
                 trt_version: str = "10.8.0.43") -> None:
        self.name, self.memory_bytes, self.trt_version = name, memory_bytes, trt_version
        self.device: dict[int, np.ndarray] = {}
        self.pinned: dict[int, Any] = {}
        self._freed_pinned: list[Any] = []  # freed host buffers stay mapped, so a stray view reads, not crashes
        self.streams: dict[int, _Stream] = {}
        self.graphs: dict[int, list[Op]] = {}
        self.graph_execs: dict[int, list[Op]] = {}
        self.engines: weakref.WeakSet[Any] = weakref.WeakSet()  # deserialised plans: their weights are on the GPU
        self.contexts: weakref.WeakSet[Any] = weakref.WeakSet()
        self.capture_violations: list[str] = []
        self.trt_log: list[str] = []
        self.counts: Counter[str] = Counter()  # kernels run, graph launches
        self.last_error = Err.cudaSuccess
        self.sticky: Any = None
        self._next_address = DEVICE_BASE
        self._next_handle = 0x1000
        self.lock = threading.RLock()

    # ---- the ledger --------------------------------------------------------------------------------------

    def alive(self) -> dict[str, int]:
        """What is still allocated or created, by kind (empty when everything was freed)."""
        gc.collect()  # engines and contexts live until their last reference goes, as in TensorRT's Python API
        counts = {"device buffers": len(self.device), "pinned buffers": len(self.pinned),
                  "streams": len(self.streams), "graphs": len(self.graphs), "graph execs": len(self.graph_execs),
                  "engines": len(self.engines), "execution contexts": len(self.contexts)}
        return {kind: n for kind, n in counts.items() if n}

    def device_bytes(self) -> int:
        """Bytes of device memory allocated now (STATIC execution contexts' activation memory included)."""
        return sum(buffer.nbytes for buffer in self.device.values())

    # ---- memory ------------------------------------------------------------------------------------------

    def new_handle(self) -> int:
        """A new stream/graph handle."""
        self._next_handle += 16
        return self._next_handle

    def malloc(self, size: int) -> int | None:
        """A device allocation of `size` bytes (filled with 0xFF: NaN to a float reader), None when full."""
        if self.device_bytes() + size > self.memory_bytes:
            return None
        pointer = self._next_address
        self._next_address += (max(size, 1) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        self.device[pointer] = np.full(size, 0xFF, np.uint8)
        return pointer

    def device_span(self, pointer: int, nbytes: int) -> np.ndarray | None:
        """The bytes [pointer, pointer + nbytes) inside one live allocation, None where they are not."""
        for base, buffer in self.device.items():
            if base <= pointer and pointer + nbytes <= base + buffer.nbytes:
                return buffer[pointer - base: pointer - base + nbytes]
        return None

    def host_span(self, pointer: int, nbytes: int) -> bool:
        """True when [pointer, pointer + nbytes) lies in one live pinned allocation."""
        return any(base <= pointer and pointer + nbytes <= base + ctypes.sizeof(buffer)
                   for base, buffer in self.pinned.items())

    # ---- streams and capture -----------------------------------------------------------------------------

    def blocking(self, what: str) -> Any:
        """Called by every synchronous operation: cudaErrorStreamCaptureUnsupported (and the capture invalidated)
        where a capture it would break is open, else None."""
        me = threading.get_ident()
        for stream in self.streams.values():
            capture = stream.capture
            if capture is None or capture.invalid is not None:
                continue
            if (capture.mode == _real.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
                    or (capture.mode == _real.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
                        and capture.thread == me)):
                capture.invalid = what
                self.capture_violations.append(what)
                return Err.cudaErrorStreamCaptureUnsupported
        return None

    def submit(self, handle: int, op: Op) -> Any:
        """Queue `op` on a stream, or record it into the stream's open capture."""
        stream = self.streams.get(handle)
        if stream is None:
            return Err.cudaErrorInvalidResourceHandle
        if stream.capture is None:
            stream.queue.append(op)
        elif stream.capture.invalid is not None:
            return Err.cudaErrorStreamCaptureInvalidated
        else:
            stream.capture.ops.append(op)
        return Err.cudaSuccess

    def drain(self, handle: int) -> Any:
        """Run a stream's queued work in order; the first error becomes sticky."""
        stream = self.streams[handle]
        while stream.queue:
            err = stream.queue.pop(0)()
            if err != Err.cudaSuccess:
                self.sticky = self.last_error = err
                stream.queue.clear()
                return err
        return Err.cudaSuccess

    def copy_op(self, dst: int, src: int, count: int, kind: Any) -> Op | None:
        """The copy of `count` bytes as queued work, None when an end is not memory of the kind `kind` says."""
        h2d, d2h = _real.cudaMemcpyKind.cudaMemcpyHostToDevice, _real.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if kind == h2d and self.host_span(src, count) and self.device_span(dst, count) is not None:
            def run() -> Any:
                span = self.device_span(dst, count)
                if span is None or not self.host_span(src, count):
                    return Err.cudaErrorIllegalAddress
                span[:] = np.frombuffer(ctypes.string_at(src, count), np.uint8)
                return Err.cudaSuccess
            return run
        if kind == d2h and self.device_span(src, count) is not None and self.host_span(dst, count):
            def run() -> Any:
                span = self.device_span(src, count)
                if span is None or not self.host_span(dst, count):
                    return Err.cudaErrorIllegalAddress
                ctypes.memmove(dst, span.tobytes(), count)
                return Err.cudaSuccess
            return run
        return None


# ---- cuda.bindings.runtime ------------------------------------------------------------------------------------

def _api(values: int) -> Callable[[Callable[..., tuple[Any, ...]]], Callable[..., tuple[Any, ...]]]:
    """A runtime call returning (err, *values): under the device lock, and the sticky error once there is one."""

    def wrap(call: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
        @functools.wraps(call)
        def api(*args: Any) -> tuple[Any, ...]:
            gpu = _gpu()
            with gpu.lock:
                if gpu.sticky is not None:
                    return (gpu.sticky, *([None] * values))
                result = call(gpu, *args)
                if result[0] != Err.cudaSuccess:
                    gpu.last_error = result[0]
                return result
        return api

    return wrap


def _stream_handle(stream: Any) -> int:
    _need(stream, (_real.cudaStream_t, int), "stream")
    return int(stream)


@_api(1)
def cudaGetDeviceCount(gpu: FakeGpu) -> tuple[Any, ...]:
    return Err.cudaSuccess, 1


@_api(0)
def cudaSetDevice(gpu: FakeGpu, device: int) -> tuple[Any, ...]:
    _need(device, int, "device")
    return (Err.cudaSuccess if device == 0 else Err.cudaErrorInvalidDevice,)


class _DeviceProp:
    """The fields of cudaDeviceProp the code reads."""

    __slots__ = ("major", "minor", "name", "totalGlobalMem")

    def __init__(self, gpu: FakeGpu) -> None:
        self.name = gpu.name.encode().ljust(256, b"\0")
        self.major, self.minor, self.totalGlobalMem = 9, 0, gpu.memory_bytes


@_api(1)
def cudaGetDeviceProperties(gpu: FakeGpu, device: int) -> tuple[Any, ...]:
    _need(device, int, "device")
    return (Err.cudaSuccess, _DeviceProp(gpu)) if device == 0 else (Err.cudaErrorInvalidDevice, None)


def cudaGetErrorString(error: Any) -> tuple[Any, ...]:
    _need(error, Err, "error")
    return Err.cudaSuccess, f"{error.name} (fake GPU)".encode()


@_api(0)
def cudaGetLastError(gpu: FakeGpu) -> tuple[Any, ...]:
    err, gpu.last_error = gpu.last_error, Err.cudaSuccess
    return (err,)


@_api(2)
def cudaMemGetInfo(gpu: FakeGpu) -> tuple[Any, ...]:
    return Err.cudaSuccess, gpu.memory_bytes - gpu.device_bytes(), gpu.memory_bytes


@_api(1)
def cudaMalloc(gpu: FakeGpu, size: int) -> tuple[Any, ...]:
    _need(size, int, "size")
    if (err := gpu.blocking(f"cudaMalloc({size})")) is not None:
        return err, 0
    pointer = gpu.malloc(size)
    return (Err.cudaErrorMemoryAllocation, 0) if pointer is None else (Err.cudaSuccess, pointer)


@_api(0)
def cudaFree(gpu: FakeGpu, devPtr: int) -> tuple[Any, ...]:
    _need(devPtr, int, "devPtr")
    if (err := gpu.blocking("cudaFree")) is not None:
        return (err,)
    if devPtr == 0:
        return (Err.cudaSuccess,)
    return (Err.cudaSuccess if gpu.device.pop(devPtr, None) is not None else Err.cudaErrorInvalidValue,)


@_api(1)
def cudaMallocHost(gpu: FakeGpu, size: int) -> tuple[Any, ...]:
    _need(size, int, "size")
    if (err := gpu.blocking(f"cudaMallocHost({size})")) is not None:
        return err, 0
    buffer = (ctypes.c_ubyte * max(size, 1))()
    pointer = ctypes.addressof(buffer)
    gpu.pinned[pointer] = buffer
    return Err.cudaSuccess, pointer


@_api(0)
def cudaFreeHost(gpu: FakeGpu, ptr: int) -> tuple[Any, ...]:
    _need(ptr, int, "ptr")
    if (err := gpu.blocking("cudaFreeHost")) is not None:
        return (err,)
    buffer = gpu.pinned.pop(ptr, None)
    if buffer is None:
        return (Err.cudaErrorInvalidValue,)
    gpu._freed_pinned.append(buffer)
    return (Err.cudaSuccess,)


@_api(0)
def cudaMemcpyAsync(gpu: FakeGpu, dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple[Any, ...]:
    for value, what in ((dst, "dst"), (src, "src"), (count, "count")):
        _need(value, int, what)
    _need(kind, _real.cudaMemcpyKind, "kind")
    op = gpu.copy_op(dst, src, count, kind)
    return (Err.cudaErrorInvalidValue if op is None else gpu.submit(_stream_handle(stream), op),)


@_api(0)
def cudaMemcpy(gpu: FakeGpu, dst: int, src: int, count: int, kind: Any) -> tuple[Any, ...]:
    for value, what in ((dst, "dst"), (src, "src"), (count, "count")):
        _need(value, int, what)
    _need(kind, _real.cudaMemcpyKind, "kind")
    if (err := gpu.blocking("cudaMemcpy")) is not None:
        return (err,)
    op = gpu.copy_op(dst, src, count, kind)
    return (Err.cudaErrorInvalidValue if op is None else op(),)


@_api(1)
def cudaStreamCreateWithFlags(gpu: FakeGpu, flags: int) -> tuple[Any, ...]:
    _need(flags, int, "flags")
    handle = gpu.new_handle()
    gpu.streams[handle] = _Stream()
    return Err.cudaSuccess, _real.cudaStream_t(handle)


@_api(0)
def cudaStreamSynchronize(gpu: FakeGpu, stream: Any) -> tuple[Any, ...]:
    handle = _stream_handle(stream)
    if handle not in gpu.streams:
        return (Err.cudaErrorInvalidResourceHandle,)
    if (err := gpu.blocking("cudaStreamSynchronize")) is not None:
        return (err,)
    return (gpu.drain(handle),)


@_api(0)
def cudaDeviceSynchronize(gpu: FakeGpu) -> tuple[Any, ...]:
    if (err := gpu.blocking("cudaDeviceSynchronize")) is not None:
        return (err,)
    for handle in gpu.streams:
        if (err := gpu.drain(handle)) != Err.cudaSuccess:
            return (err,)
    return (Err.cudaSuccess,)


@_api(0)
def cudaStreamDestroy(gpu: FakeGpu, stream: Any) -> tuple[Any, ...]:
    handle = _stream_handle(stream)
    if handle not in gpu.streams:
        return (Err.cudaErrorInvalidResourceHandle,)
    if (err := gpu.blocking("cudaStreamDestroy")) is not None:
        return (err,)
    err = gpu.drain(handle)  # queued work completes before the stream's resources go
    del gpu.streams[handle]
    return (err,)


@_api(0)
def cudaStreamBeginCapture(gpu: FakeGpu, stream: Any, mode: Any) -> tuple[Any, ...]:
    _need(mode, _real.cudaStreamCaptureMode, "mode")
    target = gpu.streams.get(_stream_handle(stream))
    if target is None:
        return (Err.cudaErrorInvalidResourceHandle,)
    if target.capture is not None:
        return (Err.cudaErrorIllegalState,)
    target.capture = _Capture(mode, threading.get_ident())
    return (Err.cudaSuccess,)


@_api(1)
def cudaStreamEndCapture(gpu: FakeGpu, stream: Any) -> tuple[Any, ...]:
    target = gpu.streams.get(_stream_handle(stream))
    if target is None or target.capture is None:
        return Err.cudaErrorIllegalState, _real.cudaGraph_t(0)
    capture, target.capture = target.capture, None
    if capture.invalid is not None:
        return Err.cudaErrorStreamCaptureInvalidated, _real.cudaGraph_t(0)
    handle = gpu.new_handle()
    gpu.graphs[handle] = capture.ops
    return Err.cudaSuccess, _real.cudaGraph_t(handle)


@_api(1)
def cudaGraphInstantiate(gpu: FakeGpu, graph: Any, flags: int) -> tuple[Any, ...]:
    _need(graph, _real.cudaGraph_t, "graph")
    _need(flags, int, "flags")
    ops = gpu.graphs.get(int(graph))
    if ops is None:
        return Err.cudaErrorInvalidValue, None
    handle = gpu.new_handle()
    gpu.graph_execs[handle] = list(ops)
    return Err.cudaSuccess, _real.cudaGraphExec_t(handle)


@_api(0)
def cudaGraphLaunch(gpu: FakeGpu, graphExec: Any, stream: Any) -> tuple[Any, ...]:
    _need(graphExec, _real.cudaGraphExec_t, "graphExec")
    ops = gpu.graph_execs.get(int(graphExec))
    if ops is None:
        return (Err.cudaErrorInvalidValue,)

    def launch() -> Any:
        gpu.counts["graph launches"] += 1
        for op in ops:
            if (err := op()) != Err.cudaSuccess:
                return err
        return Err.cudaSuccess

    return (gpu.submit(_stream_handle(stream), launch),)


@_api(0)
def cudaGraphDestroy(gpu: FakeGpu, graph: Any) -> tuple[Any, ...]:
    _need(graph, _real.cudaGraph_t, "graph")
    return (Err.cudaSuccess if gpu.graphs.pop(int(graph), None) is not None else Err.cudaErrorInvalidValue,)


@_api(0)
def cudaGraphExecDestroy(gpu: FakeGpu, graphExec: Any) -> tuple[Any, ...]:
    _need(graphExec, _real.cudaGraphExec_t, "graphExec")
    return (Err.cudaSuccess if gpu.graph_execs.pop(int(graphExec), None) is not None else Err.cudaErrorInvalidValue,)


RUNTIME_FUNCTIONS = (
    cudaGetDeviceCount, cudaSetDevice, cudaGetDeviceProperties, cudaGetErrorString, cudaGetLastError, cudaMemGetInfo,
    cudaMalloc, cudaFree, cudaMallocHost, cudaFreeHost, cudaMemcpyAsync, cudaMemcpy, cudaStreamCreateWithFlags,
    cudaStreamSynchronize, cudaDeviceSynchronize, cudaStreamDestroy, cudaStreamBeginCapture, cudaStreamEndCapture,
    cudaGraphInstantiate, cudaGraphLaunch, cudaGraphDestroy, cudaGraphExecDestroy,
)
RUNTIME_TYPES = ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStream_t", "cudaGraph_t",
                 "cudaGraphExec_t", "cudaStreamNonBlocking")


def runtime_module() -> ModuleType:
    """The fake `cuda.bindings.runtime`: the functions above and the real enums and handle types."""
    module = ModuleType("cuda.bindings.runtime", "fake cuda.bindings.runtime (tests/fake_tensorrt.py)")
    for function in RUNTIME_FUNCTIONS:
        setattr(module, function.__name__, function)
    for name in RUNTIME_TYPES:
        setattr(module, name, getattr(_real, name))
    return module


# ---- tensorrt ---------------------------------------------------------------------------------------------------

class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class ProfilingVerbosity(enum.IntEnum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class LayerInformationFormat(enum.IntEnum):
    ONELINE = 0
    JSON = 1


NUMPY_TYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
               DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
ONNX_TYPES = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
              onnx.TensorProto.INT8: DataType.INT8, onnx.TensorProto.INT32: DataType.INT32,
              onnx.TensorProto.BOOL: DataType.BOOL, onnx.TensorProto.UINT8: DataType.UINT8,
              onnx.TensorProto.INT64: DataType.INT64}
LAYER_FORMATS = {DataType.FLOAT: "FP32", DataType.HALF: "FP16", DataType.INT8: "Int8", DataType.INT32: "Int32",
                 DataType.BOOL: "Bool", DataType.UINT8: "UInt8", DataType.INT64: "Int64"}


def nptype(trt_type: DataType) -> type:
    _need(trt_type, DataType, "trt_type")
    return NUMPY_TYPES[trt_type]


class Logger:
    """trt.Logger: keeps messages at or above its severity in the fake GPU's trt_log."""

    __slots__ = ("min_severity",)
    Severity = Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        _need(min_severity, Severity, "min_severity")
        self.min_severity = min_severity

    def log(self, severity: Severity, msg: str) -> None:
        _need(severity, Severity, "severity")
        if severity <= self.min_severity:
            _gpu().trt_log.append(f"{severity.name}: {msg}")


@functools.cache
def _session(onnx_path: str, sha256: str) -> ort.InferenceSession:
    """One ONNX Runtime session per graph file content, shared (like a GPU's loaded kernels) by every plan of it."""
    return ort.InferenceSession(onnx_path, session_options(1), providers=["CPUExecutionProvider"])


def _graph_io(model: onnx.ModelProto) -> list[tuple[str, TensorIOMode, DataType, tuple[int, ...]]]:
    """(name, mode, dtype, shape with -1 for a symbolic dim) of a graph's inputs and outputs."""
    initializers = {i.name for i in model.graph.initializer}
    io = []
    for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
            io.append((value.name, mode, ONNX_TYPES[tensor.elem_type], shape))
    return io


def _resolved_io(model: str, io: list[tuple[str, TensorIOMode, DataType, tuple[int, ...]]],
                 ) -> list[tuple[str, TensorIOMode, DataType, tuple[int, ...]]]:
    """io with the symbolic non-batch dims of the outputs resolved, as TensorRT's parser resolves a dim that follows
    from the inputs' static dims (an exported map's H x W comes out of shape arithmetic): one batch-1 run of the
    graph on zeros gives them. Inputs keep theirs; a graph with a symbolic non-batch input dim is left as it is."""
    if all(-1 not in shape[1:] for _, mode, _, shape in io if mode == TensorIOMode.OUTPUT):
        return io
    inputs = [(n, d, shape) for n, mode, d, shape in io if mode == TensorIOMode.INPUT]
    if any(-1 in shape[1:] for _, _, shape in inputs):
        return io
    session = ort.InferenceSession(model, session_options(1), providers=["CPUExecutionProvider"])
    feeds = {n: np.zeros((1, *shape[1:]), NUMPY_TYPES[d]) for n, d, shape in inputs}
    names = [n for n, mode, _, _ in io if mode == TensorIOMode.OUTPUT]
    got = dict(zip(names, session.run(names, feeds), strict=True))
    return [(n, mode, d, (shape[0], *got[n].shape[1:]) if mode == TensorIOMode.OUTPUT else shape)
            for n, mode, d, shape in io]


class ICudaEngine:
    """A deserialised fake plan: its graph's tensors, one optimisation profile, contexts over an ORT session."""

    __slots__ = ("__weakref__", "_io", "_plan", "_session")

    def __init__(self, plan: dict[str, Any]) -> None:
        self._plan = plan
        self._io = {name: (mode, dtype, tuple(shape)) for name, mode, dtype, shape in
                    ((n, TensorIOMode(m), DataType(d), s) for n, m, d, s in plan["io"])}
        self._session = _session(plan["onnx"], plan["onnx_sha256"])

    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def device_memory_size_v2(self) -> int:
        return int(self._plan["device_memory"])

    def get_tensor_name(self, index: int) -> str:
        _need(index, int, "index")
        return list(self._io)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        _need(name, str, "name")
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        _need(name, str, "name")
        return self._io[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        _need(name, str, "name")
        _need(profile_index, int, "profile_index")
        if profile_index != 0 or name not in self._plan["profile"]:
            raise RuntimeError(f"no profile {profile_index} shape for {name!r}")
        return [tuple(self._plan["profile"][name][k]) for k in ("min", "opt", "max")]

    def create_execution_context(self, strategy: ExecutionContextAllocationStrategy =
                                 ExecutionContextAllocationStrategy.STATIC) -> IExecutionContext | None:
        _need(strategy, ExecutionContextAllocationStrategy, "strategy")
        gpu = _gpu()
        with gpu.lock:
            static = None
            if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
                static = gpu.malloc(self.device_memory_size_v2)
                if static is None:
                    _trt_error("out of device memory for an execution context")
                    return None
            context = IExecutionContext(self, static)
            gpu.contexts.add(context)
            if static is not None:
                weakref.finalize(context, gpu.device.pop, static, None)
            return context

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self._plan["onnx"])


class EngineInspector:
    """The engine inspector: layer output types, from the ONNX graph's inferred value types."""

    __slots__ = ("_onnx",)

    def __init__(self, onnx_path: str) -> None:
        self._onnx = onnx_path

    def get_engine_information(self, format: LayerInformationFormat) -> str:
        _need(format, LayerInformationFormat, "format")
        model = onnx.shape_inference.infer_shapes(onnx.load(self._onnx))
        types = {v.name: v.type.tensor_type.elem_type for v in
                 [*model.graph.value_info, *model.graph.output, *model.graph.input]}
        layers = [{"Name": node.name, "Outputs": [
            {"Format/Datatype": f"Row major linear {LAYER_FORMATS.get(ONNX_TYPES.get(types.get(o, 0)), 'unknown')}"}
            for o in node.output]} for node in model.graph.node]
        return json.dumps({"Layers": layers})


class IExecutionContext:
    """An execution context: input shapes within the profile, tensor addresses, its activation memory."""

    __slots__ = ("__weakref__", "_addresses", "_engine", "_memory", "_ready", "_shapes", "_static")

    def __init__(self, engine: ICudaEngine, static: int | None) -> None:
        self._engine, self._static = engine, static
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None
        self._ready: tuple[Any, ...] | None = None  # the shapes the last enqueue set up

    def set_input_shape(self, name: str, shape: tuple[int, ...] | list[int]) -> bool:
        _need(name, str, "name")
        _need(shape, (tuple, list), "shape")
        for d in shape:
            _need(d, (int, np.integer), "shape dimension")
        shape = tuple(int(d) for d in shape)
        engine = self._engine
        if engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            _trt_error(f"setInputShape: {name!r} is not an input")
            return False
        low, _, high = engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high, strict=True)):
            _trt_error(f"setInputShape: {name} {shape} is outside the profile [{low}, {high}]")
            return False
        self._shapes[name] = shape
        return True

    def _batch(self) -> int | None:
        inputs = [n for n, (mode, _, _) in self._engine._io.items() if mode == TensorIOMode.INPUT]
        batches = {self._shapes[n][0] for n in inputs if n in self._shapes}
        return batches.pop() if len(batches) == 1 and all(n in self._shapes for n in inputs) else None

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        _need(name, str, "name")
        mode, _, shape = self._engine._io[name]
        if mode == TensorIOMode.INPUT:
            return self._shapes.get(name, shape)
        batch = self._batch()
        return shape if batch is None else (batch, *shape[1:])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        _need(name, str, "name")
        _need(memory, int, "memory")
        if name not in self._engine._io:
            _trt_error(f"setTensorAddress: no tensor {name!r}")
            return False
        self._addresses[name] = memory
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        _need(memory, int, "memory")
        _need(size, int, "size")
        self._memory = (memory, size)

    def execute_async_v3(self, stream_handle: int) -> bool:
        _need(stream_handle, int, "stream_handle")
        gpu, engine = _gpu(), self._engine
        with gpu.lock:
            batch = self._batch()
            missing = [n for n in engine._io if n not in self._addresses]
            need = engine.device_memory_size_v2
            if batch is None or missing:
                _trt_error(f"enqueueV3: input shapes or tensor addresses not set ({missing})")
                return False
            if self._static is None and (self._memory is None or self._memory[1] < need):
                _trt_error(f"enqueueV3: a USER_MANAGED context needs set_device_memory of {need} bytes")
                return False
            if stream_handle not in gpu.streams:
                _trt_error(f"enqueueV3: {stream_handle:#x} is no stream")
                return False
            shapes = tuple(sorted(self._shapes.items()))
            if self._ready != shapes or engine._plan.get("uncapturable"):  # a synchronous set-up step
                if gpu.blocking("TensorRT's enqueue synchronising (new shapes or data-dependent shapes)") is not None:
                    _trt_error("enqueueV3: a synchronous step failed while the stream is captured")
                    return False
                gpu.drain(stream_handle)
                self._ready = shapes
            tensors = {n: (self._addresses[n], self.get_tensor_shape(n), np.dtype(NUMPY_TYPES[dtype]), mode)
                       for n, (mode, dtype, _) in engine._io.items()}
            scratch = (self._static, need) if self._static is not None else self._memory
            return gpu.submit(stream_handle, functools.partial(_kernels, gpu, engine._session, tensors,
                                                               scratch)) == Err.cudaSuccess


def _kernels(gpu: FakeGpu, session: ort.InferenceSession, tensors: dict[str, Any], scratch: tuple[int, int]) -> Any:
    """The engine's work on the device: read the inputs at their addresses, run the graph, write the outputs."""
    if gpu.device_span(*scratch) is None:
        return Err.cudaErrorIllegalAddress
    feeds = {}
    for name, (address, shape, dtype, mode) in tensors.items():
        span = gpu.device_span(address, int(np.prod(shape)) * dtype.itemsize)
        if span is None:
            return Err.cudaErrorIllegalAddress
        if mode == TensorIOMode.INPUT:
            feeds[name] = span.view(dtype).reshape(shape).copy()
    outputs = [n for n, t in tensors.items() if t[3] == TensorIOMode.OUTPUT]
    for name, value in zip(outputs, session.run(outputs, feeds), strict=True):
        address, shape, dtype, _ = tensors[name]
        span = gpu.device_span(address, int(np.prod(shape)) * dtype.itemsize)
        span[:] = np.ascontiguousarray(value, dtype).reshape(-1).view(np.uint8)
    gpu.counts["kernels"] += 1
    return Err.cudaSuccess


class Runtime:
    """trt.Runtime: deserialises fake plans built by this TensorRT version."""

    __slots__ = ("_logger",)

    def __init__(self, logger: Logger) -> None:
        _need(logger, Logger, "logger")
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        _need(serialized_engine, (bytes, bytearray, memoryview), "serialized_engine")
        try:
            plan = json.loads(bytes(serialized_engine))
            ok = plan.get("format") == "fake-tensorrt-plan"
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self._logger.log(Severity.ERROR, "deserializeCudaEngine: not a plan")
            return None
        if plan["tensorrt"] != _gpu().trt_version:
            self._logger.log(Severity.ERROR, f"the plan was built by TensorRT {plan['tensorrt']}, this is "
                                             f"{_gpu().trt_version}")
            return None
        graph = Path(plan["onnx"])
        if not graph.is_file() or hashlib.sha256(graph.read_bytes()).hexdigest() != plan["onnx_sha256"]:
            raise AssertionError(f"fake plan of {graph}: the graph changed after the build (a real plan would not "
                                 "notice: the backend's sidecar check must)")
        engine = ICudaEngine(plan)
        _gpu().engines.add(engine)
        return engine


class ITensor:
    """A network input: name, shape (-1 where dynamic), type."""

    __slots__ = ("dtype", "name", "shape")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class INetworkDefinition:
    """A network the ONNX parser filled: its graph file and tensors."""

    __slots__ = ("_flags", "_io", "_onnx")

    def __init__(self, flags: int) -> None:
        self._flags = flags
        self._onnx: Path | None = None
        self._io: list[tuple[str, TensorIOMode, DataType, tuple[int, ...]]] = []

    @property
    def num_inputs(self) -> int:
        return sum(mode == TensorIOMode.INPUT for _, mode, _, _ in self._io)

    def get_input(self, index: int) -> ITensor:
        _need(index, int, "index")
        name, _, dtype, shape = [t for t in self._io if t[1] == TensorIOMode.INPUT][index]
        return ITensor(name, shape, dtype)


class OnnxParser:
    """trt.OnnxParser: fills a network from an ONNX file."""

    __slots__ = ("_errors", "_logger", "_network")

    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        _need(network, INetworkDefinition, "network")
        _need(logger, Logger, "logger")
        self._network, self._logger, self._errors = network, logger, []

    def parse_from_file(self, model: str) -> bool:
        _need(model, str, "model")
        try:
            graph = onnx.load(model)
        except Exception as exc:
            self._errors.append(f"cannot read {model}: {exc}")
            return False
        self._network._onnx, self._network._io = Path(model).resolve(), _resolved_io(model, _graph_io(graph))
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        _need(index, int, "index")
        return self._errors[index]


class IOptimizationProfile:
    """min/opt/max shapes per input."""

    __slots__ = ("_shapes",)

    def __init__(self) -> None:
        self._shapes: dict[str, dict[str, list[int]]] = {}

    def set_shape(self, input: str, min: tuple[int, ...], opt: tuple[int, ...], max: tuple[int, ...]) -> None:
        _need(input, str, "input")
        for value in (min, opt, max):
            _need(value, (tuple, list), "shape")
        self._shapes[input] = {"min": list(min), "opt": list(opt), "max": list(max)}


class IBuilderConfig:
    """Builder settings: memory pool limits, profiling verbosity, the optimisation profiles."""

    __slots__ = ("_pools", "_profiles", "_verbosity")

    def __init__(self) -> None:
        self._pools: dict[MemoryPoolType, int] = {}
        self._profiles: list[IOptimizationProfile] = []
        self._verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        _need(pool, MemoryPoolType, "pool")
        _need(pool_size, int, "pool_size")
        self._pools[pool] = pool_size

    @property
    def profiling_verbosity(self) -> ProfilingVerbosity:
        return self._verbosity

    @profiling_verbosity.setter
    def profiling_verbosity(self, value: ProfilingVerbosity) -> None:
        _need(value, ProfilingVerbosity, "profiling_verbosity")
        self._verbosity = value

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        _need(profile, IOptimizationProfile, "profile")
        self._profiles.append(profile)
        return len(self._profiles) - 1


class IHostMemory:
    """A serialised plan."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def nbytes(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return self._data


def _profile_fits(profile: dict[str, list[int]] | None, shape: tuple[int, ...]) -> bool:
    """True when min/opt/max have the network shape's rank, match its fixed dims and min <= opt <= max."""
    if profile is None:
        return False
    low, opt, high = profile["min"], profile["opt"], profile["max"]
    if any(len(dims) != len(shape) or any(s != -1 and d != s for d, s in zip(dims, shape, strict=True))
           for dims in (low, opt, high)):
        return False
    return all(lo <= op <= hi for lo, op, hi in zip(low, opt, high, strict=True))


class Builder:
    """trt.Builder: 'builds' a plan recording the graph, the profile and this TensorRT version."""

    __slots__ = ("_logger",)

    def __init__(self, logger: Logger) -> None:
        _need(logger, Logger, "logger")
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        _need(flags, int, "flags")
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        _need(network, INetworkDefinition, "network")
        _need(config, IBuilderConfig, "config")
        gpu = _gpu()
        if network._onnx is None or len(config._profiles) != 1:
            self._logger.log(Severity.ERROR, "build: an empty network, or not exactly one optimisation profile")
            return None
        shapes = config._profiles[0]._shapes
        for name, mode, _, shape in network._io:
            if mode == TensorIOMode.INPUT and not _profile_fits(shapes.get(name), shape):
                self._logger.log(Severity.ERROR, f"build: no valid profile for input {name}: {shapes.get(name)}")
                return None
        max_batch = max(shapes[n]["max"][0] for n, mode, _, _ in network._io if mode == TensorIOMode.INPUT)
        per_frame = sum(int(np.prod([d for d in shape[1:]])) * np.dtype(NUMPY_TYPES[dtype]).itemsize
                        for _, _, dtype, shape in network._io)
        plan = {"format": "fake-tensorrt-plan", "tensorrt": gpu.trt_version, "onnx": str(network._onnx),
                "onnx_sha256": hashlib.sha256(network._onnx.read_bytes()).hexdigest(),
                "io": [[n, int(m), int(d), list(s)] for n, m, d, s in network._io], "profile": shapes,
                "device_memory": 16 * per_frame * max_batch}  # activations: a multiple of the I/O, per frame
        return IHostMemory(json.dumps(plan).encode())


TENSORRT_NAMES = (Logger, Runtime, Builder, OnnxParser, TensorIOMode, DataType, ExecutionContextAllocationStrategy,
                  NetworkDefinitionCreationFlag, MemoryPoolType, ProfilingVerbosity, LayerInformationFormat, nptype)
TENSORRT_OBJECTS = (ICudaEngine, IExecutionContext, EngineInspector, INetworkDefinition, ITensor,
                    IOptimizationProfile, IBuilderConfig, IHostMemory, Severity)


def tensorrt_module(version: str) -> ModuleType:
    """The fake `tensorrt` of TensorRT `version`."""
    module = ModuleType("tensorrt", "fake tensorrt (tests/fake_tensorrt.py)")
    module.__version__ = version
    for value in TENSORRT_NAMES:
        setattr(module, value.__name__, value)
    return module


def mark_uncapturable(plan: Path) -> None:
    """Mark a fake plan as having data-dependent shapes: every enqueue synchronises, so no CUDA graph captures it."""
    data = json.loads(plan.read_bytes())
    plan.write_text(json.dumps(data | {"uncapturable": True}))


def install(monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu | None = None) -> FakeGpu:
    """Put the fake `tensorrt` and `cuda.bindings.runtime` of `gpu` in sys.modules for one test."""
    gpu = gpu or FakeGpu()
    runtime = runtime_module()
    bindings = ModuleType("cuda.bindings")
    bindings.__path__ = []
    bindings.runtime = runtime  # type: ignore[attr-defined]
    cuda = ModuleType("cuda")
    cuda.__path__ = []
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setattr(sys.modules[__name__], "_current", gpu)
    for name, module in {"tensorrt": tensorrt_module(gpu.trt_version), "cuda": cuda, "cuda.bindings": bindings,
                         "cuda.bindings.runtime": runtime}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return gpu
