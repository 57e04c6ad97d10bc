"""Daemon end to end (camera -> engine -> MQTT -> subscriber) per engine micro-batch size, on the demo SKU.

    .venv/bin/python bench/daemon.py --batches 1,2,4,8 --frames 200 [--fps 0] [--workdir var/demo]
    .venv/bin/python bench/daemon.py --batches 4 --frames 1200 --fps 0 --queue-depth 2000 --frame-timeout-ms 120000 \
        --pages 0,2s,2 --repeat 4
    .venv/bin/python bench/daemon.py --batches 8 --frames 30 --fps 0.5 --frame-size 2448x2048 --tile-scale 0.25 \
        --no-archive --threads 1

Builds (or reuses) the demo SKU like `inspector demo`, then runs the in-process daemon once per batch size
and prints throughput, camera-to-publish latency p50/p99 and detection counts as a markdown table.
fps 0 measures throughput (latency then includes queueing); a camera rate below it measures latency.
--pages compares the station page: `off` (no web server), `0` (served, no page open), N headless
chromium pages open on the live view (Debian's chromium and chromedriver, the [dev] extra), or `Ns`: N
event streams read by plain HTTP clients, so the daemon does all the work of N open pages while no browser
renders on this box. Pages and streams are connected before the first frame is taken. --page-nice raises
the browsers' niceness, the closest this one box comes to panel PCs being other machines. --repeat runs
the whole set that many times, interleaved. --frame-size sets the camera's frame (default --part-size square);
--tile-scale inspects with a copy of the demo SKU tiled at that scale (tdad/tiling.py: the frame scaled once,
cut into tiles of the SKU's size, run through the engine in chunks of at most --batches, stitched). The copy keeps
the demo's calibration, fitted on whole 128 px parts: its latency is the measurement, its verdicts are not.
--engine runs another engine than the demo's (bench/latency.py's spec: `torch+device=cuda+channels_last`), and
--sku-dir a calibrated SKU of your own instead of the demo's (camera frames of --part-size, rendered bricks):

    python bench/daemon.py --sku-dir var/gpu-bench-sku --part-size 256 --engine torch+device=cuda --batches 1 \
        --fps 25 --frames 500 --no-web --no-archive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from engines.runtime.benchmark import engine_label, parse_engines
from foundation.errors import EngineError
from foundation.log import configure_logging
from inspector.demo import Recipe, add_arguments, build_demo_sku, demo_config, run_demo
from tdad.manifest import TilingRecord, read_manifest, write_manifest
from tdad.tiling import TilePlan, scaled_hw

COLUMNS = ("throughput (fps)", "latency p50 (ms)", "latency p99 (ms)", "fail-safe", "caught (NG)", "missed (OK)",
           "falsely rejected")
ATTACH_TIMEOUT_S = 60.0


@contextmanager
def open_pages(url: str, count: int, niceness: int = 0) -> Iterator[None]:
    """`count` headless chromium pages on the station page, each with its live stream connected."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from inspector.web.browser import headless_chromium

    with ExitStack() as stack:
        for _ in range(count):
            driver = stack.enter_context(headless_chromium())
            driver.get(url)
            WebDriverWait(driver, ATTACH_TIMEOUT_S, poll_frequency=0.2).until(
                lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stream") == "live")
            if niceness:
                _renice(driver.capabilities["chrome"]["userDataDir"], niceness)
        _wait_pages(url, count)
        yield


@contextmanager
def open_streams(url: str, count: int) -> Iterator[None]:
    """`count` processes reading the page's event stream (live frames and state) without rendering it."""
    reader = "import sys, urllib.request as u\nr = u.urlopen(sys.argv[1])\nwhile r.read(65536): pass"
    with ExitStack() as stack:
        for _ in range(count):
            process = subprocess.Popen([sys.executable, "-c", reader, f"{url}api/events"])
            stack.callback(process.wait)
            stack.callback(process.kill)
        _wait_pages(url, count)
        yield


def _wait_pages(url: str, count: int) -> None:
    """Until the server counts `count` event streams."""
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while _pages_open(url) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} pages did not connect to {url}")
        time.sleep(0.2)


def _renice(profile: str, niceness: int) -> None:
    """Set the niceness of one profile's chromium browser process and all its descendants (renderers, GPU...)."""
    parent: dict[int, int] = {}
    roots = set()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if profile.encode() in f.read():
                    roots.add(pid)
        except OSError:
            continue  # exited in between
    for pid in parent:
        ancestor = pid
        while ancestor > 1 and ancestor not in roots:
            ancestor = parent.get(ancestor, 0)
        if ancestor in roots:
            try:
                os.setpriority(os.PRIO_PROCESS, pid, niceness)
            except OSError:
                continue


def _pages_open(url: str) -> int:
    with urllib.request.urlopen(f"{url}api/status", timeout=10) as response:
        return int(json.load(response)["pages"])


