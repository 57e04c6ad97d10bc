"""Latency/throughput table per backend: a thin script over `inspector bench` (inspector/commands/bench.py).

    .venv/bin/python bench/latency.py --random-sku /tmp/bench-sku --threads 2 --json latency.json
    .venv/bin/python bench/latency.py --sku-dir skus/brick --backends onnxruntime --batches 1,4
    python bench/latency.py --sku-dir D --device cuda --backends torch,torch+channels_last+cudnn_benchmark,\
torch+preprocess_on_device,torch+compile=default     # the torch engine's speed levers, a row each
"""

from __future__ import annotations

import argparse
import sys

from foundation.errors import InspectorError
from inspector.commands import bench as benchmark


def main(argv: list[str] | None = None) -> int:
    """Parse `inspector bench` flags and run it; operator errors print one line and exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    args = parser.parse_args(argv)
    args.config = None
    try:
        return benchmark.run(args)
    except InspectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
