"""Exported SKUs for engine tests: one randomly initialised, exported SKU per pytest process, shared read-only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engines.runtime.benchmark import make_random_sku

IMAGE_SIZE = 64  # smallest size the architecture takes (multiple of 32): export and inference stay fast
_CACHE: dict[int, Path] = {}


def exported_random_sku(tmp_path_factory: pytest.TempPathFactory, image_size: int = IMAGE_SIZE) -> Path:
    """A random-init SKU (weights, meta.json, every .onnx), exported once per session; do not modify it."""
    if image_size not in _CACHE:
        _CACHE[image_size] = make_random_sku(tmp_path_factory.mktemp(f"random_sku_{image_size}"), image_size)
    return _CACHE[image_size]


def copy_sku(sku_dir: Path, dest: Path) -> Path:
    """A private copy of a SKU directory, for tests that delete or rewrite files."""
    return Path(shutil.copytree(sku_dir, dest))


def random_frames(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """n random uint8 RGB frames (N x size x size x 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
