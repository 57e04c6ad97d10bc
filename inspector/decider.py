"""Anomaly map -> decision with the SKU's calibrated thresholds: image score, OK/NG, regions, mask PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from inspector.verdict import Region, encode_mask_png, regions_from_mask
from tdad.scoring import image_scores

if TYPE_CHECKING:
    from calibration.thresholds import Calibration

PublishMask = Literal["ng", "all", "none"]


@dataclass(frozen=True)
class Placement:
    """Where the model input came from in the frame: ROI origin (px) and frame-px per model-px scale."""

    origin_xy: tuple[int, int] = (0, 0)
    scale_xy: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class Decision:
    """What the decider concluded for one frame; regions are in frame pixel coordinates."""

    score: float
    ok: bool
    threshold: float
    regions: list[Region] = field(default_factory=list)
    mask_png: bytes | None = None


class Decider:
    """Applies one SKU's Calibration to anomaly maps; the single place an image becomes OK or NG."""

    def __init__(self, calibration: Calibration, *, top_k: int, publish_mask: PublishMask = "ng") -> None:
        self.calibration = calibration
        self.top_k = top_k
        self.publish_mask = publish_mask

    def decide(self, map_f32_hw: np.ndarray, placement: Placement) -> Decision:
        """Score the map (top-k mean), compare with image_threshold, extract regions and encode the mask."""
        cal = self.calibration
        score = float(image_scores(map_f32_hw[None].astype(np.float32, copy=False), top_k=self.top_k)[0])
        ok = score < cal.image_threshold
        regions = regions_from_mask(
            map_f32_hw, cal.pixel_threshold, cal.min_defect_area_px, placement.scale_xy, placement.origin_xy
        )
        mask_png = None
        if self.publish_mask == "all" or (self.publish_mask == "ng" and not ok):
            mask_png = encode_mask_png(map_f32_hw > cal.pixel_threshold)
        return Decision(score=score, ok=ok, threshold=float(cal.image_threshold), regions=regions, mask_png=mask_png)
