"""The PatchCore-style baseline of ../shared/data/README.md, rebuilt from its description, on a set's test split.

Frozen EfficientNet-Lite0 stride-8 and stride-16 taps with a 3 x 3 local average (the project's own descriptors,
tdad.nets.segmenter.patch_features), a seeded random memory of 60k training patches, each test patch scored by its
distance to the nearest memory patch, the S/8 x S/8 map upsampled to S x S, its maximum the image score. It learns
and chooses nothing: the test split is only scored, with the metrics `inspector eval` reports (pixel metrics at
S px), so its rows sit beside a SKU's as the README's bar was meant to.

    python bench/baseline.py --root ../shared/data --category magnetic_tile --size 128 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from calibration.evaluate import Inference, compute_metrics, format_table, infer_dataset
from tdad.nets.backbone import Backbone
from tdad.nets.segmenter import nearest_distance, patch_features
from tdad.preprocess import preprocess
from tdad.training.data import ImageDataset, open_dataset

MEMORY = 60_000  # patches in the README's baseline memory
BATCH = 16


@torch.no_grad()
def describe(backbone: Backbone, dataset: ImageDataset) -> torch.Tensor:
    """N x D x S/8 x S/8 patch descriptors of every image of the data set, in order."""
    return torch.cat([patch_features(backbone(torch.from_numpy(preprocess(
        np.stack([dataset[j].image for j in range(i, min(i + BATCH, len(dataset)))])))))
        for i in range(0, len(dataset), BATCH)])


class NearestPatch:
    """The baseline as a MapSource (engines.runtime.base): each patch's distance to its nearest memory patch, the
    S/8 x S/8 map upsampled to S x S."""

    def __init__(self, backbone: Backbone, memory: torch.Tensor, image_size: int) -> None:
        self.backbone, self.memory, self.image_size = backbone, memory, image_size

    @torch.no_grad()
    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 RGB -> N x S x S float32 distance maps."""
        cells = patch_features(self.backbone(torch.from_numpy(preprocess(images_u8_nhwc))))
        distance = nearest_distance(cells, self.memory, torch.ones(()))
        return F.interpolate(distance, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False)[:, 0].numpy()


def baseline(root: Path, category: str, size: int, seed: int = 0) -> tuple[Inference, np.ndarray]:
    """The baseline's maps over the category's test split at size x size (stretched) and their image scores."""
    backbone = Backbone(size)
    train = describe(backbone, open_dataset("mvtec", root, category, "train", size))
    patches = train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])
    pick = torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[:MEMORY]
    test = open_dataset("mvtec", root, category, "test", size)
    inference = infer_dataset(NearestPatch(backbone, patches[pick].contiguous(), size), test, BATCH, desc="baseline")
    maps = np.asarray(inference.maps)
    return inference, maps.reshape(len(maps), -1).max(axis=1)


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="an MVTec-layout root, e.g. ../shared/data")
    parser.add_argument("--category", required=True)
    parser.add_argument("--size", type=int, nargs="+", default=[128, 256], help="model resolutions, px")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one per core in use)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.size:
        inference, scores = baseline(args.root, args.category, size)
        rows.append({"schedule": f"{size} px", **compute_metrics(inference, scores),
                     "images_per_s": inference.images_per_s, "ms_per_image": 1000.0 / inference.images_per_s})
    print(f"PatchCore-style baseline on {args.category} (test split, {MEMORY} random training patches)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
