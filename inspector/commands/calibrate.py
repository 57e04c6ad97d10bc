"""`inspector calibrate`: run a SKU's engine over good (and NG) folders, fit thresholds, write calibration.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from calibration.evaluate import infer_dataset, map_scores
from calibration.thresholds import fit_thresholds, format_table, save_calibration
from engines.runtime import create_engine
from foundation.errors import ConfigError
from inspector.commands.common import add_engine_arguments, sku_target
from tdad.manifest import maps_fingerprint, read_manifest
from tdad.training.data import FolderDataset, file_list_hash


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector calibrate`."""
    add_engine_arguments(parser)
    parser.add_argument("--good", type=Path, required=True, help="folder of good images (recursive)")
    parser.add_argument("--ng", type=Path, help="folder of NG images: reports miss rate and F1-optimal threshold")
    parser.add_argument(
        "--ng-masks",
        type=Path,
        help="masks of the --ng images (<stem>_mask.png or <stem>.png): the pixel threshold becomes F1-optimal",
    )
    parser.add_argument("--frr", type=float, default=0.005, help="target false-reject rate (default 0.005)")


def run(args: argparse.Namespace) -> int:
    """Run the SKU's engine over the good (and NG) folders, fit thresholds, write calibration.json; a tiled SKU's
    images are scaled, tiled, stitched and scored as the daemon does it (engines.tiled.infer_tiled)."""
    target = sku_target(args)
    engine = create_engine(target.engine, target.sku_dir, schedule_override=target.schedule_override or None)
    manifest = read_manifest(target.sku_dir)
    top_k, resize, tiling = manifest.score.top_k, manifest.preprocess.resize, manifest.tiling
    scale = tiling.scale if tiling else None
    good = FolderDataset(args.good, engine.image_size, resize=resize, tile_scale=scale)
    good_maps = infer_dataset(engine, good, args.batch, desc="good", tiling=tiling).maps
    hashes = [file_list_hash(good)]
    if args.ng_masks is not None and args.ng is None:
        raise ConfigError("--ng-masks needs --ng (the defective images the masks belong to)")
    ng_scores = ng_maps = ng_masks = None
    if args.ng is not None:
        ng = FolderDataset(args.ng, engine.image_size, mask_dir=args.ng_masks, resize=resize, tile_scale=scale)
        inference = infer_dataset(engine, ng, args.batch, desc="ng", tiling=tiling)
        ng_scores = map_scores(inference.maps, top_k)
        if args.ng_masks is not None:
            ng_maps, ng_masks = inference.maps, inference.masks
        hashes.append(file_list_hash(ng))
    calibration = fit_thresholds(
        map_scores(good_maps, top_k),
        good_maps,
        args.frr,
        ng_scores=ng_scores,
        ng_maps=ng_maps,
        ng_masks=ng_masks,
        score_top_k=top_k,
        data_hash=hashes[0] if len(hashes) == 1 else "+".join(hashes),
        sku_fingerprint=maps_fingerprint(target.sku_dir, target.schedule_override),
    )
    save_calibration(calibration, target.calibration_path)
    print(format_table(calibration))
    print(f"wrote {target.calibration_path}")
    return 0
