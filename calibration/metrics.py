"""Anomaly-detection metrics as the MVTec AD evaluation code defines them: AUROC, AUPRO, F1-max, AP.

Image-level inputs are `labels` (bool N, True = defective) and `scores` (float N); pixel-level inputs are
`masks` (bool N x H x W, True = defect pixel) and `maps` (float N x H x W), or lists of N H_i x W_i arrays for
images of different sizes (a tiled SKU's stitched maps, engines/tiling.py). Every metric depends only on
the ranking of the scores, so it is invariant to strictly increasing rescaling of them. A metric that needs
both classes raises ValueError when the data hold only one.

AUPRO follows the MVTec AD `compute_pro` definition: the ground truth is split into connected components
with 8-connectivity (scipy.ndimage.label with a 3x3 structuring element of ones, as MVTec does); at each
threshold the per-region overlap (fraction of a region's pixels scoring at or above the threshold) is
averaged over all regions of all images, the false-positive rate is taken over all defect-free pixels
(good images included), the curve runs through every distinct score from (0, 0) to (1, 1), and its
trapezoidal area up to `fpr_limit` (linearly interpolated at the limit) is divided by `fpr_limit`.
The curve comes from one descending sort of all pixel scores and cumulative sums of per-pixel increments,
so memory is O(pixels) (about 40 bytes per pixel at peak) and never pixels x thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

# 8-connectivity, the structuring element of the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Pixel-level data: an N x H x W array, or N arrays of H_i x W_i (images of different sizes).
Pixels = np.ndarray | Sequence[np.ndarray]


def _binary_pair(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten labels (bool) and finite scores of one shape; ValueError unless both classes occur."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape:
        raise ValueError(f"{what}: labels shape {labels.shape} differs from scores shape {scores.shape}")
    labels = labels.reshape(-1).astype(bool, copy=False)
    scores = scores.reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{what}: scores contain NaN or infinity")
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"{what}: needs both anomalous and normal samples, got {n_pos} anomalous of {labels.size}")
    return labels, scores


def _check_ndim(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    """Return `array` as ndarray after checking its rank (1 for image level, 3 for pixel level)."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _check_stack(masks: Pixels, maps: Pixels, what: str) -> tuple[np.ndarray, np.ndarray]:
    """N x H x W masks and maps of one shape, as arrays; ValueError otherwise."""
    masks, maps = _check_ndim(masks, 3, "masks"), _check_ndim(maps, 3, "maps")
    if masks.shape != maps.shape:
        raise ValueError(f"{what}: masks shape {masks.shape} differs from maps shape {maps.shape}")
    return masks, maps


def pixel_pairs(masks: Pixels, maps: Pixels, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, map) of each image; ValueError unless every pair is H x W of one shape (and arrays are N x H x W)."""
    if isinstance(masks, np.ndarray) or isinstance(maps, np.ndarray):
        masks, maps = _check_stack(masks, maps, what)
    if len(masks) != len(maps):
        raise ValueError(f"{what}: {len(masks)} masks for {len(maps)} maps")
    pairs = [(np.asarray(mask), np.asarray(map_hw)) for mask, map_hw in zip(masks, maps, strict=True)]
    for i, (mask, map_hw) in enumerate(pairs):
        if mask.ndim != 2 or mask.shape != map_hw.shape:
            raise ValueError(f"{what}: image {i} has a mask of shape {mask.shape} and a map of shape {map_hw.shape}")
    return pairs


def flat_pixels(masks: Pixels, maps: Pixels, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's label and score as two flat vectors (views of N x H x W arrays, copies of lists)."""
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        masks, maps = _check_stack(masks, maps, what)
        return masks.reshape(-1), maps.reshape(-1)
    pairs = pixel_pairs(masks, maps, what)
    if not pairs:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)
    return np.concatenate([m.reshape(-1) for m, _ in pairs]), np.concatenate([s.reshape(-1) for _, s in pairs])


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of per-image scores (bool N labels, float N scores)."""
    labels, scores = _binary_pair(_check_ndim(labels, 1, "labels"), _check_ndim(scores, 1, "scores"), "image_auroc")
    return float(roc_auc_score(labels, scores))


def image_auroc_per_type(labels: np.ndarray, scores: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type's images against all good ones (str N types; sorted by type name).

    ValueError when there are no good images or no defective ones (no type can be ranked)."""
    labels = _check_ndim(labels, 1, "labels").astype(bool, copy=False)
    scores, types = _check_ndim(scores, 1, "scores"), _check_ndim(types, 1, "types")
    if types.shape != labels.shape:
        raise ValueError(f"image_auroc_per_type: types shape {types.shape} differs from labels shape {labels.shape}")
    labels, scores = _binary_pair(labels, scores, "image_auroc_per_type")
    per_type = {}
    for defect_type in sorted(set(types[labels].tolist())):
        keep = ~labels | (types == defect_type)
        per_type[str(defect_type)] = image_auroc(labels[keep], scores[keep])
    return per_type


