"""The image anomaly score: mean of the top-k pixels of an anomaly map (the ONE definition), and the smoothed
maximum that `inspector eval --score-sweep` measures against it."""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_TOP_K = 100  # pixels averaged per map of SKUs trained before top-k followed the map size
TOP_K_FRACTION = DEFAULT_TOP_K / 256**2  # ~0.15 % of the map: 100 px at 256 px, 25 at 128, 6 at 64


def top_k_for(image_size: int) -> int:
    """The top-k of a new SKU's score: TOP_K_FRACTION of its S x S map (at least 1), so a score averages the
    same share of the part at every model resolution."""
    return max(1, round(TOP_K_FRACTION * image_size * image_size))


def image_scores(maps_f32_nhw: np.ndarray, top_k: int = DEFAULT_TOP_K) -> np.ndarray:
    """N x H x W anomaly maps -> float32 N scores (top_k is capped at H * W)."""
    if maps_f32_nhw.ndim != 3:
        raise ValueError(f"maps must be N x H x W, got shape {maps_f32_nhw.shape}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    flat = maps_f32_nhw.reshape(maps_f32_nhw.shape[0], -1).astype(np.float32, copy=False)
    k = min(top_k, flat.shape[1])
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k:]
    return top.mean(axis=1, dtype=np.float64).astype(np.float32)


def smoothed_max_scores(maps_f32_nhw: np.ndarray, sigma: float) -> np.ndarray:
    """N x H x W anomaly maps -> float32 N scores: the maximum of each map after a Gaussian blur of sigma pixels."""
    if maps_f32_nhw.ndim != 3:
        raise ValueError(f"maps must be N x H x W, got shape {maps_f32_nhw.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    maps = maps_f32_nhw.astype(np.float32, copy=False)
    return np.asarray([cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_REFLECT).max() for m in maps],
                      np.float32)
