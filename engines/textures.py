"""Texture sources for anomaly synthesis: a folder of images (e.g. DTD), loaded lazily and cached square."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engines.data import list_images
from foundation.errors import DataError
from foundation.images import load_image_rgb
from foundation.log import get_logger

log = get_logger(__name__)


def square_resize(image_u8_hwc: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to size x size (INTER_AREA), keeping the texture's aspect."""
    h, w = image_u8_hwc.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    crop = image_u8_hwc[y : y + side, x : x + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


class TextureBank:
    """Every image under a folder (recursive), decoded on first use into a bounded cache of size x size RGB."""

    def __init__(self, root: Path, image_size: int, cache_size: int = 512) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.cache_size = cache_size
        self.paths = list_images(self.root)
        if not self.paths:
            raise DataError(
                f"no texture images in {self.root}: expected a folder of images (recursive), e.g. DTD's images/"
            )
        self._cache: dict[int, np.ndarray] = {}
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> np.ndarray:
        """Texture index (or the next readable one) as uint8 size x size x 3; unreadable files logged once."""
        n = len(self.paths)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            if i in self._cache:
                return self._cache[i]
            try:
                texture = square_resize(load_image_rgb(self.paths[i]), self.image_size)
            except DataError as exc:
                self._bad.add(i)
                log.warning("texture_skipped", path=str(self.paths[i]), reason=str(exc))
                continue
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            texture.setflags(write=False)
            self._cache[i] = texture
            return texture
        raise DataError(f"no readable texture images in {self.root}: all {n} files failed to decode")

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A random texture, randomly flipped and turned by a multiple of 90 degrees."""
        texture = np.rot90(self.get(int(rng.integers(len(self.paths)))), k=int(rng.integers(4)))
        if rng.random() < 0.5:
            texture = texture[:, ::-1]
        return np.ascontiguousarray(texture)
