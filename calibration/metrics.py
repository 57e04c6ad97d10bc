"""Anomaly-detection metrics as the MVTec AD evaluation code defines them: AUROC, AUPRO, F1-max, AP.

Image-level inputs are `labels` (bool N, True = defective) and `scores` (float N); pixel-level inputs are
`masks` (bool N x H x W, True = defect pixel) and `maps` (float N x H x W), or lists of N H_i x W_i arrays for
images of different sizes (a tiled SKU's stitched maps, tdad/tiling.py). Every metric depends only on
the ranking of the scores, so it is invariant to strictly increasing rescaling of them. A metric that needs
both classes raises ValueError when the data hold only one.

AUPRO follows the MVTec AD `compute_pro` definition: the ground truth is split into connected components
with 8-connectivity (scipy.ndimage.label with a 3x3 structuring element of ones, as MVTec does); at each
threshold the per-region overlap (fraction of a region's pixels scoring at or above the threshold) is
averaged over all regions of all images, the false-positive rate is taken over all defect-free pixels
(good images included), the curve runs through every distinct score from (0, 0) to (1, 1), and its
trapezoidal area up to `fpr_limit` (linearly interpolated at the limit) is divided by `fpr_limit`.
Every metric reads one descending sort of the scores (`Ranking`) and cumulative sums of per-sample increments,
so memory is O(pixels) (about 40 bytes per pixel at peak) and never pixels x thresholds; the definitions are
scikit-learn's (roc_auc_score, average_precision_score, precision_recall_curve), which the tests check against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity, the structuring element of the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Pixel-level data: an N x H x W array, or N arrays of H_i x W_i (images of different sizes).
Pixels = np.ndarray | Sequence[np.ndarray]


def _flat_pair(labels: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Flatten labels (bool) and finite scores of one shape; ValueError otherwise."""
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


@dataclass(frozen=True)
class Ranking:
    """The one descending sort every metric reads: at each distinct score (descending), how many positives (tp)
    and negatives (fp) score at or above it, and for pixels the summed overlap of the ground-truth regions (each
    defect pixel adds 1 / |its region|). A test set's pixels are sorted once for all four pixel metrics, not once
    per metric as scikit-learn's functions each would (582 maps of 256 px: 12 s instead of 49 on one core)."""

    what: str  # what was ranked, for error messages ("pixel metrics", "image_auroc", ...)
    thresholds: np.ndarray  # distinct scores, descending
    tp: np.ndarray  # int64: positives scoring >= each threshold
    fp: np.ndarray  # int64: negatives scoring >= each threshold
    overlap: np.ndarray | None = None  # float64 summed region overlap (pixel rankings only)
    n_regions: int = 0

    @property
    def positives(self) -> int:
        """Positive samples (defective images or defect pixels)."""
        return int(self.tp[-1]) if self.tp.size else 0

    @property
    def negatives(self) -> int:
        """Negative samples (good images or defect-free pixels)."""
        return int(self.fp[-1]) if self.fp.size else 0

    def need_both(self) -> None:
        """ValueError naming what was ranked unless both classes occur."""
        if self.positives == 0 or self.negatives == 0:
            raise ValueError(f"{self.what}: needs both anomalous and normal samples, got {self.positives} anomalous "
                             f"of {self.positives + self.negatives}")

    def auroc(self) -> float:
        """Area under the ROC curve: trapezoids through every distinct threshold (scikit-learn's roc_auc_score)."""
        self.need_both()
        tpr = np.concatenate(([0.0], self.tp / self.positives))
        fpr = np.concatenate(([0.0], self.fp / self.negatives))
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Step-wise area under precision-recall, sum of (recall_k - recall_k-1) * precision_k over descending
        thresholds (scikit-learn's average_precision_score)."""
        self.need_both()
        precision = self.tp / (self.tp + self.fp)
        recall = self.tp / self.positives
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def f1_max_threshold(self) -> tuple[float, float]:
        """Best F1 over all thresholds and a threshold reaching it with the rule `positive iff score > threshold`.

        The threshold is the midpoint between the lowest score the best cut calls positive and the next lower
        distinct score (just below it when none is lower), so it sits strictly between the two classes of the cut.
        Cuts below the first that reaches full recall are not candidates, and among equal F1s the lowest threshold
        wins (scikit-learn's precision_recall_curve and argmax).
        """
        self.need_both()
        last = int(np.searchsorted(self.tp, self.positives))  # the first cut reaching full recall
        tp, called = self.tp[: last + 1], self.tp[: last + 1] + self.fp[: last + 1]
        precision, recall = tp / called, tp / self.positives
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        best = last - int(np.argmax(f1[::-1]))
        lowest_positive = float(self.thresholds[best])
        if best + 1 < self.thresholds.size:
            threshold = (lowest_positive + float(self.thresholds[best + 1])) / 2.0
        else:
            threshold = float(np.nextafter(lowest_positive, -np.inf))
        return float(f1[best]), threshold

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) points at every distinct score, descending threshold, from (0, 0) to (1, 1) (float64)."""
        if self.overlap is None:
            raise ValueError(f"{self.what}: a PRO curve needs a pixel ranking (rank_pixels), not flat scores")
        if self.n_regions == 0 or self.negatives == 0:
            raise ValueError(f"aupro: needs defect regions and defect-free pixels, got {self.n_regions} regions, "
                             f"{self.negatives} good pixels")
        fprs = np.minimum(self.fp / self.negatives, 1.0)
        pros = np.minimum(self.overlap / self.n_regions, 1.0)
        return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under the per-region-overlap curve up to FPR `fpr_limit`, normalised to [0, 1] (MVTec AUPRO)."""
        check_fpr_limit(fpr_limit)
        fprs, pros = self.pro_curve()
        return float(area_to_limit(fprs, pros, fpr_limit) / fpr_limit)


