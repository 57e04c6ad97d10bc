"""TensorRT plans from a SKU's ONNX graphs, for this GPU model and TensorRT version (the library of `inspector build`).

Precision is data, not builder flags: every plan is a strongly typed network built from the graph of its
precision (engines/precision.py) — `X.onnx` (fp32), `X.fp16.onnx` (fp16 compute, fp32 I/O; derived here when
missing or stale) or `X.int8.onnx` (Q/DQ from static quantization over the SKU's good images, derived here
from `calib_dir` when missing or stale). Nothing here uses BuilderFlag.FP16/INT8 or an INT8 calibrator, so
the same code builds on TensorRT 10.x and 11.x (tests/test_tensorrt_api.py checks the names it uses).

Each graph becomes `X.<gpu>.<trt>.<precision>.plan` with one optimisation profile for batch 1..max_batch (tuned
for opt_batch) and a sidecar `.json`: the ONNX file and its SHA-256, GPU, compute capability, TensorRT
version, precision, batch range, and the data types the built layers compute in (read back from the engine,
so an fp16 plan is shown to be fp16). The backend refuses a plan whose sidecar disagrees with what is on disk.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engines.precision import GRAPH_PRECISIONS, check_graph, derived_is_current, graph_file
from engines.runtime.staged import PART_NAMES, UNROLLED_NAME, check_export, file_sha256, read_sku_manifest
from engines.runtime.tensorrt_backend import plan_path, plan_sidecar, plan_tag
from foundation.errors import EngineError
from foundation.gpu import cuda_device, import_tensorrt
from foundation.log import get_logger

log = get_logger(__name__)

BUILD_PRECISIONS = GRAPH_PRECISIONS


def layer_precisions(trt: Any, engine_bytes: bytes) -> dict[str, int]:
    """How many layer outputs of a serialised plan are of each data type (from TensorRT's engine inspector)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    engine_inspector = engine.create_engine_inspector()
    info = json.loads(engine_inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        for output in layer.get("Outputs", []) if isinstance(layer, dict) else []:
            fmt = str(output.get("Format/Datatype", ""))
            counts[next((t for t in ("FP32", "FP16", "BF16", "Int8", "INT8", "Int32", "Int64", "Bool")
                          if t.lower() in fmt.lower()), fmt or "unknown")] += 1
    return dict(counts)


def build_plan(onnx_path: Path, out: Path, precision: str, max_batch: int, opt_batch: int, *,
               workspace_mb: int = 2048) -> dict[str, Any]:
    """Build and serialise one strongly typed TensorRT plan on the current CUDA device; returns its sidecar fields."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path} ({errors}); re-run inspector export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # lets layer_precisions read the kernels' types
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {out.name} from {onnx_path} (see the TensorRT log above)")
    data = bytes(serialized)
    out.write_bytes(data)
    return {
        "onnx": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt": trt.__version__,
        "precision": precision,
        "strongly_typed": True,
        "layer_output_types": layer_precisions(trt, data),
        "min_batch": 1,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "build_s": round(time.perf_counter() - started, 1),
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def ensure_graphs(sku_dir: Path, names: list[str], precision: str, calib_dir: Path | None,
                  calib_images: int) -> None:
    """Make the fp16/int8 graphs when missing or stale: fp16 from the fp32 export, int8 over `calib_dir`."""
    if precision == "fp32" or all(derived_is_current(sku_dir, n, precision) for n in names):
        return
    from engines import quantize

    if precision == "fp16":
        quantize.derive_fp16(sku_dir)
    elif calib_dir is not None:
        quantize.quantize_int8(sku_dir, calib_dir, calib_images)
    for name in names:
        check_graph(sku_dir, name, precision)  # int8 without --calib-dir: the line says how to make them


def build_sku(sku_dir: Path, precision: str = "fp16", *, max_batch: int = 8, opt_batch: int = 1,
              device_id: int = 0, calib_dir: Path | None = None, calib_images: int = 32,
              workspace_mb: int = 2048) -> list[Path]:
    """Build every exported graph of the SKU at `precision` for this GPU; returns the plan paths."""
    if precision not in BUILD_PRECISIONS:
        raise EngineError(f"--precision {precision!r}: valid are {', '.join(BUILD_PRECISIONS)}")
    if not 1 <= opt_batch <= max_batch:
        raise EngineError(f"--opt-batch {opt_batch} must be in 1..--max-batch ({max_batch})")
    trt = import_tensorrt()
    gpu = cuda_device(device_id, key="--device-id")
    names = [n for n in (*PART_NAMES, UNROLLED_NAME) if graph_file(sku_dir, n, "fp32").is_file()]
    missing = [n for n in PART_NAMES if n not in names]
    if missing:
        raise EngineError(f"{sku_dir} lacks {', '.join(m + '.onnx' for m in missing)}; "
                          f"run: inspector export --sku-dir {sku_dir}")
    export = check_export(sku_dir, read_sku_manifest(sku_dir))  # graphs of the current weights only
    ensure_graphs(sku_dir, names, precision, calib_dir, calib_images)
    tag = plan_tag(gpu.name, trt.__version__, precision)
    plans = []
    for name in names:
        out = plan_path(sku_dir, name, tag)
        info = {"gpu": gpu.name, "compute_capability": gpu.compute_capability}
        info |= build_plan(graph_file(sku_dir, name, precision), out, precision, max_batch, opt_batch,
                           workspace_mb=workspace_mb)
        if name == UNROLLED_NAME:
            info["schedule"] = export.unrolled_schedule.to_dict() if export.unrolled_schedule else None
        plan_sidecar(out).write_text(json.dumps(info, indent=2) + "\n")
        log.info("tensorrt_plan_built", plan=out.name, build_s=info["build_s"], precision=precision,
                 layer_output_types=info["layer_output_types"])
        plans.append(out)
    return plans
