"""Flags and look-ups shared by several subcommands: which SKU (--sku-dir or --sku through the config) and
how to run its engine (--backend, --device, --threads, --batch)."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from calibration.thresholds import CALIBRATION_FILE
from engines.runtime import BACKENDS, EngineSettings, engine_settings
from engines.runtime.config import DEFAULT_BACKEND
from foundation.errors import EngineError
from tdad.manifest import MANIFEST_FILE


def add_sku_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--sku-dir D | --sku NAME` pair shared by export, build, bench, calibrate and eval."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sku-dir", type=Path, help="SKU directory (model.safetensors, meta.json, graphs)")
    group.add_argument("--sku", help="SKU name from inspector.toml ([skus.NAME].model_dir)")


def sku_dir_from_args(args: argparse.Namespace) -> Path:
    """The SKU directory named by --sku-dir, or by --sku through the config; EngineError if it is absent."""
    if args.sku_dir is not None:
        return _checked_sku_dir(Path(args.sku_dir))
    from inspector.config import load_config, resolve_sku

    return _checked_sku_dir(resolve_sku(load_config(args.config), args.sku).model_dir)


def _checked_sku_dir(sku_dir: Path) -> Path:
    """sku_dir when it holds a SKU manifest; EngineError saying how to make one otherwise."""
    if not (sku_dir / MANIFEST_FILE).is_file():
        raise EngineError(f"{sku_dir} is not a SKU directory (no {MANIFEST_FILE}); train one with inspector train")
    return sku_dir


@dataclass(frozen=True)
class SkuTarget:
    """Where a CLI command finds a SKU and how it runs it: directory, engine settings, schedule, thresholds."""

    sku_dir: Path
    engine: EngineSettings
    schedule_override: dict[str, int]
    calibration_path: Path


def sku_target(args: argparse.Namespace) -> SkuTarget:
    """Resolve --sku NAME (through inspector.toml, read once) or --sku-dir D, with --backend/--threads on top."""
    settings: EngineSettings | None = None
    if args.sku is not None:
        from inspector.config import load_config, resolve_sku

        config = load_config(args.config)
        sku = resolve_sku(config, args.sku)
        sku_dir = _checked_sku_dir(sku.model_dir)
        settings, override, calibration_path = config.engine, sku.schedule_override(), sku.calibration_path()
    else:
        sku_dir = _checked_sku_dir(Path(args.sku_dir))
        override, calibration_path = {}, sku_dir / CALIBRATION_FILE
    if settings is None or (args.backend and args.backend != settings.backend):
        settings = engine_settings(args.backend or DEFAULT_BACKEND, threads=args.threads or None)
    elif args.threads:
        settings = engine_settings(settings.backend, **{**settings.model_dump(exclude={"backend"}),
                                                        "threads": args.threads})
    if args.device:
        settings = with_device(settings, args.device)
    return SkuTarget(sku_dir, settings, override, calibration_path)


def device_arg(text: str) -> str:
    """--device of train, eval and calibrate: cpu, cuda or cuda:N."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:N")


def with_device(settings: EngineSettings, text: str) -> EngineSettings:
    """The settings with --device (device_arg's form) applied; EngineError naming the flag where the backend can't."""
    kind, _, index = text.partition(":")
    fields = settings.model_dump(exclude={"backend"})
    if settings.backend == "torch":
        fields.update(device=kind, device_id=int(index or 0))
    elif settings.backend == "tensorrt" and kind == "cuda":
        fields.update(device_id=int(index or 0))
    else:
        runs_on = "the CPU" if settings.backend == "onnxruntime" else "a GPU"
        raise EngineError(f"--device {text}: the {settings.backend} backend runs on {runs_on}; drop --device or pass "
                          f"--backend torch")
    return engine_settings(settings.backend, **fields)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The SKU and engine flags shared by `inspector eval` and `inspector calibrate`."""
    add_sku_arguments(parser)
    parser.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help="inference backend (default: engine.backend of the config, else onnxruntime)",
    )
    parser.add_argument("--device", type=device_arg,
                        help="cpu, cuda or cuda:N: where the torch backend runs, or which GPU runs tensorrt "
                             "(default: the config's engine, else cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the engine (0 = backend default)")
    parser.add_argument("--batch", type=int, default=8, help="images per inference batch")
