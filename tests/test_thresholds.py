"""Threshold fitting: the order-statistic bound, NG statistics, pixel threshold and area, the file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.thresholds import (
    Calibration,
    fit_thresholds,
    good_images_needed,
    load_calibration,
    order_statistic_threshold,
    save_calibration,
)
from foundation.errors import DataError


def good_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n good maps of 32x32 uniform noise in [0, 0.5) and their max-pixel scores."""
    maps = np.random.default_rng(seed).random((n, 32, 32), dtype=np.float32) * 0.5
    return maps.max(axis=(1, 2)), maps


def test_needed_good_images() -> None:
    assert good_images_needed(0.005) == 199
    assert good_images_needed(0.01) == 99
    assert good_images_needed(0.1) == 9
    assert good_images_needed(0.3) == 3  # ceil(3.33) - 1


def test_order_statistic_picks_kth_largest() -> None:
    scores = np.arange(1.0, 400.0)  # n = 399, frr 0.01 -> k = floor(0.01 * 400) = 4
    threshold, k = order_statistic_threshold(scores, 0.01)
    assert (threshold, k) == (396.0, 4)
    threshold, k = order_statistic_threshold(np.arange(199.0), 0.005)  # the minimum n: k = 1, the maximum
    assert (threshold, k) == (198.0, 1)


def test_too_few_good_images_says_how_many() -> None:
    with pytest.raises(DataError, match="needs at least 199"):
        order_statistic_threshold(np.arange(198.0), 0.005)
    with pytest.raises(DataError, match="--frr"):
        order_statistic_threshold(np.arange(10.0), 0.8)


def test_expected_false_reject_rate_holds_on_new_parts() -> None:
    """k/(n+1) is the exact expected FRR: average the FRR of fresh good parts over many calibrations."""
    rng = np.random.default_rng(3)
    frrs = []
    for _ in range(400):
        threshold, _ = order_statistic_threshold(rng.random(99), 0.02)  # k = 2, expected 2/100
        frrs.append(np.mean(rng.random(2000) >= threshold))
    assert np.mean(frrs) == pytest.approx(0.02, abs=0.003)


def test_fit_without_ng() -> None:
    scores, maps = good_set(99)
    cal = fit_thresholds(scores, maps, target_frr=0.05, score_top_k=1, data_hash="abc")
    assert cal.threshold_rank == 5 and cal.expected_false_reject_rate == pytest.approx(5 / 100)
    assert cal.image_threshold == np.sort(scores)[-5]
    assert cal.empirical_false_reject_rate == pytest.approx(5 / 99)
    assert cal.pixel_threshold == pytest.approx(np.quantile(maps, 0.999))
    assert cal.pixel_threshold_method.startswith("good_pixel_quantile")
    assert cal.miss_rate_at_threshold is None and cal.n_ng == 0
    # No good part shows a region as large as min_defect_area_px above the pixel threshold.
    assert cal.min_defect_area_px >= 2
    assert cal.data_hash == "abc" and cal.score_top_k == 1


def test_fit_with_ng_reports_miss_rate_and_f1_threshold() -> None:
    scores, maps = good_set(99)
    ng_scores = np.concatenate([np.full(15, 0.95), np.full(5, 0.1)])  # 5 NG parts score like good ones
    cal = fit_thresholds(scores, maps, 0.05, ng_scores=ng_scores)
    assert cal.n_ng == 20
    assert cal.miss_rate_at_threshold == pytest.approx(0.25)
    assert scores.max() < cal.f1_optimal_threshold < 0.95
    assert cal.f1_at_optimal_threshold == pytest.approx(2 * 15 / (15 + 20))
    assert cal.pixel_threshold_method.startswith("good_pixel_quantile")  # NG masks not given


def test_pixel_threshold_from_ng_masks() -> None:
    scores, maps = good_set(99)
    ng_maps = maps[:20].copy()
    ng_masks = np.zeros(ng_maps.shape, dtype=bool)
    ng_masks[:, 10:14, 10:14] = True
    ng_maps[ng_masks] = 0.9
    # Image scores well above the pixel values, so the cap at image_threshold does not apply.
    cal = fit_thresholds(scores + 1, maps, 0.05, ng_scores=np.full(20, 2.0), ng_maps=ng_maps, ng_masks=ng_masks)
    assert cal.pixel_threshold_method == "f1_optimal_on_ng_masks"
    assert maps.max() < cal.pixel_threshold < 0.9  # separates the painted defects from every noise pixel
    assert cal.min_defect_area_px == 1  # no good pixel is above it


def test_pixel_threshold_never_above_image_threshold() -> None:
    maps = np.zeros((9, 8, 8), dtype=np.float32)
    maps[:, 0, 0] = 1.0  # one hot pixel per map: the 99.9 % pixel quantile is 1.0
    cal = fit_thresholds(np.linspace(0.1, 0.5, 9), maps, target_frr=0.1)
    assert cal.pixel_threshold == cal.image_threshold == 0.5
    assert cal.min_defect_area_px == 3  # ceil(1 px x 1.2) + 1


def test_round_trip(tmp_path: Path) -> None:
    scores, maps = good_set(20)
    cal = fit_thresholds(scores, maps, target_frr=0.1)
    path = tmp_path / "calibration.json"
    save_calibration(cal, path)
    assert load_calibration(path) == cal
    data = json.loads(path.read_text())
    for key in (
        "image_threshold",
        "pixel_threshold",
        "min_defect_area_px",
        "target_false_reject_rate",
        "n_good",
        "n_ng",
        "data_hash",
        "created",
    ):
        assert key in data
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_and_corrupt_files_name_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    with pytest.raises(DataError, match=r"no calibration file .*calibration.json.*inspector calibrate"):
        load_calibration(path)
    for garbage in (b"{not json", b"\xff\xfe binary"):
        path.write_bytes(garbage)
        with pytest.raises(DataError, match=r"corrupt calibration file .*inspector calibrate"):
            load_calibration(path)
    path.write_text(json.dumps({"image_threshold": 1.0}))
    with pytest.raises(DataError, match=r"pixel_threshold"):
        load_calibration(path)
    valid = {"image_threshold": 1.0, "pixel_threshold": 1.0, "min_defect_area_px": 1, "target_false_reject_rate": 0.1,
             "n_good": 9, "n_ng": 0, "created": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps(valid))
    assert load_calibration(path).image_threshold == 1.0
    for key in ("image_threshold", "pixel_threshold"):
        path.write_text(json.dumps(valid | {key: float("nan")}))  # json writes NaN, which Python reads back
        with pytest.raises(DataError, match=rf"corrupt calibration file .*{key}: Input should be a finite number"):
            load_calibration(path)


def test_calibration_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        Calibration.model_validate(
            {
                "image_threshold": 1,
                "pixel_threshold": 1,
                "min_defect_area_px": 1,
                "target_false_reject_rate": 0.1,
                "n_good": 9,
                "n_ng": 0,
                "created": "2026-01-01T00:00:00Z",
                "typo": 1,
            }
        )
