"""The first segmenter batches of a training run, fingerprinted, to tell a box's libraries from its device.

For each of the first --steps batches: the synthetic masks' area, the anomalies' contrast inside them, and the
untrained segmenter's loss (the model train_sku starts from, memory filled) on the CPU in float32 and on --device
in float32 and under bf16 autocast. Run on two machines with the same data, the CPU columns agree unless their
libraries synthesise other batches, and the device columns agree with the CPU unless the device computes another
loss. Why: the segmenters trained on an H100 (2026-11-26, gpu preset) started at a loss of 0.53 where this CPU's
run of the same configuration starts at 0.39, and they fit held-out synthetic batches 5x worse. The cause it then
pinned: CUDA's area interpolation pooled the batches' stride-0 masks to zeros (tdad.training.train.downsample_mask).

--train-steps K then trains the segmenter K steps from that model per column as train_sku does (its memory filled
on that column's device, train_step, the same batches) and scores each on held-out batches of seed + 1: CPU fp32,
then on a device fp32 as torch runs it (TF32 convolutions), fp32 without TF32, and bf16 autocast. The box's own CPU
against its device holds the libraries fixed; the box's CPU against the reference's holds the device out. With
--compare the box's CPU column is skipped (--cpu-training keeps it): the first batches already hold its libraries
to the reference, and the device is held to the reference's CPU training (the H100's CPU took ~2 of the 3 minutes).

    .venv/bin/python bench/train_fingerprint.py --data .gpu/data --category magnetic_tile --image-size 128 \
        --train-steps 100 --json .gpu/fingerprint.json                               # here
    python3 bench/train_fingerprint.py ... --device cuda --dump var/batch0.npz \
        --compare .gpu/fingerprint.json                                             # there: exit 1 on a gap
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdad.model import TDADModel
from tdad.training.train import (
    PRESETS,
    StepBatches,
    TrainConfig,
    TrainImages,
    fill_memory,
    load_images,
    lr_at,
    segmenter_loss,
    set_phase,
    square_images,
    train_step,
    training_device,
    untrained_model,
)

TOLERANCE = 0.05  # relative: bf16 autocast moves the loss ~1.5 % on the CPU; the H100 run started 36 % off
TRAIN_TOLERANCE = 0.15  # relative, after --train-steps: rounding differences compound over the steps


def tensors(batches: StepBatches, steps: range) -> list[dict[str, torch.Tensor]]:
    """The batches of those steps as CPU tensors."""
    return [{k: torch.from_numpy(np.asarray(v)) for k, v in batches[step].items()} for step in steps]


@dataclass
class Start:
    """What train_sku starts the segmenter from: the training images, the untrained model (its memory empty) and
    what that memory samples from, with each row's source image."""

    images: TrainImages
    model: TDADModel
    remembered: np.ndarray
    owners: np.ndarray | None

    @classmethod
    def of(cls, cfg: TrainConfig) -> Start:
        """Load the images and build the model as train_sku does (its init is the seed's)."""
        torch.manual_seed(cfg.seed)
        images, _ = load_images(cfg)
        return cls(images, *untrained_model(cfg, images, square_images(images, cfg.image_size, cfg.seed)))

    def model_on(self, cfg: TrainConfig, where: torch.device) -> TDADModel:
        """A copy of the model on `where`, its memory filled there, set up for the segmenter phase."""
        model = copy.deepcopy(self.model).to(where)
        if model.config.memory_size:
            fill_memory(model, self.remembered, where, cfg.batch_size, cfg.seed, self.owners)
        return model


def fingerprint(cfg: TrainConfig, start: Start, device: torch.device, steps: int,
                dump: Path | None = None) -> list[dict[str, float]]:
    """Per step: mask area, mean |anomalous - clean| inside the mask, and the untrained segmenter's loss
    (dump: the first batch's images as uint8 and its masks, to diff two boxes' synthesis pixel by pixel)."""
    model = start.model_on(cfg, torch.device("cpu"))
    set_phase(model, "segmenter")
    batches_t = tensors(StepBatches(cfg, start.images, "segmenter", model.schedule), range(steps))
    if dump is not None:
        first = batches_t[0]
        np.savez_compressed(dump, mask=first["mask"].numpy().astype(np.float16), source=first["source"].numpy(),
                            **{k: (first[k].numpy() * 255).round().astype(np.uint8) for k in ("clean", "anom")})
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


