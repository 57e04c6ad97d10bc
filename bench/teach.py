"""What "teach a false reject" buys: a quick SKU trained on a share of the good images, then taught the rest
(`inspector sku update --add-good`, tdad/training/teach.py), against the same SKU before teaching and a retrain
on all of them. Prints one table row per SKU: memory entries, the seconds it took, image AUROC / pixel AUROC /
AUPRO@0.3 and the false-reject rate at the score threshold that misses 5 % and 10 % of the defective parts.

The test split is read for these reported numbers only; nothing is chosen from it. Quick SKUs (the memory prior
alone) keep each run within minutes on a 2-core CPU; a full SKU is taught the same way.

    python bench/teach.py --data ../shared/data --category magnetic_tile --workdir var/teach/magnetic_tile
    python bench/teach.py --data ../shared/data --category cookies --workdir var/teach/cookies --min-defect-px 12
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from calibration.evaluate import compute_metrics, infer_dataset, map_scores, sku_split
from engines.export import export_sku
from engines.runtime import create_engine, engine_settings
from tdad.manifest import read_manifest
from tdad.training.data import list_images
from tdad.training.teach import teach_sku


def link_folder(folder: Path, files: list[Path]) -> Path:
    """A fresh folder of symlinks to `files` (the data set is read-only and never copied)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in files:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def train_quick(data: Path, out: Path, extra: list[str], threads: int) -> float:
    """`inspector train --quick` on a folder, then the ONNX export; returns the seconds both took."""
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "inspector.cli", "train", "--out", str(out), "--data", str(data),
                    "--dataset", "folder", "--quick", "--threads", str(threads), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    export_sku(out)
    return time.perf_counter() - t0


def false_reject_at_miss(labels: np.ndarray, scores: np.ndarray, miss: float) -> float:
    """Share of good parts at or above the highest threshold that misses at most `miss` of the defective ones."""
    defective = np.sort(scores[labels])
    threshold = defective[int(np.floor(miss * len(defective)))]
    return float((scores[~labels] >= threshold).mean())


def measure(sku: Path, data: Path, category: str, threads: int) -> dict[str, float]:
    """The SKU's metrics on the test split (ONNX Runtime, as the station runs it)."""
    manifest = read_manifest(sku)
    engine = create_engine(engine_settings("onnxruntime", threads=threads), sku)
    inference = infer_dataset(engine, sku_split(manifest, "mvtec", data, category), 8, desc=sku.name,
                              tiling=manifest.tiling)
    scores = map_scores(inference.maps, manifest.score.top_k)
    metrics = compute_metrics(inference, scores)
    return {"memory": manifest.model.memory_size, "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"],
            "fr_miss5": false_reject_at_miss(inference.labels, scores, 0.05),
            "fr_miss10": false_reject_at_miss(inference.labels, scores, 0.10)}


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout root")
    parser.add_argument("--category", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--share", type=float, default=0.25, help="share of the good images the first SKU sees")
    parser.add_argument("--min-defect-px", type=int, help="passed to inspector train")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = ["--min-defect-px", str(args.min_defect_px)] if args.min_defect_px else []
    good = list_images(args.data / args.category / "train" / "good")
    every = round(1 / args.share)
    first = [p for i, p in enumerate(good) if i % every == 0]
    rest = [p for i, p in enumerate(good) if i % every != 0]
    w = args.workdir
    seconds = {"part": train_quick(link_folder(w / "data-part", first), w / "part", extra, args.threads),
               "all": train_quick(link_folder(w / "data-all", good), w / "all", extra, args.threads)}
    shutil.rmtree(w / "taught", ignore_errors=True)
    shutil.copytree(w / "part", w / "taught")
    t0 = time.perf_counter()
    teach_sku(w / "taught", link_folder(w / "data-rest", rest))
    export_sku(w / "taught")
    seconds["taught"] = time.perf_counter() - t0
    rows = {
        f"trained on {len(first)} good images": ("part", "train + export"),
        f"... then taught the other {len(rest)}": ("taught", "teach + export"),
        f"retrained on all {len(good)}": ("all", "train + export"),
    }
    print(f"\n{args.category}: quick SKUs, test split (ONNX Runtime, {args.threads} thread)\n")
    print("| SKU | memory entries | seconds | image AUROC | pixel AUROC | AUPRO@0.3 | FR at 5 % miss "
          "| FR at 10 % miss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, (name, what) in rows.items():
        m = measure(w / name, args.data, args.category, args.threads)
        print(f"| {label} | {m['memory']} | {seconds[name]:.0f} ({what}) | {m['image_auroc']:.3f} | "
              f"{m['pixel_auroc']:.3f} | {m['aupro']:.3f} | {m['fr_miss5']:.3f} | {m['fr_miss10']:.3f} |")


if __name__ == "__main__":
    main()
