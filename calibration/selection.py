"""Choosing a trained SKU's inference settings from what a line has, never from a test split.

A SKU's map is sigmoid(learnt + b * memory + f * fine) (tdad.nets.segmenter.Segmenter.map_terms); b (memory
boost) and f (fine-memory boost, 0 = drop the fine memory) differ by part. They are chosen here on evidence a
line has (the image score's top-k stays the size's default, tdad.scoring.top_k_for: choosing it on synthetic
defects larger than a line's thinnest ones dilutes those):

- the validation slice: good images held out of training (tdad.training.train.validation_indices), which measure
  false positives on unseen good parts;
- synthetic defects of a second family (tdad.training.defects: strokes, pits, stains, foreign patches, local blur,
  colour shifts) painted on those held-out images: the segmenter trained on the other family, so choosing on
  it would flatter the reconstruction evidence over the memory prior;
- optionally the operator's scrap parts (`--ng DIR`, with or without masks), weighted NG_WEIGHT times the
  synthetic defects.

A quick SKU (the memory alone) with fewer than CROSS_FIT_BELOW held-out images is cross-fitted instead: every
training image is validation, each of FOLDS folds (one per image under FOLDS images) scored against a memory of
the other folds. A trained SKU that held nothing out keeps its defaults (NoValidationSlice).

The three evidence terms are computed once per image; every (b, f) candidate is a cheap recombination, scored
by the mean of image AUROC, pixel AUROC and AUPRO@0.3. The choice, the whole table and the files read are
recorded in the manifest (`selection`), so `inspector eval` can show that no test file fed a choice. Once
chosen, the memories are refilled from every training image, the slice included (remember_all).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibration import metrics
from foundation.errors import DataError
from foundation.log import get_logger
from tdad.manifest import (
    ScoreRecord,
    SelectionCandidate,
    SelectionRecord,
    read_manifest,
    write_manifest,
)
from tdad.model import TDADModel, load_sku, save_weights
from tdad.preprocess import preprocess
from tdad.scoring import image_scores, top_k_for
from tdad.tiling import TilePlan
from tdad.training.data import FolderDataset, ImageDataset, file_digest, open_dataset
from tdad.training.defects import DEFECT_KINDS, ValidationDefects
from tdad.training.train import (
    MIN_HOLDOUT_IMAGES,
    RowDescriptors,
    TrainConfig,
    all_training_images,
    remember,
    remember_all,
    validation_indices,
)

log = get_logger(__name__)

MEMORY_BOOSTS = (0.0, 1.0, 2.0, 4.0, 8.0)
FINE_BOOSTS = (0.0, 0.5, 1.0, 2.0, 4.0)
MAX_IMAGES = 64  # held-out images painted and scored at most (the slice stays out of training whole)
MIN_DEFECTS = 48  # synthetic defects at least, however small the validation slice (variants per image)
NG_WEIGHT = 2.0  # a real scrap part counts this many synthetic defects
PIXEL_SHARE = 0.25  # defect-free pixels ranked per candidate (every defect pixel is): a quarter of the sort
TIE = 1e-3  # objectives this close are a tie: the cheaper, simpler candidate wins
# a quick SKU (the memory alone) whose validation slice holds fewer good images chooses on every training image
# instead, in FOLDS folds, each scored against a memory of the other folds: a few held-out parts judge false
# positives by chance, and a memory has no training to bias toward the images it holds
CROSS_FIT_BELOW = 16
FOLDS = 5


class NoValidationSlice(DataError):
    """A trained SKU held no good image out (too few images, or --holdout 0): its settings cannot be chosen."""


@dataclass
class ValidationSet:
    """What selection scores: per image its inference-geometry uint8 picture, bool mask (None: image label
    only), label, source ("good", a defect kind, or "ng") and owner (the training image it was made from, by
    index in the sorted training split; -1 for a scrap part)."""

    images: list[np.ndarray]
    masks: list[np.ndarray | None]
    labels: list[bool]
    sources: list[str]
    owners: list[int]
    validation_files: list[str]
    ng_files: list[str]

    def add(self, image: np.ndarray, mask: np.ndarray | None, label: bool, source: str, owner: int = -1) -> None:
        """Append one image."""
        self.images.append(image)
        self.masks.append(mask)
        self.labels.append(label)
        self.sources.append(source)
        self.owners.append(owner)


def training_split(cfg: TrainConfig, size: int) -> ImageDataset:
    """The training split of the SKU's data at its geometry (never the test split)."""
    return open_dataset(cfg.dataset, cfg.data, cfg.category, "train", size,  # type: ignore[arg-type]
                        cfg.resize, tile_scale=cfg.tile_scale)