def train_ab(cfg: TrainConfig, start: Start, device: torch.device, steps: int, held_out: int = 4,
             cpu: bool = True) -> list[dict[str, Any]]:
    """Per column (CPU fp32 unless not cpu; then, on another device, fp32, fp32 without TF32, bf16): the memory
    scale fill_memory sets on that device, the first and last of `steps` training losses, and the mean fp32 loss
    on `held_out` batches of seed + 1."""
    schedule = start.model.schedule
    train = tensors(StepBatches(cfg, start.images, "segmenter", schedule), range(steps))
    held = tensors(StepBatches(dataclasses.replace(cfg, seed=cfg.seed + 1), start.images, "segmenter", schedule),
                   range(held_out))
    columns = [("cpu fp32", torch.device("cpu"), False)] if cpu or device.type == "cpu" else []
    if device.type != "cpu":  # fp32 as torch runs it on CUDA (TF32 convolutions), IEEE fp32, bf16 autocast
        columns += [("device fp32", device, False), ("device ieee", device, False), ("device bf16", device, True)]
    rows = []
    for name, where, amp in columns:
        torch.backends.cudnn.allow_tf32 = name != "device ieee"
        model = start.model_on(cfg, where)
        scale = float(model.segmenter.memory_scale) if model.config.memory_size else 0.0
        params = set_phase(model, "segmenter")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = [train_step(model, "segmenter", params, optimizer, {k: v.to(where) for k, v in batch.items()},
                             lr_at(step, cfg.seg_steps, cfg), cfg, amp).item() for step, batch in enumerate(train)]
        model.eval()
        with torch.no_grad():
            held_loss = np.mean([segmenter_loss(model, {k: v.to(where) for k, v in b.items()}, cfg).item()
                                 for b in held])
        rows.append({"column": name, "memory_scale": scale, "first": losses[0], "last": losses[-1],
                     "held_out": float(held_loss)})
    torch.backends.cudnn.allow_tf32 = True
    return rows


def gaps(run: dict[str, list[dict[str, Any]]], reference: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each value more than TOLERANCE (TRAIN_TOLERANCE after training) off the reference's same step or column;
    the device's are also held to this run's own CPU (its training, where this run has none, to the reference's
    CPU training). Each line starts with the column it names."""
    found = []
    for row, ref in zip(run["steps"], reference["steps"], strict=False):
        for key in ("mask_area", "contrast", "loss_cpu"):
            if abs(row[key] - ref[key]) > TOLERANCE * abs(ref[key]):
                found.append(f"{key} step {row['step']}: {row[key]:.4f} here, {ref[key]:.4f} in the reference")
        for key in ("loss_device", "loss_device_bf16"):
            if abs(row[key] - row["loss_cpu"]) > TOLERANCE * abs(row["loss_cpu"]):
                found.append(f"{key} step {row['step']}: {row[key]:.4f}, the CPU's {row['loss_cpu']:.4f}")
    trained = {r["column"]: r for r in run.get("train", [])}
    for ref in reference.get("train", []):
        if ref["column"] == "cpu fp32" and ref["column"] in trained:
            here = trained["cpu fp32"]
            for key in ("memory_scale", "held_out"):
                if abs(here[key] - ref[key]) > TRAIN_TOLERANCE * abs(ref[key]):
                    found.append(f"train cpu fp32 {key}: {here[key]:.4f} here, {ref[key]:.4f} in the reference")
    # the device against this run's CPU column, else (not trained here) the reference's
    cpu = trained.get("cpu fp32") or next((r for r in reference.get("train", []) if r["column"] == "cpu fp32"), None)
    for name in ("device fp32", "device ieee", "device bf16"):
        if cpu is None or name not in trained:
            continue
        for key in ("memory_scale", "held_out"):
            if abs(trained[name][key] - cpu[key]) > TRAIN_TOLERANCE * abs(cpu[key]):
                found.append(f"train {name} {key}: {trained[name][key]:.4f}, the CPU's {cpu[key]:.4f}")
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
    parser.add_argument("--dump", type=Path, help="write the first batch here (.npz) to diff two boxes' synthesis")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="then train K steps per column and score held-out batches (0: no training)")
    parser.add_argument("--cpu-training", action="store_true",
                        help="with --compare, train on this box's CPU too (by default its device is held to the "
                             "reference's CPU training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    knobs = dict(PRESETS[args.preset]) | ({"image_size": args.image_size} if args.image_size else {})
    cfg = TrainConfig(data=args.data, out=Path("unused"), dataset=args.dataset, category=args.category,
                      reconstruction="none", **knobs)
    device = training_device(args.device)  # as train_sku sets it up
    start = Start.of(cfg)
    run: dict[str, list[dict[str, Any]]] = {"steps": fingerprint(cfg, start, device, args.steps, args.dump)}
    print("step  mask area  contrast  loss CPU  loss device  loss device bf16")
    for r in run["steps"]:
        print(f"{r['step']:>4}  {r['mask_area']:9.4f}  {r['contrast']:8.4f}  {r['loss_cpu']:8.4f}  "
              f"{r['loss_device']:11.4f}  {r['loss_device_bf16']:16.4f}")
    if args.train_steps:
        # with a reference, the first batches' CPU columns already hold the box's libraries to it: the device's
        # training is held to the reference's CPU training, and the box's CPU (minutes of device time) is spared
        run["train"] = train_ab(cfg, start, device, args.train_steps, cpu=args.compare is None or args.cpu_training)
        print(f"\n{args.train_steps} training steps  memory scale  first loss  last loss  held-out loss")
        for r in run["train"]:
            print(f"{r['column']:<18}  {r['memory_scale']:12.4f}  {r['first']:10.4f}  {r['last']:9.4f}  "
                  f"{r['held_out']:13.4f}")
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    if not args.compare:
        return 0
    found = gaps(run, json.loads(args.compare.read_text()))
    print("\n".join(found) if found else f"fingerprint: matches {args.compare}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