def pixel_auroc(masks: Pixels, maps: Pixels) -> float:
    """Area under the ROC curve over all test pixels (bool masks, float maps; N x H x W or per-image lists)."""
    labels, scores = _binary_pair(*flat_pixels(masks, maps, "pixel_auroc"), "pixel_auroc")
    return float(roc_auc_score(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under precision-recall, step-wise) at image level (N) or pixel level (NHW)."""
    labels, scores = _binary_pair(labels, scores, "average_precision")
    return float(average_precision_score(labels, scores))


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and a threshold reaching it with the rule `positive iff score > threshold`.

    The threshold is the midpoint between the lowest score the best cut calls positive and the next lower
    distinct score (just below it when none is lower), so it sits strictly between the two classes of the cut.
    """
    labels, scores = _binary_pair(labels, scores, "f1_max")
    precision, recall, cuts = precision_recall_curve(labels, scores)
    # The last precision/recall pair (1, 0) has no threshold and F1 = 0; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    lowest_positive = float(cuts[best])
    below = scores[scores < cuts[best]]
    if below.size:
        threshold = (lowest_positive + float(below.max())) / 2.0
    else:
        threshold = float(np.nextafter(lowest_positive, -np.inf))
    return float(f1[best]), threshold


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds, at image level (N) or pixel level (N x H x W), as MVTec reports it."""
    return f1_max_threshold(labels, scores)[0]


def pro_curve(masks: Pixels, maps: Pixels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points at every distinct score, descending threshold, from (0, 0) to (1, 1) (float64)."""
    pairs = pixel_pairs(masks, maps, "aupro")
    _, scores = flat_pixels(masks, maps, "aupro")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("aupro: maps contain NaN or infinity")

    # Region id per pixel: 0 = defect-free, 1..R = connected GT components numbered across all images.
    region = np.zeros(scores.size, dtype=np.int32)
    n_regions = start = 0
    for mask, _ in pairs:
        labelled, n = ndimage.label(mask.astype(bool, copy=False), structure=_EIGHT_CONNECTED, output=np.int32)
        region[start : start + mask.size] = np.where(labelled > 0, labelled + n_regions, 0).reshape(-1)
        n_regions, start = n_regions + n, start + mask.size
    n_ok = int(np.count_nonzero(region == 0))
    if n_regions == 0 or n_ok == 0:
        raise ValueError(
            f"aupro: needs defect regions and defect-free pixels, got {n_regions} regions, {n_ok} good pixels"
        )
    # A pixel of region r adds 1 / |r| to that region's overlap; defect-free pixels add nothing.
    weight = 1.0 / np.bincount(region, minlength=n_regions + 1).astype(np.float64)
    weight[0] = 0.0

    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    sorted_region = region[order]
    del order, region
    # Keep the last point of each run of equal scores: one curve point per distinct threshold.
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    del sorted_scores
    fp = np.cumsum(sorted_region == 0, dtype=np.int64)[ends]
    overlap = np.cumsum(weight[sorted_region])[ends]
    fprs = np.minimum(fp / n_ok, 1.0)
    pros = np.minimum(overlap / n_regions, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def area_to_limit(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) (x ascending) from x[0] to x_max, interpolating y linearly at x_max."""
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if end < len(x) and xs[-1] < x_max:
        y_at = ys[-1] + (y[end] - ys[-1]) * (x_max - xs[-1]) / (x[end] - xs[-1])
        area += 0.5 * (y_at + ys[-1]) * (x_max - xs[-1])
    return area


def aupro(masks: Pixels, maps: Pixels, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to FPR `fpr_limit`, normalised to [0, 1] (MVTec AUPRO)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps)
    return float(area_to_limit(fprs, pros, fpr_limit) / fpr_limit)
