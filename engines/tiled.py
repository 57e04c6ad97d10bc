"""Tiled inference: an engine run over the overlapping tiles of scaled frames (tdad.tiling's TilePlan), their maps
stitched back into one map per frame. The one tiled path of the daemon, calibrate and eval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engines.runtime.base import MapSource
from tdad.manifest import TilingRecord
from tdad.tiling import TilePlan


def infer_tiled(engine: MapSource, images_u8_hwc: Sequence[np.ndarray], tiling: TilingRecord,
                batch: int) -> list[np.ndarray]:
    """Stitched h x w maps of scaled frames: every frame's tiles through the engine in chunks of at most
    `batch` (what its TensorRT profiles and micro-batch allow), the one tiled path of daemon, calibrate and eval."""
    plans = [TilePlan.fit(*image.shape[:2], engine.image_size, tiling.overlap) for image in images_u8_hwc]
    tiles = np.concatenate([plan.tile(image) for plan, image in zip(plans, images_u8_hwc, strict=True)])
    maps = np.empty(tiles.shape[:3], dtype=np.float32)
    step = max(1, batch)
    for start in range(0, len(tiles), step):
        maps[start : start + step] = engine.infer(tiles[start : start + step])
    bounds = np.cumsum([0, *(len(plan) for plan in plans)])
    return [plan.stitch(maps[a:b]) for plan, a, b in zip(plans, bounds[:-1], bounds[1:], strict=True)]
