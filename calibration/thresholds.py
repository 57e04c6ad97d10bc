"""Per-SKU decision thresholds from good parts (target false-reject rate), checked on labelled NG parts.

`inspector calibrate` (inspector/commands/calibrate.py) runs the SKU's engine over a folder of good images
(and optionally one of NG images), fits a `Calibration` with `fit_thresholds` and writes it to
`<sku_dir>/calibration.json`, which the daemon's Decider loads with `load_calibration`. The Decider
rejects a part when its image score is >= image_threshold and marks a pixel defective when its map value
is > pixel_threshold; regions smaller than min_defect_area_px (8-connected, at map resolution) are not
reported.

Torch-free and engine-free: the daemon imports it for the `Calibration` model.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from calibration.metrics import Pixels, f1_max_threshold, flat_pixels
from calibration.reference import DriftReference
from foundation.errors import DataError
from foundation.files import write_text_atomic

CALIBRATION_FILE = "calibration.json"
# Without NG masks, the pixel threshold is this quantile of all good-part pixel scores.
GOOD_PIXEL_QUANTILE = 0.999
# min_defect_area_px = ceil(largest good-part component x this margin) + 1.
AREA_MARGIN = 1.2


class Calibration(BaseModel):
    """One SKU's thresholds and how they were obtained (the content of calibration.json)."""

    model_config = ConfigDict(extra="forbid")

    # finite: a NaN threshold would make every verdict NG and could not be published (inspector/verdict.py)
    image_threshold: float = Field(allow_inf_nan=False, description="a part is NG when its image score is >= this")
    pixel_threshold: float = Field(allow_inf_nan=False, description="a pixel is defective when its map value is > this")
    min_defect_area_px: int = Field(ge=1, description="smallest reported region, map pixels, 8-connected")
    target_false_reject_rate: float = Field(gt=0, lt=1)
    n_good: int = Field(ge=0)
    n_ng: int = Field(ge=0)
    data_hash: str = ""
    created: datetime
    score_top_k: int | None = Field(None, description="top-k of the image score the thresholds assume")
    sku_fingerprint: str = Field("", description="tdad.manifest.maps_fingerprint of the SKU the thresholds were "
                                                 "fit on ('' before it was recorded: not checked)")
    threshold_rank: int | None = Field(None, description="k: image_threshold is the k-th largest good score")
    expected_false_reject_rate: float | None = Field(None, description="k / (n_good + 1)")
    empirical_false_reject_rate: float | None = Field(None, description="good calibration parts rejected")
    pixel_threshold_method: str = ""
    miss_rate_at_threshold: float | None = Field(None, description="NG parts scored below image_threshold")
    f1_optimal_threshold: float | None = Field(None, description="image threshold of best F1 on good + NG")
    f1_at_optimal_threshold: float | None = None
    note: str = ""
    reference: DriftReference | None = Field(None, description="good-part score quantiles and image statistics, "
                                                               "the drift watch's baseline (None: calibrated "
                                                               "before drift watch, which is then off)")


def calibration_fix(path: Path) -> str:
    """The one-line fix for a missing or broken calibration file."""
    return f"run `inspector calibrate --sku NAME --good DIR` (or --sku-dir {path.parent}) to write it"


def load_calibration(path: Path) -> Calibration:
    """Read calibration.json; DataError naming the file and `inspector calibrate` when missing or corrupt."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no calibration file {path}: {calibration_fix(path)}") from None
    except OSError as exc:
        raise DataError(f"cannot read calibration file {path} ({exc.strerror}): {calibration_fix(path)}") from None
    try:
        return Calibration.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise DataError(f"corrupt calibration file {path} ({where}: {first['msg']}): {calibration_fix(path)}") from None


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write calibration.json atomically (foundation.files.write_text_atomic) so the daemon never reads half a file."""
    write_text_atomic(Path(path), calibration.model_dump_json(indent=2) + "\n")


