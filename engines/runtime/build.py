"""`inspector build`: TensorRT plans from a SKU's ONNX graphs, for this GPU model and TensorRT version.

Each graph X.onnx becomes `X.<gpu>.<trt>.<precision>.plan` with one optimisation profile for batch
1..max_batch (optimised for the configured batch) and a sidecar `X.<gpu>.<trt>.<precision>.json` (ONNX hash,
GPU, compute capability, TensorRT version, precision, batch range), which the backend checks before use.
INT8 calibrates the image-input graphs (tdad, encoder) with the entropy calibrator of calibration/int8.py
over the SKU's good images; the latent-input part graphs have no image input to calibrate on and are built
FP16 under the same tag (their sidecar says "precision_effective": "fp16").
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calibration.int8 import make_entropy_calibrator
from engines.runtime.staged import file_sha256
from engines.runtime.tensorrt_backend import (
    PART_NAMES,
    UNROLLED_NAME,
    plan_path,
    plan_tag,
    require_tensorrt,
)
from engines.sku import read_meta
from foundation.errors import EngineError
from foundation.log import get_logger
from inspector.commands.common import add_sku_arguments, sku_dir_from_args  # the build CLI moves (issue 14)

log = get_logger(__name__)

BUILD_PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_INPUT = "image"
CALIB_BATCH = 8


def calibration_stream(calib_dir: Path, image_size: int, limit: int, batch: int) -> Any:
    """Up to `limit` good images of the SKU in full batches, through the shared preprocessing."""
    from calibration.int8 import CalibrationStream
    from engines.data import FolderDataset
    from engines.sku import preprocess

    dataset = FolderDataset(calib_dir, image_size)
    return CalibrationStream(dataset, batch, preprocess, max_batches=max(1, limit // batch))


def build_plan(onnx_path: Path, out: Path, precision: str, max_batch: int, opt_batch: int, *,
               calibrator: Any = None, workspace_mb: int = 2048) -> dict[str, Any]:
    """Build and serialise one TensorRT plan (current CUDA context's GPU); returns the sidecar's build fields."""
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path} ({errors}); re-run inspector export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    effective = precision
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibrator is None:
            effective = "fp16"
        else:
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
            config.set_calibration_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {out.name} from {onnx_path} (see the TensorRT log above)")
    out.write_bytes(serialized)
    return {
        "onnx": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt": trt.__version__,
        "precision": precision,
        "precision_effective": effective,
        "min_batch": 1,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "build_s": round(time.perf_counter() - started, 1),
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def build_sku(sku_dir: Path, precision: str = "fp16", *, max_batch: int = 8, opt_batch: int = 1,
              device_id: int = 0, calib_dir: Path | None = None, calib_images: int = 256,
              workspace_mb: int = 2048) -> list[Path]:
    """Build every exported graph of the SKU for this GPU; returns the plan paths."""
    require_tensorrt()
    import pycuda.driver as cuda
    import tensorrt as trt

    if precision not in BUILD_PRECISIONS:
        raise EngineError(f"--precision {precision!r}: valid are {', '.join(BUILD_PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise EngineError(f"--opt-batch {opt_batch} must be in 1..--max-batch ({max_batch})")
    meta = read_meta(sku_dir)
    names = [n for n in (*PART_NAMES, UNROLLED_NAME) if (sku_dir / f"{n}.onnx").is_file()]
    missing = [n for n in PART_NAMES if n not in names]
    if missing:
        raise EngineError(f"{sku_dir} lacks {', '.join(m + '.onnx' for m in missing)}; "
                          f"run: inspector export --sku-dir {sku_dir}")
    stream = None
    if precision == "int8":
        if calib_dir is None:
            raise EngineError("--precision int8 needs --calib-dir DIR: a folder of the SKU's good images")
        stream = calibration_stream(calib_dir, int(meta["image_size"]), calib_images, min(CALIB_BATCH, max_batch))
    cuda.init()
    device = cuda.Device(device_id)
    gpu = {"gpu": device.name(), "compute_capability": ".".join(map(str, device.compute_capability()))}
    context = device.retain_primary_context()
    context.push()
    try:
        tag = plan_tag(device.name(), trt.__version__, precision)
        plans = []
        for name in names:
            onnx_path = sku_dir / f"{name}.onnx"
            out = plan_path(sku_dir, name, tag)
            calibrator = None
            if stream is not None and _has_only_image_input(onnx_path):
                calibrator = make_entropy_calibrator(stream, out.with_suffix(".calib"), IMAGE_INPUT)
            info = gpu | build_plan(onnx_path, out, precision, max_batch, opt_batch, calibrator=calibrator,
                                    workspace_mb=workspace_mb)
            if name == UNROLLED_NAME:
                info["schedule"] = meta.get("export", {}).get("unrolled_schedule")
            out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
            log.info("tensorrt_plan_built", plan=out.name, build_s=info["build_s"],
                     precision=info["precision_effective"])
            plans.append(out)
    finally:
        context.pop()
    return plans


def _has_only_image_input(onnx_path: Path) -> bool:
    """True for graphs whose one input is the image (what the calibration stream feeds)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [i.name for i in graph.input] == [IMAGE_INPUT]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector build`."""
    add_sku_arguments(parser)
    parser.add_argument("--precision", choices=BUILD_PRECISIONS, default="fp16")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the plans accept")
    parser.add_argument("--opt-batch", type=int, default=None,
                        help="batch the kernels are tuned for (default: engine.batch of the config, else 1)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--calib-dir", type=Path, help="folder of good images for INT8 calibration")
    parser.add_argument("--calib-images", type=int, default=256, help="at most this many calibration images")
    parser.add_argument("--workspace-mb", type=int, default=2048, help="TensorRT builder workspace")


def _configured_batch(args: argparse.Namespace) -> int:
    """engine.batch from inspector.toml when one is found, else 1."""
    from inspector.config import config_path, load_config

    if args.config is None and not config_path(None).is_file():
        return 1
    return load_config(args.config).engine.batch


def run(args: argparse.Namespace) -> int:
    """`inspector build`: build the SKU's plans and print their paths."""
    sku_dir = sku_dir_from_args(args)
    opt_batch = args.opt_batch or min(_configured_batch(args), args.max_batch)
    for path in build_sku(sku_dir, args.precision, max_batch=args.max_batch, opt_batch=opt_batch,
                          device_id=args.device_id, calib_dir=args.calib_dir, calib_images=args.calib_images,
                          workspace_mb=args.workspace_mb):
        print(path)
    return 0
