"""Backend registry and `create_engine`, the one way the daemon, eval and bench get a loaded Engine.

Backends are imported lazily by name, so `onnxruntime` never imports torch's runtime code paths it does not
need and `tensorrt` is only touched when asked for (and reported as a missing extra when absent).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from engines.runtime.base import Engine
from engines.runtime.config import (
    EngineSettings,
    OnnxRuntimeSettings,
    TensorRTSettings,
    TorchSettings,
    engine_settings,
)
from foundation.errors import EngineError

# backend name -> (module, class); the module is imported only when the backend is created
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("engines.runtime.torch_backend", "TorchEngine"),
    "onnxruntime": ("engines.runtime.onnx_backend", "OnnxEngine"),
    "tensorrt": ("engines.runtime.tensorrt_backend", "TensorRTEngine"),
}


def engine_class(backend: str) -> type[Any]:
    """Import and return the Engine class registered under `backend` (EngineError names the valid ones)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown engine backend {backend!r} (engine.backend): valid are {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(f"engine backend {backend!r} cannot be imported ({exc}); reinstall tdad-inspector") from exc
    return getattr(module, class_name)


def create_engine(settings: EngineSettings, sku_dir: Path, *,
                  schedule_override: dict[str, Any] | None = None) -> Engine:
    """A loaded, ready Engine of `settings.backend` for the SKU in `sku_dir` (weights, graphs or plans)."""
    engine = engine_class(settings.backend)(settings, schedule_override=schedule_override)
    engine.load(Path(sku_dir))
    return engine


__all__ = ["BACKENDS", "Engine", "EngineSettings", "OnnxRuntimeSettings", "TensorRTSettings",
           "TorchSettings", "create_engine", "engine_class", "engine_settings"]
