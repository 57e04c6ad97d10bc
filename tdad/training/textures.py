"""Texture banks for anomaly synthesis: a folder of images (e.g. DTD), or the built-in offline bank.

BuiltinTextures needs no download and no data in the repository: texture i is generated on first use from
(seed, i) at the synthesiser's image size and cached, so a bank is the same in every process and run. Kinds,
in turn by index: multi-octave Perlin noise through a random colour ramp, stripes/checks/grids at a random
angle and period, Voronoi cells (filled, outlined or shaded), scratches and fibres, speckle and blobs
(scikit-image's binary_blobs), blurred colour noise, and crops of the photos scikit-image ships inside its
wheel (read from the installed package, never fetched).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from scipy.spatial import cKDTree

from foundation.errors import DataError
from foundation.images import load_image_rgb
from foundation.log import get_logger
from tdad.noise import fractal_perlin
from tdad.training.data import list_images

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
        return turned(self.get(int(rng.integers(len(self.paths)))), rng)


def turned(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The texture turned by a random multiple of 90 degrees and flipped with probability 0.5 (contiguous)."""
    texture = np.rot90(texture, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    return np.ascontiguousarray(texture)


# ----------------------------------------------------------------------------- built-in textures

# photos and textures inside scikit-image's wheel (skimage/data/), read by path so nothing is ever fetched
BUNDLED_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
                  "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
                  "page.png", "retina.jpg", "rocket.jpg", "text.png")


