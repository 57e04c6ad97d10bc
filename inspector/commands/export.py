"""`inspector export`: write a SKU's ONNX graphs (optionally with another schedule baked into tdad.onnx), and
their fp16 and int8 Q/DQ versions on request (engines/quantize.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engines.export import DEFAULT_OPSET, export_sku
from engines.quantize import DEFAULT_CALIB_IMAGES, derive_fp16, quantize_int8
from foundation.errors import EngineError
from inspector.commands.common import add_sku_arguments, sku_dir_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector export`."""
    add_sku_arguments(parser)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    for name in ("t1", "steps1", "t2", "steps2"):
        parser.add_argument(f"--schedule-{name}", type=int, dest=name,
                            help=f"bake this {name} into tdad.onnx instead of the SKU's schedule")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (X.fp16.onnx, fp32 I/O)")
    parser.add_argument("--int8", action="store_true",
                        help="also write int8 Q/DQ graphs (X.int8.onnx), statically quantized over --calib")
    parser.add_argument("--calib", type=Path, metavar="DIR", help="folder of the SKU's good images (for --int8)")
    parser.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                        help="at most this many calibration images (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """`inspector export`: write the SKU's ONNX graphs and print their paths."""
    sku_dir = sku_dir_from_args(args)
    if args.int8 and args.calib is None:
        raise EngineError("--int8 needs --calib DIR: a folder of the SKU's good images to calibrate on")
    override = {name: getattr(args, name) for name in ("t1", "steps1", "t2", "steps2")}
    try:
        paths = export_sku(sku_dir, args.opset, override)
    except ValueError as exc:  # an invalid schedule override
        raise EngineError(f"--schedule-* flags: {exc}") from None
    if args.fp16:
        paths += derive_fp16(sku_dir)
    if args.int8:
        paths += quantize_int8(sku_dir, args.calib, args.calib_images)
    for path in paths:
        print(path)
    return 0