def good_images_needed(target_frr: float) -> int:
    """Fewest good parts for which the order-statistic threshold can meet target_frr: ceil(1/frr) - 1."""
    return math.ceil(1.0 / target_frr - 1e-9) - 1


def order_statistic_threshold(good_scores: np.ndarray, target_frr: float) -> tuple[float, int]:
    """The k-th largest good score with k = floor(frr (n+1)), the largest k whose expected FRR k/(n+1) <= frr.

    For a new good part whose score is exchangeable with the n calibration scores (continuous, so ties have
    probability 0), its rank among the n+1 scores is uniform, so it lands among the top k, i.e. at or above
    the k-th largest calibration score, with probability exactly k/(n+1). This needs k >= 1, that is
    n >= ceil(1/frr) - 1 good parts; fewer is a DataError saying how many are needed.
    """
    if not 0.0 < target_frr < 0.5:
        raise DataError(f"target false-reject rate {target_frr} is not in (0, 0.5): pass e.g. --frr 0.005")
    scores = np.sort(np.asarray(good_scores, dtype=np.float64).reshape(-1))[::-1]
    n = scores.size
    k = math.floor(target_frr * (n + 1) + 1e-9)
    if k < 1:
        need = good_images_needed(target_frr)
        raise DataError(
            f"{n} good images cannot calibrate a false-reject rate of {target_frr}: the order-statistic bound "
            f"needs at least {need}; add good images to --good or raise --frr to at least {1 / (n + 1):.4g}"
        )
    return float(scores[k - 1]), k


def largest_component_area(maps_f32_nhw: Pixels, pixel_threshold: float) -> int:
    """Area (px) of the largest 8-connected component of map > pixel_threshold over all maps (0 if none)."""
    largest = 0
    for map_hw in maps_f32_nhw:
        above = (map_hw > pixel_threshold).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
        if count > 1:
            largest = max(largest, int(stats[1:, cv2.CC_STAT_AREA].max()))
    return largest


