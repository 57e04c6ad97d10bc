"""`inspector eval`: evaluate a SKU on a labelled test split per schedule, or per part of the model (--ablation);
table, per-defect-type table, JSON/Markdown report, montages."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from calibration.evaluate import (
    METRIC_COLUMNS,
    evaluate,
    format_defect_table,
    format_sweep_table,
    format_table,
    held_out_line,
    sku_split,
)
from calibration.thresholds import load_calibration
from engines.runtime import Engine, EngineSettings, create_engine, engine_class
from foundation.errors import ConfigError, DataError
from foundation.log import get_logger
from inspector.commands.common import SkuTarget, add_engine_arguments, sku_target
from tdad.manifest import RECONSTRUCTIONS, SkuManifest, read_manifest
from tdad.training.data import file_list_hash

log = get_logger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row of the report: what it is (its leading table cells), how to get its engine, its montage file."""

    labels: dict[str, str]
    engine: Callable[[], Engine]
    montage: str


def parse_steps(text: str) -> list[tuple[int, int]]:
    """'1+1,2+2,5+5' -> [(1, 1), (2, 2), (5, 5)]; ConfigError naming --steps on anything else."""
    pairs = []
    for part in text.split(","):
        try:
            first, second = (int(v) for v in part.strip().split("+"))
        except ValueError:
            raise ConfigError(f"--steps {text!r}: expected steps1+steps2 pairs like 1+1,2+2,5+5") from None
        if first < 1 or second < 1:
            raise ConfigError(f"--steps {text!r}: step counts must be >= 1")
        pairs.append((first, second))
    return pairs


