"""Heat-map montage (PNG): one row per sample of input | ground truth | heat-map overlay | binarised mask."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from foundation.errors import DataError

COLUMNS = ("input", "ground truth", "anomaly map", "mask > threshold")
MIN_TILE_PX = 160
BAND_PX = 20
GAP_PX = 4
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class MontageRow:
    """One sample: uint8 HxWx3 RGB image, bool HxW ground truth (None = unknown), float32 HxW map, a caption."""

    image: np.ndarray
    mask: np.ndarray | None
    anomaly_map: np.ndarray
    caption: str


def heat_overlay(image_rgb_u8: np.ndarray, map_f32_hw: np.ndarray, vmax: float) -> np.ndarray:
    """The map scaled to [0, vmax], coloured with OpenCV's JET map and blended 50/50 over the image (RGB)."""
    scaled = np.clip(map_f32_hw / max(vmax, 1e-12), 0.0, 1.0)
    heat_bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_rgb_u8, 0.5, cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB), 0.5, 0.0)


def _grey(mask_hw: np.ndarray) -> np.ndarray:
    """A bool mask as a white-on-black RGB tile."""
    return np.repeat((mask_hw.astype(np.uint8) * 255)[..., None], 3, axis=2)


def _band(width: int, text: str) -> np.ndarray:
    """A white text band of BAND_PX height (RGB), for column titles and row captions."""
    band = np.full((BAND_PX, width, 3), 255, dtype=np.uint8)
    cv2.putText(band, text, (4, BAND_PX - 6), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return band


def render_montage(rows: list[MontageRow], pixel_threshold: float) -> np.ndarray:
    """The montage as uint8 RGB: column titles, then per row a caption band and the four tiles."""
    if not rows:
        raise ValueError("render_montage needs at least one row")
    size = rows[0].image.shape[0]
    tile = max(size, MIN_TILE_PX)
    vmax = max(float(max(r.anomaly_map.max() for r in rows)), pixel_threshold)
    width = len(COLUMNS) * tile + (len(COLUMNS) - 1) * GAP_PX

    def fit(rgb: np.ndarray) -> np.ndarray:
        return cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_NEAREST)

    def tiles(row: MontageRow) -> np.ndarray:
        truth = _grey(row.mask) if row.mask is not None else np.full_like(row.image, 128)
        parts = [
            row.image,
            truth,
            heat_overlay(row.image, row.anomaly_map, vmax),
            _grey(row.anomaly_map > pixel_threshold),
        ]
        gap = np.full((tile, GAP_PX, 3), 255, dtype=np.uint8)
        out = [fit(parts[0])]
        for part in parts[1:]:
            out += [gap, fit(part)]
        return np.concatenate(out, axis=1)

    header = np.concatenate(
        [
            np.concatenate([_band(tile, title), np.full((BAND_PX, GAP_PX, 3), 255, np.uint8)], axis=1)
            for title in COLUMNS
        ],
        axis=1,
    )[:, :width]
    blocks = [header]
    for row in rows:
        blocks += [_band(width, row.caption), tiles(row)]
    blocks.append(_band(width, f"map colour range 0..{vmax:.3g}; mask: map > {pixel_threshold:.4g}"))
    return np.concatenate(blocks, axis=0)


def write_montage(path: Path, rows: list[MontageRow], pixel_threshold: float) -> Path:
    """Render and write the montage PNG; DataError naming the file when it cannot be written."""
    path = Path(path)
    image = cv2.cvtColor(render_montage(rows, pixel_threshold), cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise DataError(f"cannot write montage {path}: check that the folder exists and is writable (--out)")
    return path
