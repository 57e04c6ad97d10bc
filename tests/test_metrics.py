"""Metric definitions checked on hand-made cases, a slow reference, and monotone-rescaling invariance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from calibration import metrics
from calibration.metrics import (
    area_to_limit,
    aupro,
    average_precision,
    f1_max,
    f1_max_threshold,
    flat_pixels,
    image_auroc,
    image_auroc_per_type,
    pixel_auroc,
    pro_curve,
    rank_pixels,
    rank_scores,
)


def two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """Two 2x4 images: image 0 has regions R1 (2 px, top left) and R2 (1 px, bottom right); image 1 good.

    Scores: R1 = 0.9 and 0.5, R2 = 0.8, one good pixel of image 1 = 0.7, every other pixel 0.1.
    13 defect-free pixels. Distinct thresholds, descending, give (FPR, PRO):
      0.9 -> (0, (1/2 + 0)/2 = 0.25); 0.8 -> (0, (1/2 + 1)/2 = 0.75); 0.7 -> (1/13, 0.75);
      0.5 -> (1/13, 1); 0.1 -> (1, 1).
    Area to FPR 0.3: 0.75 * 1/13 + 1 * (0.3 - 1/13) = 0.3 - 0.25/13, so AUPRO@0.3 = 1 - 0.25/(13 * 0.3).
    """
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, 0, 0:2] = True
    masks[0, 1, 3] = True
    maps = np.full((2, 2, 4), 0.1, dtype=np.float32)
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 1, 3] = 0.9, 0.5, 0.8
    maps[1, 1, 1] = 0.7
    return masks, maps


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Reference AUPRO: loop over distinct thresholds, measure each region, integrate with np.trapezoid."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    regions = [lab == k for lab in labelled for k in range(1, lab.max() + 1)]
    owners = [i for i, lab in enumerate(labelled) for _ in range(lab.max())]
    ok = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fpr = np.count_nonzero(above & ok) / np.count_nonzero(ok)
        pro = np.mean([np.count_nonzero(above[i] & r) / r.sum() for i, r in zip(owners, regions, strict=True)])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    keep = x <= fpr_limit
    first_above = int(np.argmax(x > fpr_limit))
    x_lim = np.append(x[keep], fpr_limit)
    y_at = np.interp(fpr_limit, [x[first_above - 1], x[first_above]], [y[first_above - 1], y[first_above]])
    y_lim = np.append(y[keep], y_at)
    return float(np.trapezoid(y_lim, x_lim)) / fpr_limit


def test_perfect_and_inverted_auroc() -> None:
    labels = np.array([0, 0, 1, 1, 1], dtype=bool)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert f1_max(labels, scores) == 1.0
    assert average_precision(labels, scores) == 1.0


def test_perfect_pixel_metrics() -> None:
    masks, _ = two_region_case()
    maps = masks.astype(np.float32)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, 1 - maps) == 0.0
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert aupro(masks, 1 - maps) == pytest.approx(0.0)
    assert f1_max(masks, maps) == 1.0


def test_random_scores_are_chance_level() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(20_000) < 0.3
    assert image_auroc(labels, rng.random(20_000)) == pytest.approx(0.5, abs=0.02)
    masks = np.zeros((8, 64, 64), dtype=bool)
    masks[:4, 10:30, 10:30] = True
    maps = rng.random(masks.shape).astype(np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5, abs=0.02)
    # Random maps give PRO(fpr) ~ fpr, so the normalised area to 0.3 is 0.3 / 2.
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)


def test_two_region_pro_curve_by_hand() -> None:
    masks, maps = two_region_case()
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0, 1 / 13, 1 / 13, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 0.75, 0.75, 1, 1, 1])
    assert aupro(masks, maps) == pytest.approx(1 - 0.25 / (13 * 0.3))
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 - 0.25 / 13)
    # Below the first false positive the curve sits at PRO 0.75, whatever the limit.
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.75)


def test_area_interpolates_at_the_limit() -> None:
    x, y = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    assert area_to_limit(x, y, 0.5) == pytest.approx(0.125)
    assert area_to_limit(x, y, 1.0) == pytest.approx(0.5)


def test_fpr_limit_must_be_a_rate() -> None:
    masks, maps = two_region_case()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=bad)


def test_regions_are_eight_connected() -> None:
    """A diagonal pixel pair is one region (MVTec uses 8-connectivity): covering one pixel gives PRO 1/4."""
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal pair: one region of 2 px
    masks[0, 3, 3] = True  # a separate 1 px region
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, 0, 0], maps[0, 3, 3] = 1.0, 0.5
    _, pros = pro_curve(masks, maps)
    assert pros[1] == pytest.approx(0.25)  # 4-connectivity would give 1/3


def test_matches_slow_reference_on_random_data() -> None:
    rng = np.random.default_rng(1)
    for trial in range(5):
        masks = np.zeros((4, 12, 12), dtype=bool)
        for i in range(3):
            masks[i] = rng.random((12, 12)) < 0.15
        maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2 if trial % 2 else 6).astype(np.float32)
        for limit in (0.05, 0.3, 1.0):
            assert aupro(masks, maps, limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-9)


def sklearn_f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """F1-max and its midpoint threshold from scikit-learn's precision_recall_curve (the first best, ascending)."""
    precision, recall, cuts = precision_recall_curve(labels, scores)
    denom = precision[:-1] + recall[:-1]
    f1 = np.divide(2 * precision[:-1] * recall[:-1], denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    below = scores[scores < cuts[best]]
    threshold = (cuts[best] + below.max()) / 2 if below.size else np.nextafter(cuts[best], -np.inf)
    return float(f1[best]), float(threshold)


def test_one_sort_gives_scikit_learns_numbers_ties_and_all() -> None:
    """AUROC, AP and F1-max (with its threshold) read off one Ranking equal scikit-learn's own functions, on
    scores with many ties and none; the pixel ranking's AUROC equals the flat one's."""
    rng = np.random.default_rng(3)
    for decimals in (1, 2, 8):
        labels = rng.random(4000) < 0.3
        scores = np.round(rng.random(4000) + 0.4 * labels, decimals).astype(np.float32)
        ranking = rank_scores(labels, scores)
        assert ranking.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert ranking.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert ranking.f1_max_threshold() == pytest.approx(sklearn_f1_max_threshold(labels, scores), abs=1e-7)
        masks, maps = labels.reshape(4, 25, 40), scores.reshape(4, 25, 40)
        assert rank_pixels(masks, maps).auroc() == pytest.approx(ranking.auroc(), abs=1e-12)
    with pytest.raises(ValueError, match="pixel ranking"):
        ranking.aupro()


def test_one_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="both anomalous and normal"):
        image_auroc(np.zeros(4, dtype=bool), np.arange(4.0))
    with pytest.raises(ValueError, match="both anomalous and normal"):
        pixel_auroc(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="regions"):
        aupro(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="good pixels"):
        aupro(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([True, False]), np.array([np.nan, 0.0]))


