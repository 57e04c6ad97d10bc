"""int8 Q/DQ against fp32 on ONNX Runtime (CPU): accuracy on a labelled test set for one trained SKU.

Quantizes the SKU's exported graphs over its training images (when --calib is given), then evaluates the
fp32 and int8 engines of the same model on the same test set and prints image AUROC / pixel AUROC / AUPRO and
the int8 - fp32 change. Speed: `inspector bench --backends onnxruntime,onnxruntime:int8` (bench/latency.py).

    .venv/bin/python bench/int8.py --sku-dir var/cookies --root ../shared/data --category cookies \\
        --calib ../shared/data/cookies/train/good --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calibration.evaluate import METRIC_COLUMNS, evaluate, sku_split
from engines.quantize import DEFAULT_CALIB_IMAGES, quantize_int8
from engines.runtime import create_engine, engine_settings
from foundation.errors import InspectorError
from tdad.manifest import read_manifest


def main(argv: list[str] | None = None) -> int:
    """Evaluate fp32 and int8 on the same SKU and test set; print the table (and write --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sku-dir", type=Path, required=True, help="an exported SKU")
    parser.add_argument("--dataset", default="mvtec", choices=("mvtec", "visa"))
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--calib", type=Path, help="good images to quantize over (default: keep the int8 graphs)")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.calib is not None:
            quantize_int8(args.sku_dir, args.calib, args.calib_images, threads=args.threads)
        manifest = read_manifest(args.sku_dir)
        rows = {}
        for precision in ("fp32", "int8"):
            engine = create_engine(engine_settings("onnxruntime", threads=args.threads, precision=precision),
                                   args.sku_dir)
            rows[precision] = evaluate(engine, sku_split(manifest, args.dataset, args.root, args.category),
                                       top_k=manifest.score.top_k, tiling=manifest.tiling)
    except InspectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'precision':10}" + "".join(f"{title:>14}" for title in METRIC_COLUMNS.values()))
    for precision, result in rows.items():
        print(f"{precision:10}" + "".join(f"{result[key]:14.4f}" for key in METRIC_COLUMNS))
    print(f"{'int8-fp32':10}" + "".join(f"{rows['int8'][k] - rows['fp32'][k]:+14.4f}" for k in METRIC_COLUMNS))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
