"""Training throughput (images/s per phase) and torch inference latency, on CPU and on CUDA when present; and
how the source image size affects loading and training (--source-sizes: PNG files of each size, decoded and
resized once through the data set's decode cache); or, with --preset, a preset's model per phase under each
--variants entry on one device, and the minutes its full schedule takes at those rates.

    .venv/bin/python bench/train_speed.py --image-size 128 --batch-size 8 --steps 10 --threads 2
    .venv/bin/python bench/train_speed.py --image-size 128 --threads 1 --source-sizes 128 900 --phases autoencoder
    python bench/train_speed.py --preset gpu --device cuda --steps 20 --variants fp32,bf16,bf16+channels_last

--preset times the optimisation steps alone (train_step: autocast, clipping, AdamW) on batches drawn beforehand:
in training, synthesis workers draw them beside the device. A variant is fp32 or bf16 (autocast), plus
channels_last (the model and the image batches in that memory format) and compile (torch.compile of the phase's
loss, inductor's default mode; its compilation falls in the warm-up steps).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from tdad.model import ModelConfig, TDADModel
from tdad.training.data import DECODE_CACHE, open_dataset
from tdad.training.sample_data import render_part
from tdad.training.train import (
    LOSSES,
    PHASES,
    PRESETS,
    PhaseLoss,
    StepBatches,
    TrainConfig,
    configure_threads,
    load_images,
    set_phase,
    train_step,
    untrained_model,
)

WARMUP_STEPS = 3  # untimed steps per phase: allocation, cuDNN's choices, a compile


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


def preset_rate(device: torch.device, cfg: TrainConfig, images: np.ndarray, phase: str, steps: int,
                variant: set[str]) -> float:
    """Images/s of `steps` timed optimisation steps of one phase of the preset's model (after WARMUP_STEPS), on
    batches drawn before the timing; `variant`: {"bf16", "channels_last", "compile"}, any of them."""
    torch.manual_seed(0)
    model = untrained_model(cfg, images, images)[0].to(device)
    fmt = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    model = model.to(memory_format=fmt)
    params = set_phase(model, phase)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_of: nn.Module = PhaseLoss(model, phase, cfg)
    if "compile" in variant:
        loss_of = torch.compile(loss_of)  # type: ignore[assignment]
    batches = StepBatches(cfg, images, phase, model.schedule)
    drawn = [{k: _on(device, v, fmt) for k, v in batches[i].items()} for i in range(min(4, steps + WARMUP_STEPS))]
    start = 0.0
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        train_step(model, phase, params, optimizer, drawn[step % len(drawn)], cfg.lr, cfg, "bf16" in variant,
                   loss_of)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def _on(device: torch.device, value: np.ndarray, fmt: torch.memory_format) -> torch.Tensor:
    """One batch array as a tensor on the device, image-shaped floats in the memory format `fmt`."""
    tensor = torch.from_numpy(np.asarray(value)).to(device)
    return tensor.contiguous(memory_format=fmt) if tensor.ndim == 4 and tensor.is_floating_point() else tensor


def preset_rows(args: argparse.Namespace, tmp: Path) -> None:
    """Per variant: images/s of each phase of the preset and the minutes of its full schedule at those rates."""
    device = torch.device(args.device)
    cfg = TrainConfig(data=tmp, out=tmp, **PRESETS[args.preset])
    rows_needed = max(16, -(-cfg.memory // (cfg.image_size // 8) ** 2))  # enough parts to fill the memory
    rng = np.random.default_rng(0)
    images = np.stack([render_part("brick", cfg.image_size, rng) for _ in range(rows_needed)])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    steps = {phase: cfg.steps(phase) for phase in args.phases}
    print(f"the {args.preset} preset ({cfg.image_size} px, batch {cfg.batch_size}, width {cfg.width}, memory "
          f"{cfg.memory}) on {name}: images/s of {args.steps} steps per phase after {WARMUP_STEPS} warm-up steps, "
          f"batches drawn beforehand; minutes for {' / '.join(map(str, steps.values()))} steps")
    print("| variant | " + " | ".join(f"{p} img/s" for p in args.phases) + " | full schedule min |")
    print("|---|" + "---:|" * (len(args.phases) + 1), flush=True)
    for spec in args.variants.split(","):
        variant = set(spec.split("+"))
        rates = [preset_rate(device, cfg, images, phase, args.steps, variant) for phase in args.phases]
        minutes = sum(steps[p] * cfg.batch_size / r for p, r in zip(args.phases, rates, strict=True)) / 60
        print(f"| {spec} | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {minutes:.1f} |", flush=True)


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


def main(argv: list[str] | None = None) -> None:
    """Print the tables the flags ask for."""
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
    parser.add_argument("--preset", choices=list(PRESETS), help="only the preset table: this preset's model")
    parser.add_argument("--device", default="cpu", help="device of the preset table, e.g. cuda")
    parser.add_argument("--variants", default="fp32,bf16,bf16+channels_last,bf16+channels_last+compile",
                        help="comma-separated variants of the preset table: fp32|bf16[+channels_last][+compile]")
    args = parser.parse_args(argv)
    configure_threads(TrainConfig(data=Path(), out=Path(), threads=args.threads))
    if args.preset:
        with tempfile.TemporaryDirectory() as tmp:
            preset_rows(args, Path(tmp))
        return
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