def check_fpr_limit(fpr_limit: float) -> None:
    """ValueError unless the AUPRO limit is a false-positive rate in (0, 1]."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"aupro: fpr_limit must be in (0, 1], got {fpr_limit}")


def _rank(what: str, labels: np.ndarray, scores: np.ndarray, region: np.ndarray | None = None,
          n_regions: int = 0) -> Ranking:
    """Sort flat scores once, descending, and keep the cumulative counts at the last sample of each run of equal
    scores (one point per distinct threshold); each temporary is dropped once read (about 40 bytes per pixel at
    peak with regions)."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    thresholds = sorted_scores[ends]
    del sorted_scores
    tp = np.cumsum(labels[order], dtype=np.int64)[ends]
    fp = ends + 1 - tp
    overlap = None
    if region is not None:
        # A pixel of region r adds 1 / |r| to that region's overlap; defect-free pixels add nothing.
        weight = 1.0 / np.maximum(np.bincount(region, minlength=n_regions + 1), 1).astype(np.float64)
        weight[0] = 0.0
        increments = weight[region[order]]
        del order
        overlap = np.cumsum(increments, out=increments)[ends]
    return Ranking(what, thresholds, tp, fp, overlap, n_regions)


def rank_scores(labels: np.ndarray, scores: np.ndarray, what: str = "metric") -> Ranking:
    """Rank flat (or same-shaped) labels and scores; ValueError naming `what` on a shape mismatch or NaN."""
    return _rank(what, *_flat_pair(labels, scores, what))


def rank_pixels(masks: Pixels, maps: Pixels) -> Ranking:
    """Rank every pixel of a test set (bool masks, float maps; N x H x W or per-image lists) with its ground-truth
    region: 8-connected components numbered across all images, 0 = defect-free."""
    pairs = pixel_pairs(masks, maps, "pixel metrics")
    labels, scores = _flat_pair(*flat_pixels(masks, maps, "pixel metrics"), "pixel metrics")
    return _rank("pixel metrics", labels, scores, *region_ids([mask for mask, _ in pairs]))


