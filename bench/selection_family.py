"""Ablation: choose a trained SKU's settings on the TRAINING synthesis instead of the second defect family.

The segmenter learnt to find its own synthesis (tdad/training/synthesis.py), so the claim is that choosing on it
favours the segmenter's evidence over the memory of good parts, and transfers worse to real defects than
choosing on the second family (tdad/training/defects.py). This copies a finished SKU (with its train_state), reruns
the selection with the training synthesizer painting the held-out images, and prints the choice; then
evaluate the copy as any SKU (`inspector export` + `inspector eval --require-held-out`).

    python bench/selection_family.py --sku-dir var/acc29/magnetic_tile --out var/acc29/magnetic_tile-trainfamily
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from calibration.selection import format_selection, select_settings
from tdad.tiling import pad_to
from tdad.training.synthesis import AnomalySynthesizer
from tdad.training.train import read_checkpoint_config


class TrainingFamily:
    """The training synthesis as a painter of any H x W image: reflect-padded to a square it accepts, painted with
    probability 1, cropped back (redrawn while the crop leaves the defect out)."""

    def __init__(self, cfg_textures: str, texture_dir: Path | None, foreground: str) -> None:
        self.args = (texture_dir, foreground)
        self.textures = cfg_textures
        self.by_size: dict[int, AnomalySynthesizer] = {}

    def __call__(self, image: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        size = max(h, w)
        if size not in self.by_size:
            self.by_size[size] = AnomalySynthesizer(size, *self.args, anomaly_prob=1.0,  # type: ignore[arg-type]
                                                    textures=self.textures)  # type: ignore[arg-type]
        square = pad_to(image, size)[:size, :size]
        while True:
            painted, mask = self.by_size[size](np.ascontiguousarray(square), rng)
            crop = mask[:h, :w] > 0
            if crop.any():
                out = image.copy()
                out[crop] = painted[:h, :w][crop]
                return out, crop


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sku-dir", type=Path, required=True, help="a finished `inspector train` run")
    parser.add_argument("--out", type=Path, required=True, help="where the copy with the ablated choice goes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.sku_dir, args.out)
    cfg = read_checkpoint_config(args.out)
    painter = TrainingFamily(cfg.textures, cfg.texture_dir, cfg.foreground)
    print(format_selection(select_settings(args.out, cfg, painter=painter, kinds=("training synthesis",))))


if __name__ == "__main__":
    main()
