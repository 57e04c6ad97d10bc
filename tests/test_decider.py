"""Decider: top-k score against image_threshold, regions back in frame pixels, mask publishing policy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from calibration.thresholds import Calibration
from inspector.decider import Decider, Placement
from inspector.verdict import decode_mask_png
from tdad.scoring import image_scores


def make_calibration(**fields: Any) -> Calibration:
    """A Calibration with the given thresholds and neutral bookkeeping fields."""
    base: dict[str, Any] = {"image_threshold": 0.5, "pixel_threshold": 0.5, "min_defect_area_px": 4,
                            "target_false_reject_rate": 0.01, "n_good": 200, "n_ng": 0,
                            "created": datetime.now(UTC)}
    return Calibration(**(base | fields))


def defect_map(size: int = 64, box: tuple[int, int, int, int] = (10, 20, 8, 4), value: float = 0.9) -> np.ndarray:
    """Zero map with one hot rectangle (x, y, w, h)."""
    m = np.zeros((size, size), np.float32)
    x, y, w, h = box
    m[y:y + h, x:x + w] = value
    return m


def test_score_is_the_shared_top_k_definition_and_threshold_is_inclusive_ng() -> None:
    m = defect_map()
    score = float(image_scores(m[None], top_k=16)[0])
    at = Decider(make_calibration(image_threshold=score), top_k=16).decide(m, Placement())
    assert at.score == pytest.approx(score) and not at.ok  # NG when score >= image_threshold
    above = Decider(make_calibration(image_threshold=score + 1e-3), top_k=16).decide(m, Placement())
    assert above.ok and above.threshold == pytest.approx(score + 1e-3)


def test_regions_are_scaled_and_offset_to_frame_pixels() -> None:
    decision = Decider(make_calibration(), top_k=8).decide(defect_map(), Placement((100, 50), (2.0, 3.0)))
    assert [(r.x, r.y, r.w, r.h, r.area_px) for r in decision.regions] == [(120, 110, 16, 12, 192)]


def test_regions_smaller_than_min_area_are_not_reported() -> None:
    decision = Decider(make_calibration(min_defect_area_px=33), top_k=8).decide(defect_map(), Placement())
    assert decision.regions == [] and not decision.ok


@pytest.mark.parametrize(("policy", "ok_mask", "ng_mask"), [("ng", False, True), ("all", True, True),
                                                            ("none", False, False)])
def test_mask_png_follows_publish_mask(policy: Any, ok_mask: bool, ng_mask: bool) -> None:
    decider = Decider(make_calibration(), top_k=8, publish_mask=policy)
    ok = decider.decide(np.zeros((32, 32), np.float32), Placement())
    ng = decider.decide(defect_map(32), Placement())
    assert ok.ok and not ng.ok
    assert (ok.mask_png is not None) == ok_mask and (ng.mask_png is not None) == ng_mask
    if ng.mask_png is not None:
        assert (decode_mask_png(ng.mask_png) == (defect_map(32) > 0.5)).all()