def region_ids(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Every pixel's ground-truth region, flattened in mask order: 8-connected components numbered across all
    masks from 1, 0 = defect-free; and the number of regions."""
    region = np.zeros(sum(np.asarray(m).size for m in masks), dtype=np.int32)
    n_regions = start = 0
    for mask in masks:
        labelled, n = ndimage.label(np.asarray(mask, bool), structure=_EIGHT_CONNECTED, output=np.int32)
        region[start : start + labelled.size] = np.where(labelled > 0, labelled + n_regions, 0).reshape(-1)
        n_regions, start = n_regions + n, start + labelled.size
    return region, n_regions


@dataclass(frozen=True)
class PixelSample:
    """A fixed subset of a test set's pixels, ranked again for every candidate map (setting selection): every
    defect pixel and a seeded share of the defect-free ones. AUROC and AUPRO stay unbiased (FPR is a share of
    the defect-free pixels, each region keeps all its pixels) at a fraction of the sort."""

    index: np.ndarray  # int64 positions in the flattened maps
    labels: np.ndarray  # bool, per kept pixel
    region: np.ndarray  # int32 region id per kept pixel (0 = defect-free)
    n_regions: int


def sample_pixels(masks: Pixels, share: float, seed: int = 0) -> PixelSample:
    """Keep every defect pixel of the masks and `share` of the others (seeded), with 8-connected region ids."""
    region, n_regions = region_ids(list(masks))
    keep = (region > 0) | (np.random.default_rng(seed).random(region.size) < share)
    index = np.flatnonzero(keep)
    return PixelSample(index, region[index] > 0, region[index], n_regions)


def rank_sample(sample: PixelSample, maps: Pixels) -> Ranking:
    """Rank the sampled pixels of maps laid out as the masks given to sample_pixels."""
    flat = np.concatenate([np.asarray(m, np.float32).reshape(-1) for m in maps])
    return _rank("pixel metrics", sample.labels, flat[sample.index], sample.region, sample.n_regions)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of per-image scores (bool N labels, float N scores)."""
    labels, scores = _check_ndim(labels, 1, "labels"), _check_ndim(scores, 1, "scores")
    return rank_scores(labels, scores, "image_auroc").auroc()


def image_auroc_per_type(labels: np.ndarray, scores: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type's images against all good ones (str N types; sorted by type name).

    ValueError when there are no good images or no defective ones (no type can be ranked)."""
    labels = _check_ndim(labels, 1, "labels").astype(bool, copy=False)
    scores, types = _check_ndim(scores, 1, "scores"), _check_ndim(types, 1, "types")
    if types.shape != labels.shape:
        raise ValueError(f"image_auroc_per_type: types shape {types.shape} differs from labels shape {labels.shape}")
    rank_scores(labels, scores, "image_auroc_per_type").need_both()
    per_type = {}
    for defect_type in sorted(set(types[labels].tolist())):
        keep = ~labels | (types == defect_type)
        per_type[str(defect_type)] = image_auroc(labels[keep], scores[keep])
    return per_type


def pixel_auroc(masks: Pixels, maps: Pixels) -> float:
    """Area under the ROC curve over all test pixels (bool masks, float maps; N x H x W or per-image lists)."""
    return rank_scores(*flat_pixels(masks, maps, "pixel_auroc"), "pixel_auroc").auroc()


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under precision-recall, step-wise) at image level (N) or pixel level (NHW)."""
    return rank_scores(labels, scores, "average_precision").average_precision()


def f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and its threshold (Ranking.f1_max_threshold), for flat or NHW labels/scores."""
    return rank_scores(labels, scores, "f1_max").f1_max_threshold()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds, at image level (N) or pixel level (N x H x W), as MVTec reports it."""
    return f1_max_threshold(labels, scores)[0]


def pro_curve(masks: Pixels, maps: Pixels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points at every distinct score, descending threshold, from (0, 0) to (1, 1) (float64)."""
    return rank_pixels(masks, maps).pro_curve()


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
    check_fpr_limit(fpr_limit)  # before the sort: a bad limit is the caller's error, not the data's
    return rank_pixels(masks, maps).aupro(fpr_limit)
