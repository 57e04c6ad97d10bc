"""The first segmenter batches of a training run, fingerprinted, to tell a box's libraries from its device.

For each of the first --steps batches: the synthetic masks' area, the anomalies' contrast inside them, and the
untrained segmenter's loss (the model train_sku starts from, memory filled) on the CPU in float32 and on --device
in float32 and under bf16 autocast. Run on two machines with the same data, the CPU columns agree unless their
libraries synthesise other batches, and the device columns agree with the CPU unless the device computes another
loss. Why: the segmenters trained on an H100 (2026-11-26, gpu preset) started at a loss of 0.53 where this CPU's
run of the same configuration starts at 0.39, and they fit held-out synthetic batches 5x worse.

    .venv/bin/python bench/train_fingerprint.py --data .gpu/data --category magnetic_tile --image-size 128 \\
        --json .gpu/fingerprint.json                       # here
    python3 bench/train_fingerprint.py ... --device cuda --compare .gpu/fingerprint.json   # there: exit 1 on a gap
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from engines.train import (
    PRESETS,
    StepBatches,
    TrainConfig,
    fill_memory,
    load_images,
    segmenter_loss,
    set_phase,
    square_images,
    untrained_model,
)

TOLERANCE = 0.05  # relative: bf16 autocast moves the loss ~1.5 % on the CPU; the H100 run started 36 % off


def fingerprint(cfg: TrainConfig, device: torch.device, steps: int) -> list[dict[str, float]]:
    """Per step: mask area, mean |anomalous - clean| inside the mask, and the untrained segmenter's loss."""
    torch.manual_seed(cfg.seed)  # as train_sku: the model's init is the seed's
    images, _ = load_images(cfg)
    model, remembered, owners = untrained_model(cfg, images, square_images(images, cfg.image_size, cfg.seed))
    if model.config.memory_size:
        fill_memory(model, remembered, torch.device("cpu"), cfg.batch_size, cfg.seed, owners)
    set_phase(model, "segmenter")
    batches = StepBatches(cfg, images, "segmenter", model.schedule)
    batches_t = [{k: torch.from_numpy(np.asarray(v)) for k, v in batches[step].items()} for step in range(steps)]
    rows = []
    for step, batch in enumerate(batches_t):
        mask = batch["mask"]
        contrast = ((batch["anom"] - batch["clean"]).abs().mean(1, keepdim=True) * mask).sum() / mask.sum().clamp_min(1)
        rows.append({"step": step, "mask_area": float(mask.mean()), "contrast": float(contrast)})
    for name, where, amp in (("loss_cpu", torch.device("cpu"), False), ("loss_device", device, False),
                             ("loss_device_bf16", device, True)):
        model.to(where)  # one move per column, not per batch
        for row, batch in zip(rows, batches_t, strict=True):
            on = {k: v.to(where) for k, v in batch.items()}
            with torch.no_grad(), torch.autocast(where.type, dtype=torch.bfloat16, enabled=amp):
                row[name] = float(segmenter_loss(model, on, cfg))
    return rows


def gaps(rows: list[dict[str, float]], reference: list[dict[str, float]]) -> list[str]:
    """Each value more than TOLERANCE off the reference's same step and column; the device's losses are also
    held to this run's own CPU loss."""
    found = []
    for row, ref in zip(rows, reference, strict=False):
        for key in ("mask_area", "contrast", "loss_cpu"):
            if abs(row[key] - ref[key]) > TOLERANCE * abs(ref[key]):
                found.append(f"step {row['step']} {key}: {row[key]:.4f} here, {ref[key]:.4f} in the reference")
        for key in ("loss_device", "loss_device_bf16"):
            if abs(row[key] - row["loss_cpu"]) > TOLERANCE * abs(row["loss_cpu"]):
                found.append(f"step {row['step']} {key}: {row[key]:.4f}, the CPU's {row['loss_cpu']:.4f}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--dataset", choices=("folder", "mvtec", "visa"), default="mvtec")
    parser.add_argument("--category", required=True)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="gpu")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--compare", type=Path, help="a reference run's --json: exit 1 where they differ")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    knobs = dict(PRESETS[args.preset]) | ({"image_size": args.image_size} if args.image_size else {})
    cfg = TrainConfig(data=args.data, out=Path("unused"), dataset=args.dataset, category=args.category,
                      reconstruction="none", **knobs)
    rows = fingerprint(cfg, torch.device(args.device), args.steps)
    print("step  mask area  contrast  loss CPU  loss device  loss device bf16")
    for r in rows:
        print(f"{r['step']:>4}  {r['mask_area']:9.4f}  {r['contrast']:8.4f}  {r['loss_cpu']:8.4f}  "
              f"{r['loss_device']:11.4f}  {r['loss_device_bf16']:16.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.compare:
        found = gaps(rows, json.loads(args.compare.read_text()))
        print("\n".join(found) if found else f"fingerprint: matches {args.compare} within {TOLERANCE:.0%}")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