def parse_timesteps(flag: str, text: str) -> list[int]:
    """'80,120,200' -> [80, 120, 200]; ConfigError naming the flag on anything else."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated timesteps like 80,120,200") from None
    if any(not 0 < v < 1000 for v in values):
        raise ConfigError(f"{flag} {text!r}: timesteps must be in 1..999")
    return values


def parse_boosts(text: str) -> list[float]:
    """'1,2,4,8' -> [1.0, 2.0, 4.0, 8.0]; ConfigError naming --memory-boost on anything else."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--memory-boost {text!r}: expected comma-separated boosts like 1,2,4,8") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"--memory-boost {text!r}: boosts must be finite and >= 0")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector eval`."""
    add_engine_arguments(parser)
    parser.add_argument("--dataset", choices=("mvtec", "visa", "folder"), required=True, help="test set layout")
    parser.add_argument("--root", type=Path, required=True, help="data set root folder")
    parser.add_argument("--category", help="MVTec AD / VisA category (e.g. bottle)")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--steps", help="schedules to compare as steps1+steps2 pairs, e.g. 1+1,2+2,5+5")
    parser.add_argument("--t1", help="stage-1 noise levels to compare, e.g. 80,120,200 (rows: every combination "
                                     "with --t2 and --steps)")
    parser.add_argument("--t2", help="stage-2 noise levels to compare, e.g. 250,350,500")
    rows.add_argument("--ablation", action="store_true",
                      help="one row per reconstruction the SKU's networks support, on the torch backend: none "
                           "(the segmenter fed the input as its own reconstruction), autoencoder (decode(encode(x)),"
                           " no diffusion; the input itself for a residual SKU), stage1 (stage 1 only), two_stage "
                           "(the product); same test set and score")
    parser.add_argument("--compare-sku", type=Path, action="append", default=[], metavar="DIR",
                        help="with --ablation: another SKU of the same size and resize mode (e.g. trained with "
                             "inspector train --no-reconstruction) whose rows join the table; repeatable")
    parser.add_argument("--memory-boost", metavar="B[,B...]",
                        help="memory boosts to compare, e.g. 1,2,4,8: rows on the torch backend (per ablation row "
                             "with --ablation) with this logit per unit of memory distance added to the learnt gain "
                             "instead of the SKU's; pick a SKU's on labelled parts, then inspector train "
                             "--memory-boost (docs/accuracy.md: 'The memory prior and its boost')")
    parser.add_argument("--require-held-out", action="store_true",
                        help="refuse (exit 2) unless the SKU's settings were chosen by inspector train and none of "
                             "the files evaluated here was trained on or fed that choice, by path or content (the "
                             "report line 'held out:' says which)")
    parser.add_argument("--score-sweep", action="store_true",
                        help="also print the image AUROC of other image-score definitions on the same maps: mean of "
                             "the top 0.05/0.15/0.5/1/5/25/100 %% of the map, its maximum, and its maximum after a "
                             "Gaussian blur of 2/4/8 model pixels")
    parser.add_argument("--out", type=Path, help="report folder (default var/eval/<sku dir name>)")


def schedule_variants(args: argparse.Namespace, target: SkuTarget) -> list[Variant]:
    """The SKU as trained, or once per combination of --t1, --t2 and --steps, on the configured backend."""
    trained = read_manifest(target.sku_dir).schedule
    variants = []
    for t1 in parse_timesteps("--t1", args.t1) if args.t1 else [None]:
        for t2 in parse_timesteps("--t2", args.t2) if args.t2 else [None]:
            for pair in parse_steps(args.steps) if args.steps else [None]:
                override = {**target.schedule_override, **{k: v for k, v in (("t1", t1), ("t2", t2)) if v}}
                if pair is not None:
                    override.update(steps1=pair[0], steps2=pair[1])
                parts = [f"t1={t1}" if t1 else "", f"t2={t2}" if t2 else "", f"{pair[0]}+{pair[1]}" if pair else ""]
                label = " ".join(p for p in parts if p)
                try:
                    trained.with_overrides(**override)
                except ValueError as exc:
                    raise ConfigError(f"--t1/--t2/--steps {label}: {exc}") from None
                engine = partial(create_engine, target.engine, target.sku_dir, schedule_override=override or None)
                variants.append(Variant({"schedule": label or "trained"}, engine,
                                        f"montage_{label.replace(' ', '_')}.png" if label else "montage.png"))
    return variants


def torch_engine(settings: EngineSettings, sku_dir: Path, override: dict[str, int], mode: str,
                 boost: float | None = None) -> Engine:
    """A loaded torch engine running the SKU's segmenter on reconstruction `mode` (at memory boost `boost`, or
    the SKU's)."""
    engine = engine_class("torch")(settings, schedule_override=override or None, reconstruction=mode,
                                   memory_boost=boost)
    engine.load(sku_dir)
    return engine


def torch_rows_only(args: argparse.Namespace, flag: str) -> None:
    """ConfigError unless the backend is torch (or unset): `flag`'s rows run the torch model."""
    if args.backend not in (None, "torch"):
        raise ConfigError(f"{flag} runs the torch model (the exported graphs hold the two-stage pipeline at the SKU's "
                          f"memory boost only); drop --backend {args.backend} or pass --backend torch")


def boost_rows(args: argparse.Namespace, sku_dirs: list[Path]) -> list[float | None]:
    """The memory boosts each torch row runs at ([None]: the SKU's own); ConfigError when --memory-boost cannot
    apply (a SKU without memory, or a schedule sweep)."""
    if not args.memory_boost:
        return [None]
    if args.steps or args.t1 or args.t2:
        raise ConfigError("--memory-boost rows run the trained schedule: drop --steps/--t1/--t2 or --memory-boost")
    torch_rows_only(args, "--memory-boost")
    for sku_dir in sku_dirs:
        if not read_manifest(sku_dir).model.memory_size:
            raise ConfigError(f"--memory-boost: {sku_dir} has no memory prior (trained with --memory 0), so no "
                              f"boost applies; drop --memory-boost or that SKU")
    return list(parse_boosts(args.memory_boost))


def boost_variants(args: argparse.Namespace, target: SkuTarget, manifest: SkuManifest) -> list[Variant]:
    """The SKU as trained, once per --memory-boost value, on the torch model."""
    settings = target.engine
    variants = []
    for boost in boost_rows(args, [target.sku_dir]):
        engine = partial(torch_engine, settings, target.sku_dir, target.schedule_override, manifest.reconstruction,
                         boost)
        variants.append(Variant({"memory_boost": f"{boost:g}"}, engine, f"montage_boost_{boost:g}.png"))
    return variants


def ablation_variants(args: argparse.Namespace, target: SkuTarget, manifest: SkuManifest) -> list[Variant]:
    """Every reconstruction mode each SKU's trained networks support (up to the one its segmenter was trained
    with), run by the torch model (the exported graphs hold the two-stage pipeline only); with --memory-boost,
    each of those rows once per boost."""
    torch_rows_only(args, "--ablation")
    settings = target.engine  # torch: run() makes it the default backend of an ablation
    sku_dirs = [target.sku_dir, *args.compare_sku]
    boosts = boost_rows(args, sku_dirs)
    names = [d.name for d in sku_dirs]
    variants = []
    for sku_dir in sku_dirs:
        other = read_manifest(sku_dir)
        if resolution(other) != resolution(manifest):
            raise ConfigError(f"--compare-sku {sku_dir}: takes {resolution(other)}, {target.sku_dir} takes "
                              f"{resolution(manifest)}; ablation rows must see the same inputs")
        name = sku_dir.name if names.count(sku_dir.name) == 1 else str(sku_dir)
        override = target.schedule_override if sku_dir == target.sku_dir else {}
        for mode in RECONSTRUCTIONS[: RECONSTRUCTIONS.index(other.reconstruction) + 1]:
            for boost in boosts:
                labels = {"sku": name, "reconstruction": mode, "trained_on": other.reconstruction}
                suffix = ""
                if boost is not None:
                    labels["memory_boost"] = f"{boost:g}"
                    suffix = f"_boost_{boost:g}"
                variants.append(Variant(labels, partial(torch_engine, settings, sku_dir, override, mode, boost),
                                        f"montage_{name.replace('/', '_')}_{mode}{suffix}.png"))
    return variants


def resolution(manifest: SkuManifest) -> str:
    """What the model sees of each image and the resolution of the pixel metrics, for the report and checks."""
    size, tiling = manifest.image_size, manifest.tiling
    if tiling is None:
        return f"the whole image as {size} x {size} px ({manifest.preprocess.resize}); pixel metrics at {size} px"
    return (f"tiles of {size} px (overlap {tiling.overlap:g}) at scale {tiling.scale:g} model px per image px; "
            f"pixel metrics on the stitched maps at that scale")


def run(args: argparse.Namespace) -> int:
    """Evaluate the SKU on the test split once per row; print the tables, write the reports and montages."""
    if args.ablation and (args.t1 or args.t2):
        raise ConfigError("--t1/--t2 sweep the product's schedule: drop them or --ablation")
    if args.compare_sku and not args.ablation:
        raise ConfigError("--compare-sku adds rows to the ablation table: pass --ablation too")
    if args.ablation or args.memory_boost:  # torch rows (checked, with their message, in torch_rows_only)
        args.backend = args.backend or "torch"
    target = sku_target(args)
    out = args.out or Path("var") / "eval" / target.sku_dir.name
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(target.sku_dir)
    top_k = manifest.score.top_k
    calibration = load_calibration(target.calibration_path) if target.calibration_path.is_file() else None
    if args.ablation:
        variants = ablation_variants(args, target, manifest)
    elif args.memory_boost:
        variants = boost_variants(args, target, manifest)
    else:
        variants = schedule_variants(args, target)
    tiling = manifest.tiling
    dataset = sku_split(manifest, args.dataset, args.root, args.category)
    held_out, overlap = held_out_line(manifest, [dataset.root / f for f in dataset.relative_files()])
    if overlap and args.require_held_out:
        raise DataError(f"{target.sku_dir}: {held_out}; evaluate on files it was not trained on and its "
                        "selection did not read")
    if manifest.selection is None and args.require_held_out:
        raise DataError(f"{target.sku_dir}: no selection record, so nothing shows its settings were not tuned on "
                        "this split; retrain with inspector train (settings chosen) or drop --require-held-out")
    rows: list[dict[str, Any]] = []
    for variant in variants:
        engine = variant.engine()
        result = evaluate(engine, dataset, batch_size=args.batch, top_k=top_k, calibration=calibration,
                          montage_path=out / variant.montage, tiling=tiling, sweep=args.score_sweep)
        rows.append({**variant.labels, "engine": engine.describe(), **result})
        log.info("eval_row_done", **variant.labels, **{k: result[k] for k in METRIC_COLUMNS})
    counts = rows[0]["defect_counts"] if rows else {}
    pixels = ("not available, the test split has no ground_truth masks (image-level labels only)"
              if rows and not rows[0]["pixel_truth"] else "")
    pixels_md = f"Pixel metrics: {pixels}.\n\n" if pixels else ""
    report = {
        "sku_dir": str(target.sku_dir),
        "backend": "torch" if args.ablation or args.memory_boost else target.engine.backend,
        "ablation": args.ablation,
        "dataset": {
            "kind": args.dataset,
            "root": str(args.root),
            "category": args.category,
            "n_images": len(dataset),
            "defect_counts": counts,
            "resize": dataset.resize,
            "data_hash": file_list_hash(dataset),
        },
        "score_top_k": top_k,
        "held_out": {"line": held_out, "test_files_in_selection": overlap},
        "resolution": resolution(manifest),
        "tiling": tiling.model_dump() if tiling else None,
        "calibration": calibration.model_dump(mode="json") if calibration else None,
        "rows": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = f"# Evaluation of {target.sku_dir.name} on {args.dataset} {args.category or ''}".rstrip()
    montages = "\n".join(f"![{' '.join(v.labels.values())}]({v.montage})" for v in variants)
    sweep_title = f"image AUROC per image-score definition (the SKU's: top-k {top_k} px)"
    sweep = (f"{sweep_title[0].upper()}{sweep_title[1:]}:\n\n{format_sweep_table(rows, markdown=True)}\n\n"
             if args.score_sweep else "")
    (out / "report.md").write_text(
        f"{title}\n\nResolution: {resolution(manifest)}.\n\nHeld out: {held_out}.\n\n"
        f"{pixels_md}"
        f"{format_table(rows, markdown=True)}\n\n"
        f"Image AUROC per defect type (each type against all good images; images per type in brackets):\n\n"
        f"{format_defect_table(rows, counts, markdown=True)}\n\n{sweep}{montages}\n"
    )
    print(f"resolution: {resolution(manifest)}")
    print(f"held out: {held_out}")
    if pixels:
        print(f"pixel metrics: {pixels}")
    print(format_table(rows))
    print("\nimage AUROC per defect type (vs all good images)")
    print(format_defect_table(rows, counts))
    if args.score_sweep:
        print(f"\n{sweep_title}")
        print(format_sweep_table(rows))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and montages")
    return 0