def test_f1_threshold_realises_the_f1() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(500) < 0.2
    scores = rng.random(500) + labels
    best, threshold = f1_max_threshold(labels, scores)
    predicted = scores > threshold
    tp = np.count_nonzero(predicted & labels)
    assert best == pytest.approx(2 * tp / (np.count_nonzero(predicted) + np.count_nonzero(labels)))


TRANSFORMS = [lambda x: 3 * x**3 + 1, lambda x: np.exp(x / 8), lambda x: np.log1p(x) - 7]


@settings(max_examples=40, deadline=None)
@given(
    masks=arrays(bool, (3, 6, 6)),
    ints=arrays(np.int64, (3, 6, 6), elements=st.integers(0, 40)),
    which=st.integers(0, len(TRANSFORMS) - 1),
)
def test_metrics_invariant_to_monotone_rescaling(masks: np.ndarray, ints: np.ndarray, which: int) -> None:
    assume(masks.any() and not masks.all())
    maps = ints.astype(np.float64)
    rescaled = TRANSFORMS[which](maps)
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    for metric in (pixel_auroc, aupro, f1_max, average_precision):
        assert metric(masks, rescaled) == pytest.approx(metric(masks, maps), abs=1e-12)
    if labels.any() and not labels.all():
        rescaled_scores = TRANSFORMS[which](scores)
        for metric in (image_auroc, f1_max, average_precision):
            assert metric(labels, rescaled_scores) == pytest.approx(metric(labels, scores), abs=1e-12)


