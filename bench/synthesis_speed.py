"""Anomaly-synthesis throughput on one CPU core: images/s and ms/image p50/p99 per image size.

Usage: .venv/bin/python bench/synthesis_speed.py [--sizes 64 128 256] [--n 400] [--texture-dir DIR]

Rows per texture bank: a folder (without --texture-dir a DTD-like folder of scikit-image textures at 512 px is
written to a temp dir), the built-in offline bank (the default) and none (``textures="self"``), each with every
texture decoded or generated before timing; for anomaly_prob 1.0 (every image synthesised, the worst case) and
0.5 (the training default). Wall-clock and CPU-time rates are both printed: on a shared box the CPU-time rate
is what one dedicated core would sustain. A second table gives the one-off cost of generating a built-in
texture per kind (each of a bank's 256 textures is made once per process, on first use).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from tdad.training.sample_data import TEXTURES, render_part, write_good_folder
from tdad.training.synthesis import AnomalySynthesizer, TextureMix
from tdad.training.textures import BUILTIN_KINDS


def time_synthesis(
    size: int, anomaly_prob: float, texture_dir: Path | None, textures: TextureMix, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(wall seconds, CPU seconds) per call for n calls on rendered parts, after a warm-up pass."""
    rng = np.random.default_rng(0)
    images = [render_part("brick", size, rng) for _ in range(32)]
    synth = AnomalySynthesizer(size, texture_dir=texture_dir, anomaly_prob=anomaly_prob, textures=textures)
    for i in range(len(synth.textures or [])):
        synth.textures.get(i)  # type: ignore[union-attr]
    for image in images:
        synth(image, rng)
    wall, cpu = np.empty(n), np.empty(n)
    for i in range(n):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        synth(images[i % len(images)], rng)
        wall[i], cpu[i] = time.perf_counter() - start_wall, time.thread_time() - start_cpu
    return wall, cpu


def time_builtin_kinds(size: int, n: int = 20) -> dict[str, float]:
    """CPU ms to generate one built-in texture of each kind at size px (mean of n)."""
    ms = {}
    for name, make in BUILTIN_KINDS.items():
        make(size, np.random.default_rng(0))  # first use loads the bundled photos
        start = time.thread_time()
        for i in range(n):
            make(size, np.random.default_rng(i))
        ms[name] = 1e3 * (time.thread_time() - start) / n
    return ms


def main() -> None:
    """Pin to one core, run every size at both probabilities and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--n", type=int, default=400, help="timed calls per row")
    parser.add_argument("--texture-dir", type=Path, default=None, help="DTD-style folder (default: samples)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        texture_dir = args.texture_dir
        if texture_dir is None:
            texture_dir = Path(tmp)
            for seed, name in enumerate(TEXTURES):
                write_good_folder(texture_dir / name, 2, 512, name, seed)
        banks: list[tuple[str, Path | None, TextureMix]] = [
            ("folder", texture_dir, "builtin"), ("built-in", None, "builtin"), ("none (self)", None, "self")]
        print("| size | texture bank | anomaly_prob | images/s (wall) | images/s (CPU) | ms/image p50 | ms/image p99 |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for size in args.sizes:
            for bank, folder, textures in banks:
                for prob in (1.0, 0.5):
                    wall, cpu = time_synthesis(size, prob, folder, textures, args.n)
                    ms = wall * 1e3
                    print(
                        f"| {size} | {bank} | {prob:.1f} | {1 / wall.mean():.0f} | {1 / cpu.mean():.0f} | "
                        f"{np.percentile(ms, 50):.2f} | {np.percentile(ms, 99):.2f} |"
                    )
    print("\nbuilt-in texture generation, CPU ms per texture (once per bank entry and process)\n")
    print(f"| size | {' | '.join(BUILTIN_KINDS)} |")
    print(f"| ---: |{' ---: |' * len(BUILTIN_KINDS)}")
    for size in args.sizes:
        print(f"| {size} | {' | '.join(f'{v:.1f}' for v in time_builtin_kinds(size).values())} |")


if __name__ == "__main__":
    main()
