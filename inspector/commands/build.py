"""`inspector build`: TensorRT plans of a SKU's fp32, fp16 or int8 graphs for this GPU (engines/runtime/build.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.quantize import DEFAULT_CALIB_IMAGES
from engines.runtime.build import BUILD_PRECISIONS, build_sku
from foundation.errors import EngineError
from inspector.commands.common import add_sku_arguments, sku_dir_from_args

DEFAULT_MAX_BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector build`."""
    add_sku_arguments(parser)
    parser.add_argument("--precision", choices=BUILD_PRECISIONS, default="fp16",
                        help="graph precision to build (fp16 graphs are derived from the fp32 export as needed)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help=f"largest batch the plans accept (default: {DEFAULT_MAX_BATCH}, or engine.batch of the "
                             "config when larger; one below engine.batch is refused: the daemon's micro-batches "
                             "and tile chunks are engine.batch frames)")
    parser.add_argument("--opt-batch", type=int, default=None,
                        help="batch the kernels are tuned for (default: engine.batch of the config, else 1)")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device index")
    parser.add_argument("--calib-dir", type=Path,
                        help="int8: folder of the SKU's good images, to quantize the graphs when they are missing "
                             "or stale (else made by inspector export --int8 --calib DIR)")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help="at most this many calibration images")
    parser.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT builder workspace")


def _configured_batch(args: argparse.Namespace) -> int:
    """engine.batch from inspector.toml when one is found, else 1."""
    from inspector.config import config_path, load_config

    if args.config is None and not config_path(None).is_file():
        return 1
    return load_config(args.config).engine.batch


def run(args: argparse.Namespace) -> int:
    """Build the SKU's plans and print their paths."""
    sku_dir = sku_dir_from_args(args)
    batch = _configured_batch(args)
    max_batch = args.max_batch if args.max_batch is not None else max(DEFAULT_MAX_BATCH, batch)
    if max_batch < batch:
        raise EngineError(f"--max-batch {max_batch} is below engine.batch = {batch} of the config: the daemon would "
                          f"refuse these plans; pass --max-batch {batch} (or more), or lower engine.batch")
    opt_batch = args.opt_batch or batch
    for path in build_sku(sku_dir, args.precision, max_batch=max_batch, opt_batch=opt_batch,
                          device_id=args.device_id, calib_dir=args.calib_dir, calib_images=args.calib_images,
                          workspace_mb=args.workspace_mb):
        print(path)
    return 0
