"""GPU preflight: one clear line (EngineError) for each way the NVIDIA stack can be missing or wrong.

No driver, no GPU, a bad device id, cuda-python or TensorRT not installed, TensorRT's libraries missing,
a TensorRT version this code does not support, a CPU-only torch: each is named with its fix, so the CLI exits 2
and the daemon refuses the SKU with the same line instead of an "internal error". Imports nothing GPU-related
at module level: a CPU box imports this freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from foundation.errors import EngineError, first_line

# TensorRT releases whose Python API this code uses and tests (tests/test_tensorrt_api.py): [floor, ceiling)
TENSORRT_FLOOR = (10, 8)
TENSORRT_CEILING = (12, 0)
GPU_EXTRA_HINT = "pip install 'tdad-inspector[gpu]'"  # CUDA 12+ driver; '[gpu-cu13]' on a CUDA 13 driver
CUDA_TORCH_HINT = ("install a CUDA build of torch 2.13.0: pip install torch==2.13.0 --index-url "
                   "https://download.pytorch.org/whl/cu128 (or deploy/install.sh on a box where nvidia-smi works)")
NO_GPU_FIX = "check that nvidia-smi lists the GPU, or use engine.backend = \"onnxruntime\""


@dataclass(frozen=True)
class GpuInfo:
    """The CUDA device an engine or a build runs on."""

    device_id: int
    name: str
    compute_capability: str
    memory_mb: int


def _visible() -> str:
    """CUDA_VISIBLE_DEVICES as a note for error lines, when it is set."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if value is None else f" (CUDA_VISIBLE_DEVICES={value!r})"


def cuda_runtime() -> ModuleType:
    """cuda-python's runtime API module (`cuda.bindings.runtime`); EngineError naming the [gpu] extra."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise EngineError(f"GPU engines need NVIDIA's cuda-python (cuda-bindings), which is not installed: "
                          f"{GPU_EXTRA_HINT}") from None
    return runtime


def check_cuda(result: Any, what: str) -> Any:
    """The value(s) of a cuda-bindings call `(err, *values)`; EngineError naming the call and the CUDA error."""
    rt = cuda_runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        raise EngineError(f"CUDA error in {what}: {err.name} ({text.decode(errors='replace')})")
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device(device_id: int, key: str = "engine.device_id") -> GpuInfo:
    """Select CUDA device `device_id` for this thread and describe it; EngineError for no driver/GPU/bad id."""
    rt = cuda_runtime()
    err, count = rt.cudaGetDeviceCount()
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        raise EngineError("no usable NVIDIA driver: libcuda.so.1 is missing or older than this CUDA runtime; "
                          "install the NVIDIA driver (nvidia-smi must work), or use engine.backend = \"onnxruntime\"")
    if err == rt.cudaError_t.cudaErrorNoDevice or (err == rt.cudaError_t.cudaSuccess and count == 0):
        raise EngineError(f"no CUDA GPU is visible{_visible()}; {NO_GPU_FIX}")
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        raise EngineError(f"CUDA cannot start: {err.name} ({text.decode(errors='replace')}){_visible()}; "
                          f"{NO_GPU_FIX}")
    if not 0 <= device_id < count:
        raise EngineError(f"{key} = {device_id}, but this machine has {count} CUDA GPU(s), ids 0..{count - 1}"
                          f"{_visible()}; fix {key}")
    check_cuda(rt.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
    props = check_cuda(rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = bytes(props.name).split(b"\0", 1)[0].decode(errors="replace").strip()
    return GpuInfo(device_id, name, f"{props.major}.{props.minor}", int(props.totalGlobalMem) >> 20)


def tensorrt_version_ok(version: str) -> bool:
    """True when TensorRT `version` ("10.16.1.11") is in [TENSORRT_FLOOR, TENSORRT_CEILING)."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return TENSORRT_FLOOR <= major_minor < TENSORRT_CEILING


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, checked to be a supported release whose libraries load; EngineError otherwise."""
    supported = f"{'.'.join(map(str, TENSORRT_FLOOR))} <= TensorRT < {'.'.join(map(str, TENSORRT_CEILING))}"
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name in ("tensorrt", "tensorrt_bindings"):
            raise EngineError(f"TensorRT is not installed: {GPU_EXTRA_HINT}, or use engine.backend = \"torch\" "
                              "(device = \"cuda\") or \"onnxruntime\"") from None
        raise EngineError(f"TensorRT cannot be imported ({exc}); {GPU_EXTRA_HINT}") from None
    except (ImportError, OSError) as exc:  # the bindings are there, libnvinfer (tensorrt-cu*-libs) is not
        raise EngineError(f"TensorRT's libraries cannot be loaded ({first_line(exc)}); reinstall them: "
                          "pip install --force-reinstall 'tdad-inspector[gpu]'") from None
    version = str(getattr(trt, "__version__", "unknown"))
    if not tensorrt_version_ok(version):
        raise EngineError(f"TensorRT {version} is not supported (this build supports {supported}); "
                          f"{GPU_EXTRA_HINT}")
    return trt


def torch_cuda_device(device_id: int, key: str = "device_id") -> Any:
    """`torch.device("cuda:N")` after checking torch is a CUDA build and the GPU is there; EngineError otherwise."""
    import torch

    if torch.version.cuda is None:
        raise EngineError(f"torch {torch.__version__} is a CPU-only build, so device = \"cuda\" cannot run; "
                          f"{CUDA_TORCH_HINT}")
    if not torch.cuda.is_available():
        raise EngineError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"
                          f"{_visible()}; {NO_GPU_FIX}")
    count = torch.cuda.device_count()
    if not 0 <= device_id < count:
        raise EngineError(f"{key} = {device_id}, but this machine has {count} CUDA GPU(s), ids 0..{count - 1}"
                          f"{_visible()}; fix {key}")
    return torch.device(f"cuda:{device_id}")