@cache
def bundled_photos() -> tuple[np.ndarray, ...]:
    """The BUNDLED_PHOTOS present in the installed scikit-image, as read-only uint8 RGB (missing ones skipped)."""
    root = files(skimage.data)
    photos = []
    for name in BUNDLED_PHOTOS:
        path = Path(str(root / name))
        if path.is_file():
            photo = load_image_rgb(path)
            photo.setflags(write=False)
            photos.append(photo)
    return tuple(photos)


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random RGB colours as float32 n x 3 in [0, 255]."""
    return rng.uniform(0.0, 255.0, (n, 3)).astype(np.float32)


def _ramp(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A field mapped to [0, 1] by its range, then through a random 2-4 colour ramp, as uint8 HxWx3."""
    lo, hi = float(field.min()), float(field.max())
    t = (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)
    n = int(rng.integers(2, 5))
    stops = np.concatenate([[0.0], np.sort(rng.uniform(0.0, 1.0, n - 2)), [1.0]])
    colours = _colours(rng, n)
    return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def perlin_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-octave Perlin noise (1-4 octaves, random lattice per axis) through a random colour ramp."""
    return _ramp(fractal_perlin(size, rng, 0, 5, 4), rng)


def pattern_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes, checks or a grid at a random angle and period (3-40 periods across), softened, two colours."""
    angle = rng.uniform(0.0, np.pi)
    period = size / rng.uniform(3.0, 40.0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (x * np.cos(angle) + y * np.sin(angle)) / period
    v = (-x * np.sin(angle) + y * np.cos(angle)) / (period * rng.uniform(0.5, 2.0))
    kind = int(rng.integers(3))
    if kind == 0:
        duty = rng.uniform(0.2, 0.8)
        field = (u % 1.0 < duty).astype(np.float32)
    elif kind == 1:
        field = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:
        width = rng.uniform(0.05, 0.3)
        field = ((u % 1.0 < width) | (v % 1.0 < width)).astype(np.float32)
    sigma = float(rng.uniform(0.0, 0.15) * period)
    if sigma > 0.3:
        field = cv2.GaussianBlur(field, (0, 0), sigma)
    a, b = _colours(rng, 2)
    return (a + field[..., None] * (b - a)).astype(np.uint8)


def cell_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells of 8-200 random sites: flat random colours, dark outlines, or distance shading."""
    sites = rng.uniform(0.0, size, (int(rng.integers(8, 201)), 2))
    y, x = np.mgrid[0:size, 0:size]
    dist, nearest = cKDTree(sites).query(np.stack([y.ravel(), x.ravel()], axis=1), k=2)
    nearest, gap = nearest[:, 0].reshape(size, size), (dist[:, 1] - dist[:, 0]).reshape(size, size)
    kind = int(rng.integers(3))
    if kind == 0:
        base, spread = _colours(rng, 1), rng.uniform(10.0, 120.0)
        palette = np.clip(base + rng.uniform(-spread, spread, (len(sites), 3)), 0, 255).astype(np.float32)
        out = palette[nearest]
    elif kind == 1:
        out = _colours(rng, len(sites))[nearest]
        out[gap < rng.uniform(0.8, 3.0)] = _colours(rng, 1)
    else:
        return _ramp(dist[:, 0].reshape(size, size).astype(np.float32), rng)
    return out.astype(np.uint8)


def stroke_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Scratches (straight lines) or fibres (short curved random walks), 5-300 strokes of 1-3 px on a flat colour."""
    canvas = np.ascontiguousarray(np.broadcast_to(_colours(rng, 1).astype(np.uint8), (size, size, 3)))
    palette = _colours(rng, int(rng.integers(1, 4)))
    fibres = rng.random() < 0.5
    for _ in range(int(rng.integers(5, 301))):
        colour = tuple(float(c) for c in palette[int(rng.integers(len(palette)))])
        thickness = int(rng.integers(1, 4))
        start = rng.uniform(0.0, size, 2)
        if fibres:
            steps = int(rng.integers(4, 16))
            headings = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(rng.normal(0.0, 0.4, steps))
            lengths = rng.uniform(0.01, 0.04, steps)[:, None] * size
            points = start + np.cumsum(np.stack([np.cos(headings), np.sin(headings)], axis=1) * lengths, axis=0)
            cv2.polylines(canvas, [points.astype(np.int32)], False, colour, thickness, cv2.LINE_AA)
        else:
            end = start + rng.uniform(-0.7, 0.7, 2) * size
            cv2.line(canvas, tuple(int(v) for v in start), tuple(int(v) for v in end), colour, thickness, cv2.LINE_AA)
    return canvas


def speckle_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Sparse dots of 1-4 px or scikit-image's binary blobs, two colours."""
    if rng.random() < 0.5:
        field = (rng.random((size, size)) < rng.uniform(0.005, 0.1)).astype(np.float32)
        radius = int(rng.integers(0, 3))
        if radius:
            field = cv2.dilate(field, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
    else:
        field = skimage.data.binary_blobs(size, float(rng.uniform(0.02, 0.2)), 2, float(rng.uniform(0.1, 0.6)),
                                          rng=int(rng.integers(2**31))).astype(np.float32)
    a, b = _colours(rng, 2)
    return (a + field[..., None] * (b - a)).astype(np.uint8)


def noise_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-channel Gaussian noise blurred at a random sigma (0-8 px) around a random colour."""
    noise = rng.standard_normal((size, size, 3)).astype(np.float32)
    sigma = float(rng.uniform(0.0, 8.0))
    if sigma > 0.3:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    noise /= float(noise.std()) or 1.0
    return np.clip(_colours(rng, 1) + noise * np.float32(rng.uniform(10.0, 80.0)), 0, 255).astype(np.uint8)


def photo_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (10-100 % of the short side) of one of scikit-image's bundled photos."""
    photos = bundled_photos()
    if not photos:
        return noise_texture(size, rng)
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = max(8, int(rng.uniform(0.1, 1.0) * min(h, w)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return square_resize(photo[y : y + side, x : x + side], size)


BUILTIN_KINDS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "perlin": perlin_texture,
    "pattern": pattern_texture,
    "cells": cell_texture,
    "strokes": stroke_texture,
    "speckle": speckle_texture,
    "noise": noise_texture,
    "photo": photo_texture,
}


class BuiltinTextures:
    """A fixed bank of `n` offline textures; texture i is made on first use from (seed, i) and cached."""

    def __init__(self, image_size: int, n: int = 256, seed: int = 0) -> None:
        self.image_size = image_size
        self.n = n
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def kind(self, index: int) -> str:
        """The generator of texture index (kinds take turns, so every kind has a share of the bank)."""
        return tuple(BUILTIN_KINDS)[index % len(BUILTIN_KINDS)]

    def get(self, index: int) -> np.ndarray:
        """Texture index as read-only uint8 image_size x image_size x 3, the same in every process."""
        if index not in self._cache:
            texture = BUILTIN_KINDS[self.kind(index)](self.image_size, np.random.default_rng([self.seed, index]))
            texture.setflags(write=False)
            self._cache[index] = texture
        return self._cache[index]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A random texture of the bank, randomly flipped and turned by a multiple of 90 degrees."""
        return turned(self.get(int(rng.integers(self.n))), rng)