def fit_thresholds(
    good_scores: np.ndarray,
    good_maps: Pixels,
    target_frr: float = 0.005,
    ng_scores: np.ndarray | None = None,
    ng_maps: Pixels | None = None,
    ng_masks: Pixels | None = None,
    *,
    score_top_k: int | None = None,
    data_hash: str = "",
    sku_fingerprint: str = "",
    good_image_stats: np.ndarray | None = None,
) -> Calibration:
    """Fit a SKU's thresholds from good image scores (N) and maps (N x H x W, or a list of a tiled SKU's stitched
    maps of different sizes), optionally NG ones.

    image_threshold: the k-th largest good score (see `order_statistic_threshold`): with n good parts the
      expected false-reject rate is k/(n+1) <= target_frr, which needs n >= ceil(1/frr) - 1 (199 for 0.5 %).
    With ng_scores: the miss rate at that threshold (NG scored below it) and the F1-optimal alternative
      threshold on good + NG scores, reported but not used for decisions.
    pixel_threshold: with ng_maps and ng_masks, the F1-optimal pixel threshold over good pixels (all
      negative) and NG pixels; otherwise the 99.9 % quantile of all good pixels. Never above
      image_threshold, so a rejected part (top-k mean >= image_threshold) has pixels above it
      (barring exact ties).
    min_defect_area_px: ceil(1.2 x the largest 8-connected component that good parts still show above
      pixel_threshold) + 1, so no region seen on a good calibration part would be reported.
    reference: the good scores' p50/p90/p99 and, with good_image_stats (N x 3, calibration.reference.image_stats
      of each good image), their median brightness, contrast and focus: the drift watch's baseline.
    """
    good_scores = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if (isinstance(good_maps, np.ndarray) and good_maps.ndim != 3) or len(good_maps) != len(good_scores):
        raise ValueError(f"good_maps must be N x H x W for {len(good_scores)} scores, got "
                         f"{getattr(good_maps, 'shape', len(good_maps))}")
    _, good_pixels = flat_pixels(good_maps, good_maps, "good_maps")
    image_threshold, k = order_statistic_threshold(good_scores, target_frr)
    n = good_scores.size

    ng_fields: dict[str, float | None] = {}
    n_ng = 0
    if ng_scores is not None:
        ng_scores = np.asarray(ng_scores, dtype=np.float64).reshape(-1)
        n_ng = ng_scores.size
        if n_ng:
            labels = np.concatenate([np.zeros(n, dtype=bool), np.ones(n_ng, dtype=bool)])
            f1, f1_threshold = f1_max_threshold(labels, np.concatenate([good_scores, ng_scores]))
            ng_fields = {
                "miss_rate_at_threshold": float(np.mean(ng_scores < image_threshold)),
                "f1_optimal_threshold": f1_threshold,
                "f1_at_optimal_threshold": f1,
            }

    ng_labels, ng_pixels = flat_pixels(ng_masks, ng_maps, "ng_maps and ng_masks") if (
        ng_maps is not None and ng_masks is not None) else (np.zeros(0, dtype=bool), None)
    if ng_pixels is not None and ng_labels.any():
        pixel_labels = np.concatenate([np.zeros(good_pixels.size, dtype=bool), ng_labels.astype(bool)])
        _, pixel_threshold = f1_max_threshold(pixel_labels, np.concatenate([good_pixels, ng_pixels]))
        method = "f1_optimal_on_ng_masks"
    else:
        pixel_threshold = float(np.quantile(good_pixels, GOOD_PIXEL_QUANTILE))
        method = f"good_pixel_quantile_{GOOD_PIXEL_QUANTILE}"
    pixel_threshold = min(pixel_threshold, image_threshold)
    largest = largest_component_area(good_maps, pixel_threshold)

    return Calibration(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        min_defect_area_px=math.ceil(largest * AREA_MARGIN) + 1,
        target_false_reject_rate=target_frr,
        n_good=n,
        n_ng=n_ng,
        data_hash=data_hash,
        sku_fingerprint=sku_fingerprint,
        created=datetime.now(UTC),
        score_top_k=score_top_k,
        threshold_rank=k,
        expected_false_reject_rate=k / (n + 1),
        empirical_false_reject_rate=float(np.mean(good_scores >= image_threshold)),
        pixel_threshold_method=method,
        note=(
            f"image_threshold is the {k}-th largest of {n} good scores: expected false-reject rate "
            f"k/(n+1) = {k / (n + 1):.4g} for new good parts exchangeable with the calibration set"
        ),
        reference=DriftReference.fit(good_scores, good_image_stats),
        **ng_fields,
    )


def format_table(calibration: Calibration) -> str:
    """A short human-readable table of the fitted thresholds for the terminal."""
    rows = [
        ("image_threshold", f"{calibration.image_threshold:.6g}"),
        ("pixel_threshold", f"{calibration.pixel_threshold:.6g} ({calibration.pixel_threshold_method})"),
        ("min_defect_area_px", str(calibration.min_defect_area_px)),
        ("good / NG images", f"{calibration.n_good} / {calibration.n_ng}"),
        ("target FRR", f"{calibration.target_false_reject_rate:.4g}"),
        ("expected FRR k/(n+1)", f"{calibration.expected_false_reject_rate:.4g} (k={calibration.threshold_rank})"),
        ("FRR on good set", f"{calibration.empirical_false_reject_rate:.4g}"),
    ]
    if calibration.miss_rate_at_threshold is not None:
        rows += [
            ("miss rate at threshold", f"{calibration.miss_rate_at_threshold:.4g}"),
            (
                "F1-optimal threshold",
                f"{calibration.f1_optimal_threshold:.6g} (F1 {calibration.f1_at_optimal_threshold:.4g})",
            ),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
