"""The Engine seam between the model and the daemon, and the factory that picks a backend by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class MapSource(Protocol):
    """Anything that maps frames to anomaly maps at a fixed size: every Engine, and a reference method a benchmark
    scores beside them. All that running one over a data set (calibration.evaluate.infer_dataset) or over tiles
    (engines.tiled.infer_tiled) needs."""

    image_size: int

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """Map N x S x S x 3 uint8 RGB images to N x S x S float32 anomaly maps at input resolution."""
        ...


@runtime_checkable
class Engine(MapSource, Protocol):
    """One loaded SKU model: uint8 RGB frames in, float32 anomaly maps in [0, 1] out."""

    backend: str

    def load(self, sku_dir: Path) -> None:
        """Load the SKU directory's weights/graphs/plans; raise EngineError with the fix on failure."""
        ...

    def warmup(self) -> None:
        """Run a dummy batch so the first real frame does not pay for lazy initialisation."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, precision, image size, schedule and versions, for status messages and logs."""
        ...


def close_engine(engine: Engine) -> None:
    """Free what `engine` holds beyond Python objects once nothing will call it again (TensorRT: device memory,
    CUDA graphs, its stream); an engine without a close() (torch, ONNX Runtime) is left to the garbage collector."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()
