"""What good parts looked like at calibration: the drift watch's baseline, recorded in calibration.json.

`fit_thresholds` (calibration/thresholds.py) records the good-part score quantiles; callers that have the good
images (`inspector calibrate`, the demo) add their image statistics from `image_stats`, which the daemon's drift
watch (inspector/drift.py) also runs on every OK part, so both sides measure the same thing the same way:

- brightness: the mean grey level (0-255), which a lamp or exposure change moves;
- contrast: the standard deviation of grey, which haze, glare or a new material batch moves;
- focus: the variance of the Laplacian, which a smudged lens or a part out of the depth of field lowers.

They are taken on the model input (the ROI after the SKU's resize, or a tiled SKU's scaled ROI) converted to
grey and shrunk to at most STATS_SIDE px on its long side, so a frame costs tens of microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

STATS_SIDE = 128  # px, long side of the grey copy the image statistics are taken on
IMAGE_STATISTICS = ("brightness", "contrast", "focus")


def image_stats(image_u8_hwc: np.ndarray, side: int = STATS_SIDE) -> tuple[float, float, float]:
    """Brightness (mean grey), contrast (std of grey) and focus (variance of the Laplacian) of an RGB image, on a
    grey copy shrunk to at most `side` px on its long side."""
    grey = cv2.cvtColor(image_u8_hwc, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    if max(h, w) > side:
        scale = side / max(h, w)
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(grey)
    _, sharpness = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return float(mean[0, 0]), float(std[0, 0]), float(sharpness[0, 0]) ** 2


def stats_of_images(images_u8_hwc: Iterable[np.ndarray]) -> np.ndarray:
    """image_stats of each image as a float64 N x 3 array (brightness, contrast, focus)."""
    return np.array([image_stats(image) for image in images_u8_hwc], dtype=np.float64).reshape(-1, 3)


class ImageReference(BaseModel):
    """Medians of the good parts' image statistics (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    side_px: int = Field(description="long side of the grey copy they were taken on (STATS_SIDE)")
    brightness: float = Field(allow_inf_nan=False, description="median mean grey, 0-255")
    contrast: float = Field(allow_inf_nan=False, description="median standard deviation of grey")
    focus: float = Field(allow_inf_nan=False, description="median variance of the Laplacian")


class DriftReference(BaseModel):
    """Good-part score quantiles (and image statistics, when the images were at hand) at calibration."""

    model_config = ConfigDict(extra="forbid")

    score_p50: float = Field(allow_inf_nan=False, description="median good-part image score")
    score_p90: float = Field(allow_inf_nan=False, description="90th percentile of good-part image scores")
    score_p99: float = Field(allow_inf_nan=False, description="99th percentile of good-part image scores")
    image: ImageReference | None = Field(None, description="image statistics; None: scores only")

    @classmethod
    def fit(cls, good_scores: np.ndarray, good_image_stats: np.ndarray | None = None) -> DriftReference:
        """From N good scores and, optionally, their N x 3 image_stats."""
        p50, p90, p99 = (float(q) for q in np.quantile(np.asarray(good_scores, dtype=np.float64), [0.5, 0.9, 0.99]))
        image = None
        if good_image_stats is not None and len(good_image_stats):
            medians = np.median(np.asarray(good_image_stats, dtype=np.float64).reshape(-1, 3), axis=0)
            image = ImageReference(side_px=STATS_SIDE, **dict(zip(IMAGE_STATISTICS, map(float, medians), strict=True)))
        return cls(score_p50=p50, score_p90=p90, score_p99=p99, image=image)
