"""Helpers for engine tests; the SKUs themselves are session fixtures in conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64  # smallest size the architecture takes (multiple of 32): export and inference stay fast


def copy_sku(sku_dir: Path, dest: Path) -> Path:
    """A private copy of a SKU directory, for tests that delete or rewrite files."""
    return Path(shutil.copytree(sku_dir, dest))


def random_frames(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """n random uint8 RGB frames (N x size x size x 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