Painter = Callable[[np.ndarray, np.random.Generator, str], tuple[np.ndarray, np.ndarray]]


def build_validation_set(cfg: TrainConfig, size: int, ng: Path | None = None, ng_masks: Path | None = None,
                         painter: Painter | None = None, kinds: Sequence[str] = DEFECT_KINDS,
                         every_image: bool = False) -> ValidationSet:
    """The held-out good images (at most MAX_IMAGES of them; every_image: all training images, for cross-fitting),
    each also with synthetic defects of the second family (kinds in turn, at least MIN_DEFECTS in all), plus the
    operator's scrap parts; DataError when nothing was held out. painter(image, rng, kind) -> (image, bool mask)
    replaces the second family (an ablation)."""
    split = training_split(cfg, size)
    held = np.arange(len(split)) if every_image else validation_indices(len(split), cfg.holdout)
    if not len(held):
        raise NoValidationSlice(f"{cfg.data}: no validation slice (holdout={cfg.holdout}, {len(split)} good images; "
                                f"at least {MIN_HOLDOUT_IMAGES} are needed)")
    if len(held) > MAX_IMAGES:  # evenly spread: enough for the choice, a bounded cost (two searches per image)
        held = held[np.linspace(0, len(held) - 1, MAX_IMAGES).round().astype(int)]
    painter = painter or ValidationDefects(foreground="none" if cfg.foreground == "none" else "otsu")
    variants = max(2, math.ceil(MIN_DEFECTS / len(held)))
    out = ValidationSet([], [], [], [], [], [], [])
    for n, index in enumerate(held.tolist()):
        item = split[index]
        out.validation_files.append(str(item.path))
        out.add(item.image, np.zeros(item.image.shape[:2], bool), False, "good", index)
        for v in range(variants):
            kind = kinds[(n * variants + v) % len(kinds)]
            image, mask = painter(item.image, np.random.default_rng([cfg.seed, 29, index, v]), kind)
            out.add(image, mask, True, kind, index)
    if ng is not None:
        scrap = FolderDataset(ng, size, mask_dir=ng_masks, resize=cfg.resize, tile_scale=cfg.tile_scale)
        for item in scrap:
            out.ng_files.append(str(item.path))
            out.add(item.image, item.mask, True, "ng")
    return out


@torch.no_grad()
def evidence_terms(model: TDADModel, images: Sequence[np.ndarray], memory_only: bool, overlap: float | None,
                   batch: int = 8) -> list[np.ndarray]:
    """Per image a float32 3 x h x w stack of Segmenter.map_terms (stitched from tiles for a tiled SKU, overlap
    not None). memory_only: the SKU's decoder is off (a quick SKU), so its reconstruction is not computed."""
    size = model.config.image_size
    plans = [TilePlan.fit(*im.shape[:2], size, overlap) if overlap is not None else None for im in images]
    tiles = np.concatenate([p.tile(im) if p else im[None] for p, im in zip(plans, images, strict=True)])
    terms = []
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(preprocess(tiles[i : i + batch]))
        rec = x if memory_only else model.reconstruct(x)
        terms.append(torch.stack(model.segmenter.map_terms(x, rec, memory_only), dim=1).numpy())
    stacked = np.concatenate(terms)
    out, start = [], 0
    for plan in plans:
        count = len(plan) if plan else 1
        chunk = stacked[start : start + count]
        start += count
        out.append(np.stack([plan.stitch(chunk[:, t]) for t in range(3)]) if plan else chunk[0])
    return out


def candidate_maps(terms: list[np.ndarray], memory_boost: float, fine_boost: float) -> list[np.ndarray]:
    """Each image's map at (memory_boost, fine_boost): sigmoid(learnt + b * memory + f * fine)."""
    return [(1.0 / (1.0 + np.exp(-(t[0] + memory_boost * t[1] + fine_boost * t[2])))).astype(np.float32)
            for t in terms]


