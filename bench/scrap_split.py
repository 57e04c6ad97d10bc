"""Carve a bin of scrap parts out of an MVTec-layout test split, for the `inspector train --ng` row.

A line's scrap bin is not its test set. To measure what `--ng DIR` earns on a labelled set, N defective test images
(spread evenly over the defect types, sorted by path) become the scrap folder, without masks, and the rest of the
category is linked into a second root whose test split lacks them, so `inspector eval --require-held-out` on that
root proves that no evaluated file fed the choice. Everything is symlinks under --out; the source is only read.

    python bench/scrap_split.py --root ../shared/data --category cookies --count 10 --out var/scrap/cookies
    inspector train ... --ng var/scrap/cookies/scrap
    inspector eval ... --root var/scrap/cookies/root --require-held-out
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from tdad.training.data import IMAGE_SUFFIXES


def defective_images(category_dir: Path) -> list[Path]:
    """Every image of the test split outside test/good, sorted."""
    return sorted(p for p in (category_dir / "test").rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name != "good")


def split(root: Path, category: str, count: int, out: Path) -> tuple[Path, Path]:
    """Link `count` defective test images into out/scrap and the rest of the category into out/root/<category>;
    returns (scrap folder, new root)."""
    source = root / category
    defective = defective_images(source)
    if not 0 < count < len(defective):
        raise SystemExit(f"--count {count}: choose 1..{len(defective) - 1} of the {len(defective)} defective images")
    picked = {defective[i] for i in np.linspace(0, len(defective) - 1, count).round().astype(int)}
    picked_keys = {(p.parent.name, p.stem) for p in picked}
    scrap, new_root = out / "scrap", out / "root"
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(source)
        if path in picked:
            target = scrap / f"{path.parent.name}_{path.name}"
        elif rel.parts[0] == "ground_truth" and (rel.parts[1], path.stem.removesuffix("_mask")) in picked_keys:
            continue  # a scrap part's mask stays behind: the bin has none
        else:
            target = new_root / category / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(path.resolve(), target)
    return scrap, new_root


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    scrap, new_root = split(args.root, args.category, args.count, args.out)
    print(f"scrap parts: {scrap} ({len(list(scrap.iterdir()))}); evaluate on --root {new_root}")


if __name__ == "__main__":
    main()
