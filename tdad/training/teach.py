"""Teach a trained SKU more good parts without retraining: their least-covered patch descriptors join the
segmenter's memory of normal patches (and its fine memory), so a false reject that looked like them scores
like a good part afterwards.

Each taught image gets at most the memory share a training image had (entries / source images of the memory),
spent on its patches farthest from what the memory already holds, most distant first and only those farther
than a typical good patch is from another good image (distance > 1 at the memory's scale): a patch the memory
already covers adds nothing but search time. The memory scales are kept: the segmenter's learnt gain and the
chosen boosts were fit against them, and the thresholds are re-fit on good parts after teaching instead. A quick
SKU's memory profiles are measured again on the good rows they keep: measured against the memory before teaching,
they would expect every cell to read farther than it now does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from foundation.errors import DataError
from tdad.manifest import TaughtRecord, read_manifest, write_manifest
from tdad.model import TDADModel, load_sku, save_weights
from tdad.nets.segmenter import nearest_distance
from tdad.preprocess import preprocess
from tdad.training.data import FolderDataset, content_digests, file_list_hash
from tdad.training.train import TrainImages, measure_profile, memory_images

COVERED = 1.0  # scaled distance of a typical good patch to the nearest patch of another good image


@dataclasses.dataclass(frozen=True)
class Taught:
    """What teaching added: images taught, memory entries before/after, fine-memory entries before/after."""

    images: int
    memory_before: int
    memory_after: int
    fine_before: int
    fine_after: int


@torch.no_grad()
def novel_descriptors(describe: Callable[[torch.Tensor], torch.Tensor], rows_u8_nhwc: np.ndarray,
                      owners: np.ndarray, memory: torch.Tensor, scale: torch.Tensor, per_owner: int,
                      batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The descriptors of rows (describe: N x 3 x S x S -> N x D x h x w) that the memory covers least, with their
    owners: for each owner (source image) at most per_owner of its cells with scaled distance > COVERED, most
    distant first."""
    feats, dists = [], []
    for i in range(0, len(rows_u8_nhwc), batch):
        x = torch.from_numpy(preprocess(rows_u8_nhwc[i : i + batch])).to(memory.device)
        f = describe(x)
        d = nearest_distance(f, memory, scale)
        feats.append(f.permute(0, 2, 3, 1).reshape(len(x), -1, f.shape[1]))
        dists.append(d.reshape(len(x), -1))
    cells = torch.cat(feats)  # rows x cells x D
    distance = torch.cat(dists)  # rows x cells
    chosen, chosen_owners = [memory.new_zeros(0, memory.shape[1])], [torch.zeros(0, dtype=torch.int64)]
    for owner in np.unique(owners):
        rows = torch.from_numpy(np.flatnonzero(owners == owner))
        d, f = distance[rows].flatten(), cells[rows].reshape(-1, cells.shape[-1])
        order = torch.argsort(d, descending=True)[:per_owner]
        picked = f[order[d[order] > COVERED]]
        chosen.append(picked)
        chosen_owners.append(torch.full((len(picked),), int(owner), dtype=torch.int64))
    return torch.cat(chosen), torch.cat(chosen_owners)


@torch.no_grad()
def teach_good(model: TDADModel, images: TrainImages, overlap: float = 0.0) -> Taught:
    """Add the novel patches of good `images` (N x S x S x 3, or a tiled SKU's scaled images of any size) to the
    model's memory and fine memory in place; the model config's entry counts follow. Raises ValueError for a
    model without a memory (nothing to teach)."""
    seg = model.segmenter
    if not seg.memory_size:
        raise ValueError("this SKU has no memory of normal patches to teach (trained without --memory)")
    rows, row_owners = memory_images(images, model.config.image_size, overlap)
    known = seg.memory_owner[seg.memory_owner >= 0]
    sources = max(int(torch.unique(known).numel()), 1)
    first_owner = int(known.max()) + 1 if known.numel() else 0
    owners = row_owners + first_owner
    before, fine_before = seg.memory_size, seg.fine_memory_size
    added, added_owners = novel_descriptors(seg.memory_features, rows, owners, seg.memory,
                                            seg.memory_scale, math.ceil(before / sources))
    seg.memory = torch.cat([seg.memory, added])
    seg.memory_owner = torch.cat([seg.memory_owner, added_owners.to(seg.memory_owner.device)])
    seg.memory_size = len(seg.memory)
    config = dataclasses.replace(model.config, memory_size=seg.memory_size)
    if seg.fine_memory_size:
        fine, fine_owners = novel_descriptors(seg.fine_features, rows, owners, seg.fine_memory, seg.fine_memory_scale,
                                              math.ceil(fine_before / sources))
        seg.fine_memory = torch.cat([seg.fine_memory, fine])
        if seg.memory_profile:
            seg.fine_memory_owner = torch.cat([seg.fine_memory_owner, fine_owners.to(seg.fine_memory_owner.device)])
        seg.fine_memory_size = len(seg.fine_memory)
        config = dataclasses.replace(config, fine_memory_size=seg.fine_memory_size)
    model.config = config
    if seg.memory_profile:  # the kept good rows against the grown memories: their profiles would be stale
        measure_profile(model, "memory")
        if seg.fine_memory_size:
            measure_profile(model, "fine")
    return Taught(images=len(np.unique(row_owners)), memory_before=before, memory_after=seg.memory_size,
                  fine_before=fine_before, fine_after=seg.fine_memory_size)


def teach_sku(sku_dir: Path, good_dir: Path, source: str | None = None) -> TaughtRecord:
    """Teach the SKU in sku_dir (changed in place: weights and manifest; its ONNX graphs are stale until
    re-exported) the good images under good_dir, read as the SKU reads frames (resize mode, tile scale);
    returns the record appended to the manifest's `taught` list. DataError for a SKU without a memory."""
    manifest = read_manifest(sku_dir)
    tiling = manifest.tiling
    dataset = FolderDataset(good_dir, manifest.image_size, resize=manifest.preprocess.resize,
                            tile_scale=tiling.scale if tiling else None)
    images = [item.image for item in dataset]
    model = load_sku(sku_dir)
    try:
        taught = teach_good(model, images if tiling else np.stack(images), tiling.overlap if tiling else 0.0)
    except ValueError as exc:
        raise DataError(f"{sku_dir}: {exc}") from None
    save_weights(model, sku_dir)
    record = TaughtRecord(when=datetime.now(UTC).isoformat(timespec="seconds"), source=source or str(good_dir),
                          data_hash=file_list_hash(dataset), images=taught.images,
                          memory=(taught.memory_before, taught.memory_after),
                          fine_memory=(taught.fine_before, taught.fine_after))
    write_manifest(sku_dir, read_manifest(sku_dir).model_copy(update={
        "model": model.config, "taught": [*manifest.taught, record],
        "trained_on": sorted({*manifest.trained_on, *content_digests(dataset)})}))
    return record
