"""Tiled inspection at a per-SKU scale: a frame is scaled once and cut into overlapping S x S model tiles,
whose anomaly maps are stitched back into one map of the scaled frame.

Squashing a 2448 x 2048 line frame into one 128 px input loses every defect under ~20 px; a tiled SKU
(manifest `tiling`, tdad.manifest.TilingRecord) instead sees the ROI at `scale` model px per source px:

    ROI uint8 H x W x 3  --scale_image-->  h x w x 3 (h = round(H * scale))  --TilePlan.tile-->  N x S x S x 3
    engine (chunks of at most the engine batch)  -->  N x S x S maps  --TilePlan.stitch-->  h x w map

Tiles start at evenly spaced origins from 0 to h - S (the last row and column end on the frame's edge) with
at least `overlap` x S px shared by neighbours. A scaled frame smaller than S is padded by reflection (never
black: the segmenter would report the border) and its map cut back. Where tiles overlap, the stitched map is
their weighted mean with a tent window (1 at a tile's centre, falling linearly to 1/ceil(S/2) at its edge): a
convolutional segmenter sees least context in a tile's outermost pixels, so a pixel seen by two tiles takes
most from the one that sees it nearer its centre and no seam appears; the window never reaches 0, so a pixel
covered by one tile only keeps that tile's value exactly. The map is in model px (the scaled frame), so the
SKU's top-k scores a defect of a given size the same in any frame size; a map pixel is 1 / scale frame px.

Training crops random S x S windows of images scaled the same way (`random_crop`), data sets decode and scale
each file once (tdad.training.data), and the daemon, calibration and eval all run an engine over the tiles with
engines.tiled.infer_tiled. Pure geometry: no engine, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from tdad.preprocess import resize_image

# a defect must cover this many model px to be seen: one fine-memory cell, half a memory patch (tdad.nets)
DEFECT_MODEL_PX = 4.0
DEFECT_TILE_OVERLAP = 0.25  # tiles chosen for a defect size overlap by a quarter, so one sees a border defect whole


def scale_for_defect(min_defect_px: float, sizes_hw: Sequence[tuple[int, int]], size: int) -> float | None:
    """The tile scale at which a defect of min_defect_px camera px covers DEFECT_MODEL_PX model px, or None when
    the whole image at the model size already does (the median image's tighter axis); ValueError if not > 0."""
    if not min_defect_px > 0:
        raise ValueError(f"the smallest defect must be a positive number of camera px, got {min_defect_px}")
    need = DEFECT_MODEL_PX / min_defect_px
    whole = float(np.median([min(size / h, size / w) for h, w in sizes_hw])) if sizes_hw else 0.0
    if whole >= need:
        return None
    return round(min(need, 4.0), 3)


def scaled_hw(h: int, w: int, scale: float) -> tuple[int, int]:
    """The size of an h x w source at `scale` model px per source px (at least 1 x 1)."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def scale_image(image_u8_hwc: np.ndarray, scale: float) -> np.ndarray:
    """An image at the SKU's scale, resized once (INTER_AREA when shrinking, so nothing aliases)."""
    return resize_image(image_u8_hwc, scaled_hw(*image_u8_hwc.shape[:2], scale))


def scale_mask(mask_hw: np.ndarray, scale: float) -> np.ndarray:
    """A bool ground-truth mask at the SKU's scale: any defect area in a scaled pixel marks it, so a 1 px line
    survives any down-scale (area average > 0); nearest sampling when enlarging."""
    h, w = scaled_hw(*mask_hw.shape[:2], scale)
    if (h, w) == mask_hw.shape[:2]:
        return np.asarray(mask_hw, dtype=bool)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    return cv2.resize(mask_hw.astype(np.float32), (w, h), interpolation=interp) > 0


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """The image padded at the bottom and right by reflection to at least size x size (unchanged if as large)."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    pads = ((0, max(0, size - h)), (0, max(0, size - w))) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pads, mode="symmetric")


def tile_origins(length: int, size: int, overlap: float) -> tuple[int, ...]:
    """Evenly spaced tile starts covering `length` px with `size` px tiles, the last ending on the edge and
    neighbours sharing at least round(overlap * size) px; (0,) when one tile covers it."""
    if length <= size:
        return (0,)
    stride = max(1, size - round(overlap * size))
    n = math.ceil((length - size) / stride) + 1
    return tuple(round(i * (length - size) / (n - 1)) for i in range(n))


def tent_window(size: int) -> np.ndarray:
    """The S x S stitching weight: 1 at the centre, falling linearly to 1 / ceil(S/2) at the edge (never 0)."""
    ramp = np.minimum(np.arange(1, size + 1), np.arange(size, 0, -1)).astype(np.float32)
    ramp /= ramp.max()
    return np.outer(ramp, ramp)


@dataclass(frozen=True)
class TilePlan:
    """The tiles of an h x w scaled frame (hw) at model size S: top-left corners (ys x xs) in the frame padded
    to at least S x S."""

    hw: tuple[int, int]
    size: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @staticmethod
    def fit(h: int, w: int, size: int, overlap: float = 0.0) -> TilePlan:
        """The plan for an h x w scaled frame and S x S tiles sharing at least `overlap` of a tile."""
        if h < 1 or w < 1 or size < 1:
            raise ValueError(f"cannot tile a {w}x{h} frame into {size} px tiles")
        if not 0.0 <= overlap < 0.5:
            raise ValueError(f"tile overlap {overlap} is not in [0, 0.5)")
        return TilePlan((h, w), size, tile_origins(h, size, overlap), tile_origins(w, size, overlap))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of every tile, row by row: the order of `tile` and `stitch`."""
        return [(y, x) for y in self.ys for x in self.xs]

    def tile(self, image_u8_hwc: np.ndarray) -> np.ndarray:
        """The scaled frame as N x S x S x 3 tiles (reflect-padded to S where smaller)."""
        if image_u8_hwc.shape[:2] != self.hw:
            raise ValueError(f"frame is {image_u8_hwc.shape[1]}x{image_u8_hwc.shape[0]}, "
                             f"the tile plan is for {self.hw[1]}x{self.hw[0]}")
        padded, s = pad_to(image_u8_hwc, self.size), self.size
        return np.stack([padded[y : y + s, x : x + s] for y, x in self.origins])

    def stitch(self, maps_f32_nhw: np.ndarray) -> np.ndarray:
        """N x S x S tile maps -> the h x w map of the scaled frame (tent-weighted mean where tiles overlap)."""
        s = self.size
        if maps_f32_nhw.shape != (len(self), s, s):
            raise ValueError(f"expected {len(self)} maps of {s}x{s} for this tile plan, got {maps_f32_nhw.shape}")
        h, w = max(self.hw[0], s), max(self.hw[1], s)
        total = np.zeros((h, w), dtype=np.float32)
        weight = np.zeros((h, w), dtype=np.float32)
        window = tent_window(s)
        for (y, x), tile_map in zip(self.origins, maps_f32_nhw, strict=True):
            total[y : y + s, x : x + s] += tile_map * window
            weight[y : y + s, x : x + s] += window
        return (total / weight)[: self.hw[0], : self.hw[1]]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed S x S window of an image (reflect-padded first when smaller): one training input."""
    padded = pad_to(image, size)
    y = int(rng.integers(padded.shape[0] - size + 1))
    x = int(rng.integers(padded.shape[1] - size + 1))
    return padded[y : y + size, x : x + size]
