"""A SKU's engine over a labelled test split: AUROC, AUPRO, F1, AP, per-defect-type image AUROC, speed, and a
heat-map montage.

`evaluate(engine, dataset)` is the entry point for `inspector eval` (inspector/commands/evaluate.py, one
table row per schedule or per ablation variant), tests, the demo and bench scripts.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from calibration import metrics
from calibration.montage import MontageRow, write_montage
from calibration.thresholds import Calibration
from engines.runtime import Engine
from engines.runtime.base import MapSource
from engines.tiled import infer_tiled
from foundation.log import get_logger
from tdad.manifest import SkuManifest, TilingRecord
from tdad.scoring import DEFAULT_TOP_K, image_scores, smoothed_max_scores
from tdad.training.data import DatasetKind, ImageDataset, Item, file_digest, open_dataset

log = get_logger(__name__)

# leading row key -> table header (what a row is: a schedule, or a SKU's ablation variant)
ROW_COLUMNS = {
    "schedule": "schedule",
    "sku": "SKU",
    "reconstruction": "reconstruction",
    "trained_on": "segmenter trained on",
    "memory_boost": "memory boost",
}
# metric key -> table header, in report order
METRIC_COLUMNS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO@0.3",
    "image_f1_max": "image F1-max",
    "pixel_f1_max": "pixel F1-max",
    "image_ap": "image AP",
    "pixel_ap": "pixel AP",
}
# score definitions `score_sweep` compares on the same maps: top-k as a share of the map, smoothed maxima (sigma px)
SWEEP_TOP_K_FRACTIONS = (0.0005, 0.0015, 0.005, 0.01, 0.05, 0.25, 1.0)  # 1.0: the map's mean
SWEEP_SIGMAS = (2.0, 4.0, 8.0)
MONTAGE_GOOD = 2
MONTAGE_DEFECTIVE = 4


@dataclass(frozen=True)
class Inference:
    """An engine's output over a data set: float32 N x S x S maps, bool N labels, bool N x S x S masks and
    str N defect types (the MVTec test sub-folder, "good" for good items); for a tiled SKU, maps and masks are
    lists of each scaled image's h x w stitched map and mask (images may differ in size). pixel_truth is False
    when a defective item came without a mask (image-level labels only): its all-false mask is no ground truth."""

    maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    masks: np.ndarray | list[np.ndarray]
    defect_types: np.ndarray
    seconds: float
    pixel_truth: bool = True

    @property
    def images_per_s(self) -> float:
        """Throughput of the engine calls alone (decoding and resizing excluded)."""
        return len(self.maps) / self.seconds if self.seconds > 0 else float("inf")


def infer_dataset(engine: MapSource, dataset: Sequence[Item], batch_size: int = 8, desc: str = "infer",
                  tiling: TilingRecord | None = None) -> Inference:
    """Run the engine over every item in order, in batches, into preallocated arrays (tqdm on stderr); with
    `tiling` (items scaled by the SKU's scale), each item tiled and stitched as the daemon does it.

    Items without a mask (folder layout, good parts, image-level labels) get an all-false mask.
    """
    n, size = len(dataset), engine.image_size
    maps: np.ndarray | list[np.ndarray] = np.empty((n, size, size), dtype=np.float32) if tiling is None else []
    masks: np.ndarray | list[np.ndarray] = np.zeros((n, size, size), dtype=bool) if tiling is None else []
    labels = np.zeros(n, dtype=bool)
    types = np.empty(n, dtype=object)
    seconds = 0.0
    pixel_truth = True
    with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            t0 = time.perf_counter()
            if isinstance(maps, np.ndarray):
                maps[start : start + len(items)] = engine.infer(np.stack([item.image for item in items]))
            else:
                assert tiling is not None
                maps += infer_tiled(engine, [item.image for item in items], tiling, batch_size)
            seconds += time.perf_counter() - t0
            for offset, item in enumerate(items):
                labels[start + offset] = item.label != 0
                types[start + offset] = item.defect_type
                pixel_truth &= item.label == 0 or item.mask is not None
                if isinstance(masks, list):
                    masks.append(item.mask if item.mask is not None else np.zeros(item.image.shape[:2], dtype=bool))
                elif item.mask is not None:
                    masks[start + offset] = item.mask
            bar.update(len(items))
    return Inference(maps=maps, labels=labels, masks=masks, defect_types=types.astype(str), seconds=seconds,
                     pixel_truth=pixel_truth)


def map_scores(maps: np.ndarray | Sequence[np.ndarray], top_k: int) -> np.ndarray:
    """Image scores (tdad.scoring) of N x H x W maps, or of a list of maps of different sizes one by one."""
    if isinstance(maps, np.ndarray):
        return image_scores(maps, top_k=top_k)
    return np.asarray([image_scores(m[None], top_k=top_k)[0] for m in maps], dtype=np.float32)


def _defined(name: str, fn: Any, *args: Any) -> Any:
    """fn(*args), or None (logged) when the data cannot define the metric (e.g. only good images)."""
    try:
        return fn(*args)
    except ValueError as exc:
        log.warning("metric_undefined", metric=name, reason=str(exc))
        return None


def compute_metrics(inference: Inference, scores: np.ndarray, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Every metric of METRIC_COLUMNS (None where undefined; the pixel ones without pixel ground truth), the
    F1-optimal pixel threshold, each defect type's image AUROC against all good images ("per_defect_image_auroc")
    and "pixel_truth".

    `scores` are the float N image scores of the maps (tdad.scoring.image_scores).
    """
    labels = inference.labels
    metrics.check_fpr_limit(fpr_limit)
    images = _defined("image metrics", metrics.rank_scores, labels, scores, "image metrics")
    if inference.pixel_truth:
        pixels = _defined("pixel metrics", metrics.rank_pixels, inference.masks, inference.maps)  # one sort, 4 metrics
    else:
        pixels = None
        log.info("metric_undefined", metric="pixel metrics", reason="no ground-truth masks (image-level labels)")

    def read(name: str, ranking: metrics.Ranking | None, metric: Callable[[metrics.Ranking], Any]) -> Any:
        return None if ranking is None else _defined(name, metric, ranking)

    pixel_f1, pixel_f1_threshold = read("pixel_f1_max", pixels, metrics.Ranking.f1_max_threshold) or (None, None)
    image_f1, _ = read("image_f1_max", images, metrics.Ranking.f1_max_threshold) or (None, None)
    per_type = _defined("per_defect_image_auroc", metrics.image_auroc_per_type, labels, scores,
                        inference.defect_types)
    return {
        "image_auroc": read("image_auroc", images, metrics.Ranking.auroc),
        "pixel_auroc": read("pixel_auroc", pixels, metrics.Ranking.auroc),
        "aupro": read("aupro", pixels, lambda r: r.aupro(fpr_limit)),
        "image_f1_max": image_f1,
        "pixel_f1_max": pixel_f1,
        "image_ap": read("image_ap", images, metrics.Ranking.average_precision),
        "pixel_ap": read("pixel_ap", pixels, metrics.Ranking.average_precision),
        "pixel_f1_threshold": pixel_f1_threshold,
        "per_defect_image_auroc": per_type,
        "pixel_truth": inference.pixel_truth,
    }


def score_sweep(maps: np.ndarray | Sequence[np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    """Image AUROC of each sweep score definition on the same maps (a stack, or a tiled SKU's maps of different
    sizes): "top X %" (k = X % of each map, at least 1), "max" and "blur-max sN" (maximum after a Gaussian blur
    of sigma N px); None where undefined."""
    def per_map(score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate([score(m[None]) for m in maps])

    scores: dict[str, np.ndarray] = {}
    for fraction in SWEEP_TOP_K_FRACTIONS:
        scores[f"top {100 * fraction:g} %"] = per_map(lambda m, f=fraction: image_scores(m, max(1, round(f * m.size))))
    scores["max"] = per_map(lambda m: image_scores(m, top_k=1))
    for sigma in SWEEP_SIGMAS:
        scores[f"blur-max s{sigma:g}"] = per_map(lambda m, s=sigma: smoothed_max_scores(m, s))
    return {name: _defined(f"score_sweep {name}", metrics.image_auroc, labels, s) for name, s in scores.items()}


def montage_indices(labels: np.ndarray, n_good: int = MONTAGE_GOOD, n_defective: int = MONTAGE_DEFECTIVE) -> list[int]:
    """Evenly spaced sample of good then defective item indices (deterministic)."""
    chosen: list[int] = []
    for wanted, count in ((False, n_good), (True, n_defective)):
        pool = np.flatnonzero(labels == wanted)
        if pool.size and count:
            picks = np.linspace(0, pool.size - 1, min(count, pool.size)).round().astype(int)
            chosen += [int(pool[p]) for p in picks]
    return chosen


def evaluate(
    engine: Engine,
    dataset: Sequence[Item],
    *,
    batch_size: int = 8,
    top_k: int = DEFAULT_TOP_K,
    calibration: Calibration | None = None,
    montage_path: Path | None = None,
    fpr_limit: float = 0.3,
    tiling: TilingRecord | None = None,
    sweep: bool = False,
) -> dict[str, Any]:
    """Metrics, speed, (optionally) a montage PNG and the image AUROC of each score definition ("score_sweep",
    from the same maps) for one engine over one labelled data set; a tiled SKU's items (scaled by
    `tiling.scale`) are tiled and stitched, and its pixel metrics are at that resolution.

    The montage binarises maps at the calibration's pixel threshold when given, else at the F1-optimal
    pixel threshold of this data set.
    """
    inference = infer_dataset(engine, dataset, batch_size, desc=f"eval {engine.backend}", tiling=tiling)
    scores = map_scores(inference.maps, top_k)
    result = compute_metrics(inference, scores, fpr_limit)
    result.update(
        n_images=len(inference.maps),
        n_defective=int(inference.labels.sum()),
        defect_counts=dict(sorted(Counter(inference.defect_types.tolist()).items())),
        images_per_s=inference.images_per_s,
        ms_per_image=1000.0 * inference.seconds / max(len(inference.maps), 1),
    )
    if sweep:
        result["score_sweep"] = score_sweep(inference.maps, inference.labels)
    if montage_path is not None:
        threshold = calibration.pixel_threshold if calibration else result["pixel_f1_threshold"]
        if threshold is None:
            threshold = float(np.quantile(metrics.flat_pixels(inference.masks, inference.maps, "montage")[1], 0.999))
        rows = []
        for i in montage_indices(inference.labels):
            item = dataset[i]
            caption = f"{item.defect_type}  score {scores[i]:.4g}  ({Path(item.path).name})"
            rows.append(MontageRow(item.image, item.mask, inference.maps[i], caption))
        result["montage"] = str(write_montage(montage_path, rows, threshold))
        result["montage_threshold"] = threshold
    return result


def _fmt(value: Any) -> str:
    """A table cell: 4 decimals for floats, '-' for undefined."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _leading(rows: list[dict[str, Any]]) -> list[str]:
    """The ROW_COLUMNS keys the rows carry (schedule rows, or ablation rows), in ROW_COLUMNS order."""
    return [k for k in ROW_COLUMNS if all(k in row for row in rows)]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """One line per row (a schedule, or an ablation variant): what it is, every metric, images/s and ms/image
    (plain text or Markdown)."""
    leading = _leading(rows)
    headers = [*(ROW_COLUMNS[k] for k in leading), *METRIC_COLUMNS.values(), "images/s", "ms/image"]
    cells = [
        [
            *(str(row[k]) for k in leading),
            *(_fmt(row[k]) for k in METRIC_COLUMNS),
            f"{row['images_per_s']:.2f}",
            f"{row['ms_per_image']:.1f}",
        ]
        for row in rows
    ]
    return _render(headers, cells, markdown)


def format_defect_table(rows: list[dict[str, Any]], counts: dict[str, int], markdown: bool = False) -> str:
    """Image AUROC of each defect type (vs all good images) per row; header cells carry the type's count."""
    leading = _leading(rows)
    types = sorted({t for row in rows for t in (row.get("per_defect_image_auroc") or {})})
    headers = [*(ROW_COLUMNS[k] for k in leading), *(f"{t} ({counts.get(t, 0)})" for t in types)]
    cells = [[*(str(row[k]) for k in leading), *(_fmt((row.get("per_defect_image_auroc") or {}).get(t))
                                                  for t in types)] for row in rows]
    return _render(headers, cells, markdown)


def format_sweep_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """Image AUROC per score definition (columns) per row, from each row's "score_sweep"."""
    leading = _leading(rows)
    names = list(rows[0]["score_sweep"]) if rows else []
    headers = [*(ROW_COLUMNS[k] for k in leading), *names]
    cells = [[*(str(row[k]) for k in leading), *(_fmt(row["score_sweep"][n]) for n in names)] for row in rows]
    return _render(headers, cells, markdown)


def _render(headers: list[str], cells: list[list[str]], markdown: bool) -> str:
    """A table as Markdown or as right-aligned plain text."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in [headers, *cells])


def sku_split(manifest: SkuManifest, kind: DatasetKind, root: Path, category: str | None,
              split: str = "test") -> ImageDataset:
    """A labelled split at the SKU's geometry: resized as the SKU resizes, or scaled by its tile scale for a tiled
    SKU (then evaluate with tiling=manifest.tiling), as the station sees its frames."""
    tiling = manifest.tiling
    return open_dataset(kind, root, category, split, manifest.image_size, manifest.preprocess.resize,
                        tile_scale=tiling.scale if tiling else None)


def held_out_line(manifest: SkuManifest, test_files: Sequence[Path]) -> tuple[str, int]:
    """The report line that says what fed the SKU's settings and how many of the evaluated files it was trained on
    or chose them on (0: the numbers are held out), and that count. Files are matched by path and by content
    (the manifest's trained_on and the scrap parts' digests), so a copy of a training image or of a scrap part
    in the test split counts too."""
    record = manifest.selection
    used = {os.path.realpath(f) for f in [*record.validation_files, *record.ng_files]} if record else set()
    known = {*manifest.trained_on, *(record.ng_digests if record else [])}
    overlap = sum(os.path.realpath(f) in used or (bool(known) and file_digest(Path(f)) in known) for f in test_files)
    n = len(test_files)
    if record is None:
        what = ("settings: set by hand, not chosen by inspector train (no selection record); whatever they were "
                "tuned on is not recorded")
        if overlap:
            return f"{what}; WARNING: {overlap} of the {n} evaluated files were trained on", overlap
        return what + (f"; none of the {n} evaluated files was trained on" if manifest.trained_on else ""), 0
    c = record.chosen
    what = (f"settings (memory boost {c.memory_boost:g}, fine boost {c.fine_boost:g}, top-k {c.top_k}) chosen on "
            + (f"{record.good} training images cross-fitted in {record.folds} folds" if record.folds
               else f"{record.good} held-out training images") + f", {record.synthetic_defects} synthetic defects"
            + (f" and {record.ng} scrap parts" if record.ng else ""))
    if overlap:
        return f"{what}; WARNING: {overlap} of the {n} evaluated files were trained on or fed that choice", overlap
    return f"{what}; none of the {n} evaluated files was trained on or fed any choice", 0
