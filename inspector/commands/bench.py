"""`inspector bench`: latency and throughput per backend on a SKU (or a random untrained one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines.runtime import BACKENDS
from engines.runtime.benchmark import benchmark, format_table, make_random_sku, parse_engines
from inspector.commands.common import sku_dir_from_args
from tdad.manifest import MANIFEST_FILE


def _int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: positive integers, an argparse error otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector bench`."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sku-dir", type=Path, help="SKU directory (exported)")
    group.add_argument("--sku", help="SKU name from inspector.toml")
    group.add_argument("--random-sku", type=Path, metavar="DIR",
                       help="create an untrained 256 px SKU in DIR (if absent), export it and benchmark it")
    parser.add_argument("--image-size", type=int, default=256, help="image size of --random-sku")
    parser.add_argument("--memory", type=int, default=0, help="memory prior entries of --random-sku (filled from "
                                                              "rendered parts)")
    parser.add_argument("--fine-memory", type=int, default=0, help="fine-memory entries of --random-sku")
    parser.add_argument("--backends", default="torch,onnxruntime",
                        help="comma-separated backend[:precision][+KEY[=VALUE]...], e.g. onnxruntime,onnxruntime:int8, "
                             "torch:bf16 or torch+channels_last+compile=default (KEY: an engine setting, bare = "
                             "true; backends: " + ",".join(BACKENDS) + ")")
    parser.add_argument("--batches", type=_int_list, default=[1, 2, 4, 8], help="comma-separated batch sizes")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op CPU threads of onnxruntime and torch (0 = library default)")
    parser.add_argument("--precision", default="fp16", help="TensorRT precision where --backends names none")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the torch backend")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="replay captured CUDA graphs (torch on cuda, tensorrt)")
    parser.add_argument("--json", type=Path, help="also write the report here")


def run(args: argparse.Namespace) -> int:
    """`inspector bench`: print the tables and optionally write the JSON report."""
    engines = parse_engines(args.backends, threads=args.threads or None, tensorrt_precision=args.precision,
                            device=args.device, cuda_graphs=args.cuda_graphs)
    if args.random_sku is not None:
        sku_dir = args.random_sku
        if not (sku_dir / MANIFEST_FILE).is_file():
            make_random_sku(sku_dir, args.image_size, memory=args.memory, fine_memory=args.fine_memory)
    else:
        sku_dir = sku_dir_from_args(args)
    report = benchmark(sku_dir, engines, args.batches, args.iters)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
