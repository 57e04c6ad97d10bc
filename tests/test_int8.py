"""INT8 calibration: the batch stream and cache work without TensorRT; the TRT factory explains what is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from calibration.int8 import CalibrationCache, CalibrationStream, make_entropy_calibrator
from engines.data import FolderDataset
from engines.preprocess import preprocess
from foundation.errors import DataError, EngineError
from tests.fixtures_data import make_good_folder


def frames(n: int, size: int = 8) -> list[np.ndarray]:
    """n distinct uint8 images: image i is filled with the value i."""
    return [np.full((size, size, 3), i, dtype=np.uint8) for i in range(n)]


def test_stream_yields_fixed_count_of_contiguous_float32_batches_in_order() -> None:
    stream = CalibrationStream(frames(11), batch_size=4, preprocess=preprocess)
    batches = list(stream)
    assert len(stream) == len(batches) == 2  # the trailing 3 images are dropped
    for batch in batches:
        assert batch.dtype == np.float32 and batch.flags.c_contiguous and batch.shape == (4, 3, 8, 8)
    assert [round(float(b[j, 0, 0, 0]) * 255) for b in batches for j in range(4)] == list(range(8))
    again = list(stream)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_stream_limits_and_errors() -> None:
    assert len(CalibrationStream(frames(20), 4, preprocess, max_batches=3)) == 3
    with pytest.raises(DataError, match="at least 4 representative good images"):
        CalibrationStream(frames(3), 4, preprocess)
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationStream(frames(3), 0, preprocess)
    mixed = [*frames(2, size=8), *frames(2, size=16)]
    with pytest.raises(ValueError, match="shape"):
        list(CalibrationStream(mixed, 2, preprocess))


def test_stream_over_a_folder_dataset(tmp_path: Path) -> None:
    dataset = FolderDataset(make_good_folder(tmp_path, n=5, size=32), image_size=32)
    batches = list(CalibrationStream(dataset, 2, preprocess))
    assert len(batches) == 2 and batches[0].shape == (2, 3, 32, 32)
    expected = preprocess(np.stack([dataset[2].image, dataset[3].image]))
    np.testing.assert_array_equal(batches[1], expected)


def test_cache_round_trip_and_rejects_foreign_files(tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path / "plans" / "encoder.int8.cache")
    assert cache.read() is None
    table = b"TRT-100300-EntropyCalibration2\ninput: 3c000000\n"
    cache.write(table)
    assert cache.read() == table
    assert not list(cache.path.parent.glob("*.tmp"))
    cache.path.write_bytes(b"garbage")
    assert cache.read() is None


@pytest.mark.skipif(
    bool(importlib.util.find_spec("tensorrt") and importlib.util.find_spec("pycuda")),
    reason="TensorRT and pycuda are installed here",
)
def test_factory_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    stream = CalibrationStream(frames(4), 2, preprocess)
    with pytest.raises(EngineError, match=r"pip install 'tdad-inspector\[gpu\]'"):
        make_entropy_calibrator(stream, tmp_path / "x.cache", "images")