def test_image_auroc_per_defect_type_ranks_each_type_against_all_good_images() -> None:
    # good scores 0.1..0.4; "crack" all above them (1.0), "stain" all below (0.0), "dent" split 2 of 4 pairs above
    types = np.array(["good", "crack", "good", "stain", "dent", "good", "crack", "good"])
    scores = np.array([0.1, 0.9, 0.2, 0.05, 0.25, 0.3, 0.8, 0.4])
    labels = types != "good"
    per_type = image_auroc_per_type(labels, scores, types)
    assert list(per_type) == ["crack", "dent", "stain"]
    assert per_type == {"crack": 1.0, "dent": 0.5, "stain": 0.0}
    assert image_auroc(labels[types != "stain"], scores[types != "stain"]) == pytest.approx(10 / 12)  # pooled
    with pytest.raises(ValueError, match="both anomalous and normal"):
        image_auroc_per_type(labels[labels], scores[labels], types[labels])


def test_pixel_metrics_take_per_image_lists_of_different_sizes() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = masks[2, 10:12, 1:3] = True
    maps = rng.random((3, 16, 16)) + masks * 0.5
    as_list = [pixel_auroc(list(masks), list(maps)), aupro(list(masks), list(maps))]
    assert as_list == [pixel_auroc(masks, maps), aupro(masks, maps)]  # the same numbers as the stack
    sizes = [(16, 16), (7, 30), (40, 3)]  # a tiled SKU's stitched maps of frames of different sizes
    ragged_masks = [np.zeros(s, dtype=bool) for s in sizes]
    ragged_masks[1][2:4, 10:20] = True
    ragged_masks[2][30:, :] = True
    ragged_maps = [m.astype(np.float64) + rng.random(m.shape) * 0.1 for m in ragged_masks]
    assert aupro(ragged_masks, ragged_maps) == 1.0 and pixel_auroc(ragged_masks, ragged_maps) == 1.0
    labels, scores = flat_pixels(ragged_masks, ragged_maps, "test")
    assert labels.size == scores.size == sum(h * w for h, w in sizes)
    with pytest.raises(ValueError, match="image 1 has a mask of shape"):
        aupro(ragged_masks, [ragged_maps[0], ragged_maps[2], ragged_maps[1]])


def test_a_pixel_sample_ranks_as_all_pixels_do_and_a_share_of_the_normal_ones_nearly_so() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 40, 40), bool)
    masks[3:, 10:18, 5:30] = True
    masks[5, 30:33, 30:33] = True
    maps = (rng.random(masks.shape) * 0.6 + masks * rng.random(masks.shape) * 0.5).astype(np.float32)
    full = metrics.rank_pixels(masks, maps)
    whole = metrics.rank_sample(metrics.sample_pixels(masks, 1.0), list(maps))
    assert (whole.auroc(), whole.aupro(0.3)) == (full.auroc(), full.aupro(0.3))
    part = metrics.rank_sample(metrics.sample_pixels(masks, 0.25, seed=1), list(maps))
    assert part.positives == int(masks.sum()) and part.negatives < 0.3 * int((~masks).sum())
    assert abs(part.auroc() - full.auroc()) < 0.01 and abs(part.aupro(0.3) - full.aupro(0.3)) < 0.02
