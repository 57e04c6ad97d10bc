"""Training throughput (images/s per phase) and torch inference latency, on CPU and on CUDA when present.

    .venv/bin/python bench/train_speed.py --image-size 128 --batch-size 8 --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engines.model import ModelConfig, TDADModel
from engines.sample_data import render_part
from engines.train import LOSSES, PHASES, StepBatches, TrainConfig, set_phase


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--infer-sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