class Judge:
    """Scores candidate maps on one subset of the validation set (the synthetic defects, or the scrap parts):
    image AUROC over its images, pixel AUROC and AUPRO over those with masks (a fixed pixel sample)."""

    def __init__(self, data: ValidationSet, keep: np.ndarray) -> None:
        self.images = np.flatnonzero(keep)
        self.labels = np.asarray(data.labels)[keep]
        self.with_mask = [i for i in self.images if data.masks[i] is not None]
        self.pixels = None
        if any(data.labels[i] for i in self.with_mask):
            self.pixels = metrics.sample_pixels([data.masks[i] for i in self.with_mask], PIXEL_SHARE)

    def __call__(self, maps: list[np.ndarray], top_k: int) -> tuple[float, float, float]:
        """(image AUROC, pixel AUROC, AUPRO); NaN where not measurable."""
        pixel_auroc = aupro = float("nan")
        if self.pixels is not None:
            ranking = metrics.rank_sample(self.pixels, [maps[i] for i in self.with_mask])
            pixel_auroc, aupro = ranking.auroc(), ranking.aupro(0.3)
        scores = np.concatenate([image_scores(maps[i][None], top_k) for i in self.images])
        return metrics.image_auroc(self.labels, scores), pixel_auroc, aupro


def _defined(value: float) -> float | None:
    """None for an unmeasured (NaN) metric, as the manifest stores it."""
    return None if math.isnan(value) else value


