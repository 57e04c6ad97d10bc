"""Training throughput (images/s per phase) and torch inference latency, on CPU and on CUDA when present; and
how the source image size affects loading and training (--source-sizes: PNG files of each size, decoded and
resized once through the data set's decode cache).

    .venv/bin/python bench/train_speed.py --image-size 128 --batch-size 8 --steps 10 --threads 2
    .venv/bin/python bench/train_speed.py --image-size 128 --threads 1 --source-sizes 128 900 --phases autoencoder
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from tdad.model import ModelConfig, TDADModel
from tdad.training.data import DECODE_CACHE, open_dataset
from tdad.training.sample_data import render_part
from tdad.training.train import LOSSES, PHASES, StepBatches, TrainConfig, configure_threads, load_images, set_phase


def train_rate(device: torch.device, cfg: TrainConfig, images: np.ndarray, phase: str, steps: int) -> float:
    """Images/s of optimisation steps of one phase (after two warm-up steps), synthesis included."""
    torch.manual_seed(0)
    model = TDADModel(ModelConfig(image_size=cfg.image_size)).to(device)
    params = set_phase(model, phase)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    batches = StepBatches(cfg, images, phase, model.schedule)
    use_amp = cfg.amp and device.type == "cuda"
    start = 0.0
    for step in range(steps + 2):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batches[step].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = LOSSES[phase](model, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def infer_ms(device: torch.device, image_size: int, repeats: int) -> float:
    """Best-of-`repeats` milliseconds for one frame through the whole model (batch 1, default schedule)."""
    model = TDADModel(ModelConfig(image_size=image_size)).to(device).eval()
    x = torch.rand(1, 3, image_size, image_size, device=device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            model.anomaly_maps(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def write_sources(folder: Path, part: np.ndarray, side: int, n: int, seed: int = 0) -> Path:
    """n distinct side x side PNGs of one part (resized, plus per-file noise, so each file decodes anew): every
    source size shows the model the same content, so only the file size differs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    part = cv2.resize(part, (side, side), interpolation=cv2.INTER_AREA)
    for i in range(n):
        noisy = np.clip(part.astype(np.int16) + rng.integers(-8, 9, part.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR))
    return folder


def source_size_rows(args: argparse.Namespace, tmp: Path) -> None:
    """Per source size: ms/image to decode + resize (cold, then cached) and training images/s after the load."""
    print(f"\nsource image size vs loading and training ({args.images} PNGs, model {args.image_size} px, "
          f"batch {args.batch_size}, {args.threads} threads)")
    print(f"{'source px':>9} {'file KB':>8} {'cold ms/img':>12} {'cached ms/img':>14} {'load s':>7} "
          + " ".join(f"{p + ' img/s':>18}" for p in args.phases))
    part = render_part("brick", max(args.source_sizes), np.random.default_rng(0))
    for side in args.source_sizes:
        folder = write_sources(tmp / f"src{side}", part, side, args.images)
        cfg = TrainConfig(data=folder, out=tmp / f"out{side}", image_size=args.image_size,
                          batch_size=args.batch_size, threads=args.threads)
        DECODE_CACHE.clear()
        t0 = time.perf_counter()
        images, _ = load_images(cfg)  # what inspector train does once, before its first step
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(open_dataset("folder", folder, None, "train", args.image_size))  # e.g. eval's next row
        cached_ms = (time.perf_counter() - t0) * 1000.0 / args.images
        rates = [train_rate(torch.device("cpu"), cfg, images, phase, args.steps) for phase in args.phases]
        kb = sum(f.stat().st_size for f in folder.iterdir()) / args.images / 1024
        print(f"{side:>9} {kb:8.0f} {load_s * 1000.0 / args.images:12.2f} {cached_ms:14.3f} {load_s:7.2f} "
              + " ".join(f"{r:18.1f}" for r in rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infer-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--source-sizes", type=int, nargs="*", default=[],
                        help="only the source-size table: square PNG sides to compare, e.g. 128 900")
    parser.add_argument("--images", type=int, default=32, help="PNG files per source size")
    parser.add_argument("--phases", nargs="*", default=list(PHASES), choices=PHASES)
    args = parser.parse_args()
    configure_threads(TrainConfig(data=Path(), out=Path(), threads=args.threads))
    if args.source_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            source_size_rows(args, Path(tmp))
        return
    rng = np.random.default_rng(0)
    images = np.stack([render_part("brick", args.image_size, rng) for _ in range(16)])
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=Path(tmp), out=Path(tmp), image_size=args.image_size, batch_size=args.batch_size)
        print(f"training images/s at {args.image_size} px, batch {args.batch_size}, {args.threads} CPU threads")
        print(f"{'device':8} " + " ".join(f"{p:>12}" for p in PHASES))
        for device in devices:
            rates = [train_rate(device, cfg, images, phase, args.steps) for phase in PHASES]
            print(f"{device.type:8} " + " ".join(f"{r:12.1f}" for r in rates))
    print(f"\ntorch inference ms/frame (batch 1, 5+5 DDIM steps, {args.threads} CPU threads)")
    print(f"{'device':8} " + " ".join(f"{s:>8}px" for s in args.infer_sizes))
    for device in devices:
        print(f"{device.type:8} " + " ".join(f"{infer_ms(device, s, args.repeats):10.1f}" for s in args.infer_sizes))


if __name__ == "__main__":
    main()
