"""`inspector calibrate`: run a SKU's engine over good (and NG) folders, fit thresholds, write calibration.json."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from calibration.evaluate import infer_dataset, map_scores
from calibration.reference import stats_of_images
from calibration.thresholds import Calibration, fit_thresholds, format_table, save_calibration
from engines.runtime import EngineSettings, create_engine
from foundation.errors import ConfigError, DataError
from inspector.commands.common import add_engine_arguments, sku_target
from tdad.manifest import maps_fingerprint, read_manifest
from tdad.training.data import FolderDataset, copies_among, file_list_hash


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector calibrate`."""
    add_engine_arguments(parser)
    parser.add_argument("--good", type=Path, required=True, help="folder of good images (recursive)")
    parser.add_argument("--ng", type=Path, action="append", default=[],
                        help="folder of NG images (recursive): reports miss rate and F1-optimal threshold; repeat it "
                             "for several, e.g. each defect folder of `inspector review export`")
    parser.add_argument(
        "--ng-masks",
        type=Path,
        help="masks of the --ng images (<stem>_mask.png or <stem>.png): the pixel threshold becomes F1-optimal",
    )
    parser.add_argument("--frr", type=float, default=0.005, help="target false-reject rate (default 0.005)")


def run(args: argparse.Namespace) -> int:
    """Run the SKU's engine over the good (and NG) folders, fit thresholds, write calibration.json."""
    target = sku_target(args)
    if args.ng_masks is not None and len(args.ng) != 1:
        raise ConfigError("--ng-masks needs --ng (the defective images the masks belong to), exactly one")
    calibration = calibrate_sku(target.engine, target.sku_dir, args.good, args.frr, batch=args.batch,
                                schedule_override=target.schedule_override, ng=args.ng, ng_masks=args.ng_masks)
    save_calibration(calibration, target.calibration_path)
    print(format_table(calibration))
    print(f"wrote {target.calibration_path}")
    return 0


def calibrate_sku(settings: EngineSettings, sku_dir: Path, good_dir: Path, frr: float, *, batch: int = 8,
                  schedule_override: dict[str, int] | None = None, ng: Sequence[Path] = (),
                  ng_masks: Path | None = None) -> Calibration:
    """The thresholds of the SKU in sku_dir, run by an engine of `settings` over the good (and NG) folders; a tiled
    SKU's images are scaled, tiled, stitched and scored as the daemon does it (engines.tiled.infer_tiled). What
    `inspector calibrate` writes, and `inspector sku update` after teaching."""
    engine = create_engine(settings, sku_dir, schedule_override=schedule_override or None)
    manifest = read_manifest(sku_dir)
    top_k, resize, tiling = manifest.score.top_k, manifest.preprocess.resize, manifest.tiling
    scale = tiling.scale if tiling else None
    good = FolderDataset(good_dir, engine.image_size, resize=resize, tile_scale=scale)
    refuse_remembered(good, manifest.trained_on, sku_dir)
    good_maps = infer_dataset(engine, good, batch, desc="good", tiling=tiling).maps
    hashes = [file_list_hash(good)]
    ng_scores = ng_maps = masks = None
    for folder in ng:
        parts = FolderDataset(folder, engine.image_size, mask_dir=ng_masks, resize=resize, tile_scale=scale)
        inference = infer_dataset(engine, parts, batch, desc="ng", tiling=tiling)
        scores = map_scores(inference.maps, top_k)
        ng_scores = scores if ng_scores is None else np.concatenate([ng_scores, scores])
        if ng_masks is not None:
            ng_maps, masks = inference.maps, inference.masks
        hashes.append(file_list_hash(parts))
    return fit_thresholds(
        map_scores(good_maps, top_k),
        good_maps,
        frr,
        ng_scores=ng_scores,
        ng_maps=ng_maps,
        ng_masks=masks,
        score_top_k=top_k,
        data_hash=hashes[0] if len(hashes) == 1 else "+".join(hashes),
        sku_fingerprint=maps_fingerprint(sku_dir, schedule_override),
        good_image_stats=stats_of_images(item.image for item in good),
    )


def refuse_remembered(good: FolderDataset, trained_on: Sequence[str], sku_dir: Path) -> None:
    """DataError when good parts for the thresholds are images the SKU was trained on or taught (by content, so
    copies count): its memory holds their patches, so they score lower than new good parts and a threshold fit
    on them rejects good parts on the line. SKUs that predate the record (trained_on empty) are not checked."""
    if not trained_on:
        return
    remembered = copies_among(good, set(trained_on))
    if remembered:
        raise DataError(f"{len(remembered)} of the {len(good.records)} good images under {good.root} (e.g. "
                        f"{remembered[0]}) are images {sku_dir} was trained on or taught: it reads them as normal, "
                        "so thresholds fit on them would reject good parts on the line; calibrate on good parts "
                        "kept apart from training")
