"""Daemon end to end (camera -> engine -> MQTT -> subscriber) per engine micro-batch size, on the demo SKU.

    .venv/bin/python bench/daemon.py --batches 1,2,4,8 --frames 200 [--fps 0] [--workdir var/demo]

Builds (or reuses) the demo SKU like `inspector demo`, then runs the in-process daemon once per batch size
and prints throughput, camera-to-publish latency p50/p99 and detection counts as a markdown table.
fps 0 measures throughput (latency then includes queueing); a camera rate below it measures latency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foundation.log import configure_logging
from inspector.demo import Recipe, add_arguments, build_demo_sku, demo_config, run_demo

COLUMNS = ("throughput (fps)", "latency p50 (ms)", "latency p99 (ms)", "fail-safe", "caught (NG)", "missed (OK)",
           "falsely rejected")


def main(argv: list[str] | None = None) -> int:
    """Run the daemon once per batch size and print one table row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--batches", default="1,2,4,8", help="comma-separated engine batch sizes")
    args = parser.parse_args(argv)
    args.config = None
    configure_logging("warning")
    workdir = Path(args.workdir).resolve()
    sku_dir = build_demo_sku(workdir, Recipe(backend=args.backend, seed=args.seed, part_size=args.part_size,
                                             train_scale=args.train_scale), threads=args.threads)
    print(f"| batch | {' | '.join(COLUMNS)} |")
    print(f"|---:|{'---:|' * len(COLUMNS)}")
    for batch in (int(b) for b in args.batches.split(",")):
        args.batch = batch
        summary = run_demo(demo_config(args, sku_dir, workdir), workdir, quiet=True)
        print(f"| {batch} | {' | '.join(str(summary[c]) for c in COLUMNS)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
