"""Daemon end to end (camera -> engine -> MQTT -> subscriber) per engine micro-batch size, on the demo SKU.

    .venv/bin/python bench/daemon.py --batches 1,2,4,8 --frames 200 [--fps 0] [--workdir var/demo]
    .venv/bin/python bench/daemon.py --batches 4 --frames 1500 --fps 0 --pages off,0,2 --repeat 3

Builds (or reuses) the demo SKU like `inspector demo`, then runs the in-process daemon once per batch size
and prints throughput, camera-to-publish latency p50/p99 and detection counts as a markdown table.
fps 0 measures throughput (latency then includes queueing); a camera rate below it measures latency.
--pages compares the station page: `off` (no web server), `0` (served, no page open) or N headless
chromium pages open on the live view (Debian's chromium and chromedriver, the [dev] extra); the pages are
connected before the first frame is taken. --repeat runs the whole set that many times, interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from foundation.log import configure_logging
from inspector.demo import Recipe, add_arguments, build_demo_sku, demo_config, run_demo

COLUMNS = ("throughput (fps)", "latency p50 (ms)", "latency p99 (ms)", "fail-safe", "caught (NG)", "missed (OK)",
           "falsely rejected")
ATTACH_TIMEOUT_S = 60.0


@contextmanager
def open_pages(url: str, count: int) -> Iterator[None]:
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
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while _pages_open(url) < count:  # the server counts each page's event stream
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} pages did not connect to {url}")
            time.sleep(0.2)
        yield


def _pages_open(url: str) -> int:
    with urllib.request.urlopen(f"{url}api/status", timeout=10) as response:
        return int(json.load(response)["pages"])


def main(argv: list[str] | None = None) -> int:
    """Run the daemon once per batch size (and page setting) and print one table row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated engine batch sizes")
    parser.add_argument("--pages", default="off",
                        help="comma-separated station page settings: off, or the number of open pages (0 = served)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole set this many times, interleaved")
    args = parser.parse_args(argv)
    args.config = None
    args.web_port = 0
    configure_logging("warning")
    workdir = Path(args.workdir).resolve()
    sku_dir = build_demo_sku(workdir, Recipe(backend=args.backend, seed=args.seed, part_size=args.part_size,
                                             train_scale=args.train_scale), threads=args.threads)
    print(f"| batch | page | {' | '.join(COLUMNS)} |")
    print(f"|---:|---|{'---:|' * len(COLUMNS)}")
    for _ in range(args.repeat):
        for batch in (int(b) for b in args.batches.split(",")):
            for pages in args.pages.split(","):
                args.batch = batch
                args.no_web = pages == "off"
                attach: Any = None if pages in ("off", "0") else (lambda url, n=int(pages): open_pages(url, n))
                summary = run_demo(demo_config(args, sku_dir, workdir), workdir, quiet=True, attach=attach)
                label = {"off": "off", "0": "served, closed"}.get(pages, f"{pages} open")
                print(f"| {batch} | {label} | {' | '.join(str(summary[c]) for c in COLUMNS)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
