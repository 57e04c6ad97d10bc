"""`inspector export`: write a SKU's ONNX graphs (optionally with another schedule baked into tdad.onnx)."""

from __future__ import annotations

import argparse

from engines.export import DEFAULT_OPSET, export_sku
from foundation.errors import EngineError
from inspector.commands.common import add_sku_arguments, sku_dir_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector export`."""
    add_sku_arguments(parser)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default %(default)s)")
    for name in ("t1", "steps1", "t2", "steps2"):
        parser.add_argument(f"--schedule-{name}", type=int, dest=name,
                            help=f"bake this {name} into tdad.onnx instead of the SKU's schedule")


def run(args: argparse.Namespace) -> int:
    """`inspector export`: write the SKU's ONNX graphs and print their paths."""
    sku_dir = sku_dir_from_args(args)
    override = {name: getattr(args, name) for name in ("t1", "steps1", "t2", "steps2")}
    try:
        paths = export_sku(sku_dir, args.opset, override)
    except ValueError as exc:  # an invalid schedule override
        raise EngineError(f"--schedule-* flags: {exc}") from None
    for path in paths:
        print(path)
    return 0
