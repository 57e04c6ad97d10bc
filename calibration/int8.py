"""TensorRT INT8 entropy calibration over representative good frames of a SKU, with a cache file.

The pieces that do not need a GPU are plain Python and tested anywhere: `CalibrationStream` (a fixed number
of preprocessed float32 batches in a deterministic order) and `CalibrationCache` (read/write of TensorRT's
calibration table, written atomically). `make_entropy_calibrator` wraps them in a
`tensorrt.IInt8EntropyCalibrator2`, importing tensorrt and pycuda only then, and raises EngineError with the
install hint when they are missing. Usage when building an INT8 plan (with a current CUDA context):

    stream = CalibrationStream(FolderDataset(good_dir, size), batch_size=8, preprocess=preprocess)
    config.int8_calibrator = make_entropy_calibrator(stream, sku_dir / "encoder.int8.cache", "images")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.runtime import GPU_EXTRA_HINT
from foundation.errors import DataError, EngineError
from foundation.log import get_logger

log = get_logger(__name__)

# TensorRT calibration tables start with "TRT-<version>-<algorithm>"; anything else is not one.
CACHE_MAGIC = b"TRT-"

Preprocess = Callable[[np.ndarray], np.ndarray]


def _image_of(entry: Any) -> np.ndarray:
    """The uint8 HxWx3 image of a data-set Item (`.image`) or of a bare array."""
    return np.asarray(getattr(entry, "image", entry))


class CalibrationStream:
    """Fixed-count, deterministic stream of preprocessed float32 C-contiguous batches (full batches only).

    `images` is a sequence of uint8 HxWx3 RGB arrays or of data-set Items; batch i holds images
    [i * batch_size, (i + 1) * batch_size) in sequence order, so every pass (and every run) calibrates on the
    same data. A trailing partial batch is dropped because TensorRT calibrates with one fixed batch size.
    """

    def __init__(
        self,
        images: Sequence[Any],
        batch_size: int,
        preprocess: Preprocess,
        max_batches: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_batches = len(images) // batch_size
        if n_batches == 0:
            raise DataError(
                f"INT8 calibration needs at least {batch_size} representative good images (one batch), "
                f"got {len(images)}: add good images of the SKU or lower the calibration batch size"
            )
        self.images = images
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.n_batches = n_batches if max_batches is None else min(n_batches, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, index: int) -> np.ndarray:
        """Batch `index` through the preprocessing callable, as float32 C-contiguous."""
        start = index * self.batch_size
        frames = np.stack([_image_of(self.images[i]) for i in range(start, start + self.batch_size)])
        return np.ascontiguousarray(self.preprocess(frames), dtype=np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every batch in order; all share the first batch's shape (ValueError otherwise)."""
        shape: tuple[int, ...] | None = None
        for index in range(self.n_batches):
            batch = self.batch(index)
            if shape is None:
                shape = batch.shape
            elif batch.shape != shape:
                raise ValueError(f"calibration batch {index} has shape {batch.shape}, expected {shape}")
            yield batch


class CalibrationCache:
    """TensorRT's INT8 calibration table on disk: reused when present, so a rebuild skips calibration."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> bytes | None:
        """The cached table, or None when absent, empty or not a TensorRT table (then it is recalibrated)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not data.startswith(CACHE_MAGIC):
            log.warning("int8_cache_ignored", path=str(self.path), reason="not a TensorRT calibration table")
            return None
        return data

    def write(self, data: bytes) -> None:
        """Store the table atomically (temp file + rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(bytes(data))
        tmp.replace(self.path)
        log.info("int8_cache_written", path=str(self.path), size=len(data))


def make_entropy_calibrator(stream: CalibrationStream, cache_path: Path, input_name: str) -> Any:
    """A tensorrt.IInt8EntropyCalibrator2 feeding `stream` into the network input `input_name`.

    Needs a current CUDA context (the builder's). EngineError with the install hint without tensorrt/pycuda.
    """
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(
            f"INT8 calibration needs TensorRT and pycuda ({exc.name} is not installed): {GPU_EXTRA_HINT}"
        ) from None

    cache = CalibrationCache(cache_path)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        """Streams calibration batches to one device buffer; reads/writes the cache file."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(stream)
            self._device: Any = None

        def get_batch_size(self) -> int:
            return stream.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if input_name not in names:
                raise EngineError(f"INT8 calibrator feeds input {input_name!r} but the network asks for {names}")
            batch = next(self._batches, None)
            if batch is None:
                return None
            if self._device is None:
                self._device = cuda.mem_alloc(batch.nbytes)
            cuda.memcpy_htod(self._device, batch)
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read()

        def write_calibration_cache(self, data: Any) -> None:
            cache.write(bytes(data))

    return EntropyCalibrator()
