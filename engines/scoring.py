"""The image anomaly score: mean of the top-k pixels of an anomaly map (the ONE definition)."""

from __future__ import annotations

import numpy as np

DEFAULT_TOP_K = 100  # pixels averaged per map; ~0.15 % of a 256 x 256 map, robust to single hot pixels


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
