"""`inspector review export`: a SKU's reviewed parts (inspector/reviews.py) as an MVTec AD test split for
`inspector calibrate` and `inspector eval`."""

from __future__ import annotations

import argparse
from pathlib import Path

from inspector.cli import config_parent
from inspector.config import load_config, resolve_sku
from inspector.reviews import REVIEWS_DIR, REVIEWS_FILE, export_mvtec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `review` group's actions and their flags."""
    actions = parser.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export", help="write a SKU's reviewed parts as an MVTec AD test split (no masks, no train split)",
        description="Write the latest review of each of a SKU's reviewed parts as <out>/<sku>/test/good/ (false "
                    "rejects, confirmed OK) and <out>/<sku>/test/<defect type or 'defect'>/ (confirmed and missed "
                    "defects), each frame cut to the SKU's ROI; then `inspector eval --dataset mvtec --root OUT "
                    "--category SKU` and `inspector calibrate --good ... --ng OUT/SKU/test/<type>` read it.",
        parents=[config_parent()])
    export.add_argument("--sku", required=True, help="SKU name from inspector.toml")
    export.add_argument("--out", type=Path, required=True, help="folder to write <sku>/test/... into (new)")


def run(args: argparse.Namespace) -> int:
    """Export the SKU's reviews from the configured archive folder and print what went where."""
    config = load_config(args.config)
    sku = resolve_sku(config, args.sku)
    counts = export_mvtec(config.archive.dir, args.sku, args.out, sku.roi)
    skipped = counts.pop("skipped", 0)
    for folder, n in sorted(counts.items()):
        print(f"{n:6d}  {args.out / args.sku / 'test' / folder}")
    if skipped:
        print(f"{skipped:6d}  reviewed parts without a frame (fail-safe verdicts) left out")
    print(f"wrote {sum(counts.values())} images from {config.archive.dir / REVIEWS_DIR / REVIEWS_FILE}")
    return 0