def tiled_copy(sku_dir: Path, dest: Path, tiling: TilingRecord) -> Path:
    """A copy of a SKU (weights, graphs, calibration) whose manifest inspects in tiles."""
    shutil.copytree(sku_dir, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("train_state"))
    write_manifest(dest, read_manifest(dest).model_copy(update={"tiling": tiling}))
    return dest


def input_label(width: int, height: int, sku_dir: Path) -> str:
    """What the engine sees of one frame: the whole frame at the model size, or the tile plan."""
    manifest = read_manifest(sku_dir)
    size, tiling = manifest.image_size, manifest.tiling
    if tiling is None:
        return f"{width}x{height} as one {size} px input"
    h, w = scaled_hw(height, width, tiling.scale)
    plan = TilePlan.fit(h, w, size, tiling.overlap)
    return f"{width}x{height} at {tiling.scale:g}: {w}x{h}, {len(plan.xs)}x{len(plan.ys)} tiles of {size}"


def main(argv: list[str] | None = None) -> int:
    """Run the daemon once per batch size (and page setting) and print one table row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated engine batch sizes")
    parser.add_argument("--pages", default="off",
                        help="comma-separated station page settings: off, or the number of open pages (0 = served)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole set this many times, interleaved")
    parser.add_argument("--page-nice", type=int, default=0, help="niceness of the browsers (0 = as the daemon)")
    parser.add_argument("--frame-size", help="camera frame as WxH, e.g. 2448x2048 (default: --part-size square)")
    parser.add_argument("--tile-scale", type=float, help="inspect with a copy of the demo SKU tiled at this scale")
    parser.add_argument("--tile-overlap", type=float, default=0.0, help="with --tile-scale: overlap of the tiles")
    parser.add_argument("--no-archive", action="store_true",
                        help="keep no NG frames (an uncalibrated tiled copy rejects and archives every large frame)")
    parser.add_argument("--engine", help="engine spec as bench/latency.py's --backends takes one, e.g. "
                                         "torch+device=cuda (default: --backend with --threads)")
    parser.add_argument("--sku-dir", type=Path, help="a calibrated SKU to inspect with instead of the demo's")
    args = parser.parse_args(argv)
    args.config = None
    args.web_port = 0
    configure_logging("warning")
    workdir = Path(args.workdir).resolve()
    engine = None
    if args.engine:
        try:
            (engine,) = parse_engines(args.engine, threads=args.threads or None, tensorrt_precision="fp16",
                                      device="cpu", cuda_graphs=True)
        except (EngineError, ValueError) as exc:
            parser.error(f"--engine {args.engine!r}: {exc}")
    if args.sku_dir is not None:
        sku_dir = args.sku_dir.resolve()
    else:
        sku_dir = build_demo_sku(workdir, Recipe(backend=args.backend, seed=args.seed, part_size=args.part_size,
                                                 train_scale=args.train_scale), threads=args.threads)
    if args.tile_scale is not None:
        tiling = TilingRecord(scale=args.tile_scale, overlap=args.tile_overlap)
        sku_dir = tiled_copy(sku_dir, workdir / f"sku-tiled-{args.tile_scale:g}-{args.tile_overlap:g}", tiling)
    width, height = (int(v) for v in args.frame_size.lower().split("x")) if args.frame_size else (args.part_size,) * 2
    label = input_label(width, height, sku_dir)
    print(f"engine: {engine_label(engine) if engine is not None else args.backend}, SKU {sku_dir}")
    print(f"| input | batch | page | {' | '.join(COLUMNS)} |")
    print(f"|---|---:|---|{'---:|' * len(COLUMNS)}")
    for _ in range(args.repeat):
        for batch in (int(b) for b in args.batches.split(",")):
            for pages in args.pages.split(","):
                args.batch = batch
                args.no_web = pages == "off"
                attach: Any = None
                if pages.endswith("s"):
                    attach = lambda url, n=int(pages[:-1]): open_streams(url, n)  # noqa: E731
                elif pages not in ("off", "0"):
                    attach = lambda url, n=int(pages): open_pages(url, n, args.page_nice)  # noqa: E731
                config = demo_config(args, sku_dir, workdir)
                camera = config.camera.model_copy(update={"width": width, "height": height})
                archive = config.archive.model_copy(update={"enabled": not args.no_archive})
                update: dict[str, Any] = {"camera": camera, "archive": archive}
                if engine is not None:
                    update["engine"] = engine.model_copy(update={"batch": batch})
                summary = run_demo(config.model_copy(update=update), workdir, quiet=True, attach=attach)
                streams = f"{pages[:-1]} streams" if pages.endswith("s") else f"{pages} pages in chromium"
                page = {"off": "off", "0": "served, closed"}.get(pages, streams)
                print(f"| {label} | {batch} | {page} | {' | '.join(str(summary[c]) for c in COLUMNS)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