def _objective(values: Sequence[float]) -> float:
    """Mean of the defined values."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def score_candidates(terms: list[np.ndarray], data: ValidationSet, size: int, has_fine: bool,
                     has_memory: bool) -> list[SelectionCandidate]:
    """Every (memory boost, fine boost) candidate, at the default top-k, with its metrics on the synthetic defects
    (and scrap parts) and its objective."""
    sources = np.asarray(data.sources)
    synthetic = sources != "ng"
    scrap = (sources == "ng") | (sources == "good")
    # top-k is not chosen: a score that averages more pixels than a small defect covers dilutes it, and the
    # second family's larger defects (stains, patches) would pull k up past what thin real defects can fill
    top_k = top_k_for(size)
    judge_synthetic, judge_scrap = Judge(data, synthetic), Judge(data, scrap) if data.ng_files else None
    rows = []
    for b in MEMORY_BOOSTS if has_memory else (0.0,):
        for f in FINE_BOOSTS if has_fine else (0.0,):
            maps = candidate_maps(terms, b, f)
            found = judge_synthetic(maps, top_k)
            objective = _objective(found)
            on_scrap = (float("nan"),) * 3
            if judge_scrap is not None:
                on_scrap = judge_scrap(maps, top_k)
                objective = (objective + NG_WEIGHT * _objective(on_scrap)) / (1.0 + NG_WEIGHT)
            rows.append(SelectionCandidate(
                memory_boost=b, fine_boost=f, top_k=top_k, image_auroc=_defined(found[0]),
                pixel_auroc=_defined(found[1]), aupro=_defined(found[2]), ng_image_auroc=_defined(on_scrap[0]),
                ng_pixel_auroc=_defined(on_scrap[1]), ng_aupro=_defined(on_scrap[2]), objective=objective))
    return rows


def best(rows: Sequence[SelectionCandidate]) -> SelectionCandidate:
    """The candidate of highest objective; within TIE of it the one with no fine memory (cheaper per frame),
    then the smallest boosts."""
    top = max(r.objective for r in rows)
    close = [r for r in rows if r.objective >= top - TIE]
    return min(close, key=lambda r: (r.fine_boost > 0, r.fine_boost, r.memory_boost))


def select_settings(sku_dir: Path, cfg: TrainConfig, ng: Path | None = None, ng_masks: Path | None = None,
                    painter: Painter | None = None, kinds: Sequence[str] = DEFECT_KINDS) -> SelectionRecord:
    """Choose the SKU's memory boost and fine boost (0 drops the fine memory) on the validation slice,
    the second defect family and scrap parts; rewrite the SKU with them and the evidence; returns the record.
    The rewritten meta.json has no export record: export and calibrate again."""
    t0 = time.perf_counter()
    manifest = read_manifest(sku_dir)
    model = load_sku(sku_dir)
    config = model.config
    tiling = manifest.tiling
    memory_only = bool(manifest.train and manifest.train.config.get("quick"))
    overlap = tiling.overlap if tiling else None
    count = len(training_split(cfg, config.image_size))
    # a quick SKU of a few images (even under the 10 a slice needs) still has folds; a trained one has no slice
    folds = min(FOLDS, count) if memory_only and count > 1 and len(
        validation_indices(count, cfg.holdout)) < CROSS_FIT_BELOW else 0
    data = build_validation_set(cfg, config.image_size, ng, ng_masks, painter, kinds, every_image=bool(folds))
    remembered = 0
    if folds:  # each fold against the memory of the others, then the scrap parts against the memory of all
        terms: list[np.ndarray | None] = [None] * len(data.images)
        owners = np.asarray(data.owners)

        def score(which: np.ndarray) -> None:
            if len(which):
                for i, t in zip(which, evidence_terms(model, [data.images[i] for i in which], True, overlap),
                                strict=True):
                    terms[i] = t

        images = all_training_images(cfg)  # decoded once, and described once (unless too many) for every refill
        described = RowDescriptors.of(model, cfg, images)
        for fold in range(folds):
            remember(model, cfg, images, keep=np.flatnonzero(np.arange(count) % folds != fold), described=described)
            score(np.flatnonzero((owners >= 0) & (owners % folds == fold)))
        remember(model, cfg, images, described=described)
        remembered = len(images)
        score(np.flatnonzero(owners < 0))
        evidence = [t for t in terms if t is not None]
    else:
        evidence = evidence_terms(model, data.images, memory_only, overlap)
    rows = score_candidates(evidence, data, config.image_size, bool(config.fine_memory_size),
                            bool(config.memory_size))
    chosen = best(rows)
    seg = model.segmenter
    seg.memory_boost, seg.fine_boost = chosen.memory_boost, chosen.fine_boost
    fine_size = model.config.fine_memory_size
    if fine_size and not chosen.fine_boost:
        seg.drop_fine_memory()
        fine_size = 0
    model.config = dataclasses.replace(model.config, memory_boost=chosen.memory_boost if config.memory_size else 0.0,
                                       fine_boost=chosen.fine_boost if fine_size else 0.0,
                                       fine_memory_size=fine_size)
    if not folds:
        remembered = remember_all(model, cfg)
    sources = data.sources
    record = SelectionRecord(
        chosen=chosen, candidates=rows, validation_files=data.validation_files, ng_files=data.ng_files,
        ng_digests=sorted({file_digest(Path(f)) for f in data.ng_files}),
        good=sources.count("good"), synthetic_defects=sum(s not in ("good", "ng") for s in sources),
        ng=sources.count("ng"), ng_masks=ng_masks is not None, defect_kinds=list(kinds), remembered=remembered,
        folds=folds, seconds=round(time.perf_counter() - t0, 1))
    save_weights(model, sku_dir)
    write_manifest(sku_dir, manifest.model_copy(update={
        "model": model.config, "score": ScoreRecord(top_k=chosen.top_k), "selection": record, "export": None}))
    log.info("settings_chosen", sku_dir=str(sku_dir), memory_boost=chosen.memory_boost,
             fine_boost=chosen.fine_boost, top_k=chosen.top_k, objective=round(chosen.objective, 4),
             good=record.good, synthetic_defects=record.synthetic_defects, ng=record.ng, seconds=record.seconds)
    return record


def format_selection(record: SelectionRecord, rows: int = 8) -> str:
    """The selection's evidence as a text table: the best `rows` candidates, the chosen one marked."""
    ranked = sorted(record.candidates, key=lambda r: -r.objective)[:rows]
    if record.chosen.key() not in [r.key() for r in ranked]:
        ranked.append(record.chosen)
    ng = record.ng > 0
    head = "  memory boost  fine boost  image AUROC  pixel AUROC  AUPRO@0.3" + (
        "  NG image AUROC  NG pixel AUROC  NG AUPRO" if ng else "") + "  objective"
    good = (f"all {record.good} training images in {record.folds} folds, each against a memory of the others"
            if record.folds else f"{record.good} held-out good images")
    lines = [f"settings chosen on {good}, {record.synthetic_defects} synthetic defects "
             f"({', '.join(record.defect_kinds)})" + (f" and {record.ng} scrap parts" if ng else "")
             + "; no test image was read", head]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in ranked:
        mark = "*" if r.key() == record.chosen.key() else " "
        line = (f"{mark} {r.memory_boost:12g}  {r.fine_boost:10g}  {cell(r.image_auroc):>11}  "
                f"{cell(r.pixel_auroc):>11}  {cell(r.aupro):>9}")
        if ng:
            line += f"  {cell(r.ng_image_auroc):>14}  {cell(r.ng_pixel_auroc):>14}  {cell(r.ng_aupro):>8}"
        lines.append(line + f"  {r.objective:9.4f}")
    if record.remembered and not record.folds:
        lines.append(f"then the memory was refilled from all {record.remembered} training images, the held-out ones "
                     "included")
    return "\n".join(lines)

