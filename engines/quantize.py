"""fp16 and int8 graphs derived from a SKU's fp32 ONNX export: precision lives in the graph, not in builder flags.

fp16: onnxconverter-common's float16 converter with fp32 inputs/outputs (`keep_io_types`). The timestep
embedding (the Sin/Cos and what feeds them) stays fp32: t * frequency reaches ~1000 rad, where fp16's spacing
of 0.5 would scramble the phases.

int8: static post-training quantization by ONNX Runtime (`quantize_static`, QDQ format, symmetric signed int8,
per-channel weights, float biases, min/max ranges) of the weighted ops (Conv, Gemm, MatMul), the placement TensorRT's
explicit quantization builds INT8 kernels from; the same graph runs on ONNX Runtime's CPU provider. The segmenter's
frozen EfficientNet backbone stays fp32: the memory prior compares its features with entries stored in fp32, and
int8 features moved every patch's distance (magnetic_tile image / pixel AUROC / AUPRO 0.911 / 0.789 / 0.681 in
fp32, 0.841 / 0.685 / 0.530 all-int8, 0.909 / 0.796 / 0.683 with the backbone kept fp32). So does the autoencoder
(FP32_SCOPES, FP32_PARTS): the denoiser, run at every step, is where int8 saves time. The
calibration inputs are the SKU's good images through the daemon's preprocessing; the latent-input part graphs
(denoiser, fusion, decoder, segmenter) are calibrated on the tensors the fp32 pipeline feeds them for those
images, so every graph sees the value ranges it meets in service.

Each derived graph records its precision and the SHA-256 of its fp32 source (engines/precision.py).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from engines.precision import (
    INT8_METHOD,
    META_PRECISION,
    META_SOURCE,
    META_SOURCE_SHA256,
    check_graph,
    graph_file,
)
from engines.runtime.config import OnnxRuntimeSettings
from engines.runtime.onnx_backend import OnnxEngine, session_options
from engines.runtime.staged import PART_NAMES, UNROLLED_NAME, check_export, file_sha256, read_sku_manifest, run_parts
from foundation.errors import DataError, EngineError, first_line
from foundation.log import get_logger
from tdad.manifest import DerivedGraphsRecord, TilingRecord, read_manifest, with_derived, write_manifest
from tdad.preprocess import ResizeMode, preprocess
from tdad.tiling import TilePlan

log = get_logger(__name__)

GRAPH_NAMES = (*PART_NAMES, UNROLLED_NAME)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# ONNX node-name scopes left fp32 (segmenter and unrolled graphs): the frozen feature extractor, and the autoencoder,
# whose int8 reconstructions left residuals of their own where the map reads small real ones (magnetic_tile pixel
# AUROC 0.851 fp32, 0.819 int8, 0.853 with the autoencoder fp32); 16 of the unrolled graph's 329 weighted ops
FP32_SCOPES = ("/backbone/", "/encoder/", "/decoder/")
FP32_PARTS = ("encoder", "decoder")  # part graphs left fp32 whole: their int8 file is the fp32 graph, stamped
# initializers whose consumers stay fp32: the memory searches (Gemm |m|^2 - 2 q.m, which cancels against |q|^2, so
# int8 error would swamp a good patch's small distance; and the quantizer gave that Gemm's per-entry weight a scalar
# scale beside a per-entry zero point, a DequantizeLinear ONNX Runtime refuses to run)
FP32_INITIALIZERS = ("memory",)  # name endings: memory, fine_memory, model.segmenter.memory, ...
DEFAULT_CALIB_IMAGES = 32


def _exported_names(sku_dir: Path) -> list[str]:
    """The graphs of the SKU's fp32 export (EngineError with the export command when it is missing or stale)."""
    check_export(sku_dir, read_sku_manifest(sku_dir))
    for name in PART_NAMES:
        check_graph(sku_dir, name, "fp32")
    return [n for n in GRAPH_NAMES if graph_file(sku_dir, n, "fp32").is_file()]


def _stamp(model: onnx.ModelProto, precision: str, source: Path, **extra: str) -> None:
    """Record precision and source hash (and `extra`) in the graph's metadata_props."""
    props = {META_PRECISION: precision, META_SOURCE: source.name, META_SOURCE_SHA256: file_sha256(source), **extra}
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def check_runs(path: Path) -> None:
    """EngineError naming the derived graph when ONNX Runtime cannot load it or run it once on zeros at batch 1, so
    a graph that would only fail on the station is refused where it is written (two such gaps went unseen: the
    fp16 and int8 graphs of every SKU with a memory, engines/quantize.py FP32_INITIALIZERS and search_island)."""
    try:
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        session.run(None, {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], ORT_DTYPES[i.type])
                           for i in session.get_inputs()})
    except Exception as exc:  # ORT raises its own untyped errors
        raise EngineError(f"{path}: written, but ONNX Runtime cannot run it ({first_line(exc)}); this is a defect "
                          "of the export: deploy the fp32 graphs, and report it") from None


def _record(sku_dir: Path, precision: Literal["fp16", "int8"], graphs: DerivedGraphsRecord) -> None:
    """Note the derived graphs in meta.json's export record (what `inspector export` printed, for the operator)."""
    write_manifest(sku_dir, with_derived(read_manifest(sku_dir), precision, graphs))


# ----------------------------------------------------------------------------- fp16


def fp32_island(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes computing Sin/Cos and their float inputs (up to a Cast or Shape): kept in fp32."""
    producer = {out: node for node in graph.node for out in node.output}
    keep: set[str] = set()
    todo = [node for node in graph.node if node.op_type in ("Sin", "Cos")]
    while todo:
        node = todo.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        if node.op_type not in ("Cast", "Shape"):
            todo.extend(producer[i] for i in node.input if i in producer)
    return sorted(keep)


def search_island(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes of each memory search (tdad.nets.segmenter.nearest_distance), kept in fp32: every node on
    a path from the search's Cast of its queries to float to its division by the memory's scale, and the |m|^2 of
    its memory. |m|^2 - 2 q.m + |q|^2 cancels (fp16 would swamp a good patch's distance), and converted to fp16
    the Cast's declared float output no longer matched its input's type, a graph ONNX Runtime refuses to load."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    memories = {i.name for i in graph.initializer if i.name.endswith(FP32_INITIALIZERS)}
    keep: set[str] = set()
    for gemm in (n for n in graph.node if n.op_type == "Gemm" and memories.intersection(n.input)):
        start = producer[gemm.input[0]]
        while start.op_type != "Cast":  # the queries' Reshape/Transpose back to their cast to float
            start = producer[start.input[0]]
        after, todo = set(), [start]  # downstream of the cast, up to the division by the scale
        while todo:
            node = todo.pop()
            if node.name in after:
                continue
            after.add(node.name)
            if not any(i.endswith("memory_scale") for i in node.input):
                todo.extend(c for o in node.output for c in consumers.get(o, []))
        before, todo = set(), [n for n in graph.node if n.name in after and any(
            i.endswith("memory_scale") for i in n.input)]  # upstream of that division
        while todo:
            node = todo.pop()
            if node.name in before:
                continue
            before.add(node.name)
            todo.extend(producer[i] for i in node.input if i in producer)
        keep |= after & before
        todo = [producer[i] for i in gemm.input[2:] if i in producer]  # |m|^2: of the memory alone (often folded)
        while todo:
            node = todo.pop()
            keep.add(node.name)
            todo.extend(producer[i] for i in node.input if i in producer)
    return sorted(keep)


def convert_fp16(source: Path, out: Path) -> Path:
    """Write the fp16 (fp32-I/O) version of one fp32 graph, stamped with its source."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    with warnings.catch_warnings():  # one "truncated to 1e-07" note per tiny weight: not operator news
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True,
                                                node_block_list=fp32_island(model.graph) + search_island(model.graph))
    _stamp(half, "fp16", source)
    onnx.checker.check_model(half)
    onnx.save(half, str(out))
    check_runs(out)
    return out


def derive_fp16(sku_dir: Path) -> list[Path]:
    """fp16 graphs of every exported graph of the SKU; returns their paths."""
    sku_dir = Path(sku_dir)
    paths = [convert_fp16(graph_file(sku_dir, n, "fp32"), graph_file(sku_dir, n, "fp16"))
             for n in _exported_names(sku_dir)]
    _record(sku_dir, "fp16", DerivedGraphsRecord(files=[p.name for p in paths], tool=_version("onnxconverter-common")))
    log.info("fp16_graphs_written", sku_dir=str(sku_dir), graphs=len(paths))
    return paths


# ----------------------------------------------------------------------------- int8


def _spread(n: int, limit: int) -> np.ndarray:
    """Up to `limit` indices evenly spread over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(int))


def calibration_images(calib_dir: Path, image_size: int, limit: int, resize: ResizeMode = "stretch",
                       tiling: TilingRecord | None = None) -> np.ndarray:
    """Up to `limit` good images of the folder, evenly spread over its sorted listing, as uint8 N x S x S x 3
    resized the SKU's way (`resize`), as the daemon feeds them; for a tiled SKU, up to `limit` of their tiles
    at its scale, evenly spread."""
    from tdad.training.data import FolderDataset

    if limit < 1:
        raise DataError(f"--calib-images {limit}: use at least 1")
    dataset = FolderDataset(Path(calib_dir), image_size, resize=resize, tile_scale=tiling.scale if tiling else None)
    images = [np.asarray(dataset[int(i)].image) for i in _spread(len(dataset), limit)]
    if tiling is None:
        return np.stack(images)
    tiles = np.concatenate([TilePlan.fit(*im.shape[:2], image_size, tiling.overlap).tile(im) for im in images])
    return tiles[_spread(len(tiles), limit)]


class _RecordingParts:
    """Wraps the fp32 part graphs and keeps every input they are fed (the calibration samples of each part)."""

    def __init__(self, parts: Any) -> None:
        self.parts = parts
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def _keep(self, name: str, **feeds: np.ndarray) -> None:
        self.feeds[name].append({k: np.ascontiguousarray(v) for k, v in feeds.items()})

    def encode(self, x: np.ndarray) -> np.ndarray:
        self._keep("encoder", image=x)
        return self.parts.encode(x)

    def denoise(self, z_t: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        self._keep("denoiser", z_t=z_t, t=np.full(z_t.shape[0], t, np.int64), cond=cond)
        return self.parts.denoise(z_t, t, cond)

    def fuse(self, z: np.ndarray, z_rec1: np.ndarray) -> np.ndarray:
        self._keep("fusion", z=z, z_rec1=z_rec1)
        return self.parts.fuse(z, z_rec1)

    def zero_cond(self, z: np.ndarray) -> np.ndarray:
        return self.parts.zero_cond(z)

    def decode(self, z: np.ndarray) -> np.ndarray:
        self._keep("decoder", z=z)
        return self.parts.decode(z)

    def segment(self, x: np.ndarray, x_rec: np.ndarray) -> np.ndarray:
        self._keep("segmenter", image=x, reconstruction=x_rec)
        return self.parts.segment(x, x_rec)

    def sync(self) -> None:
        self.parts.sync()


def calibration_feeds(sku_dir: Path, images_u8: np.ndarray, threads: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph, the inputs it receives when the fp32 pipeline (SKU schedule) runs on each image (batch 1)."""
    engine = OnnxEngine(OnnxRuntimeSettings(threads=threads), unrolled=False)
    engine.load(sku_dir)
    recorder = _RecordingParts(engine._parts)
    for frame in images_u8:
        x = preprocess(frame[None])
        recorder.feeds[UNROLLED_NAME].append({"image": x})
        run_parts(recorder, x, engine.schedule, *engine._noises, residual=engine._residual)
    return dict(recorder.feeds)


def _reader(samples: list[dict[str, np.ndarray]]) -> Any:
    """An onnxruntime CalibrationDataReader over recorded feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class _FeedReader(CalibrationDataReader):
        """Yields the recorded feeds once, in order."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _FeedReader()


def quantize_graph(source: Path, out: Path, samples: list[dict[str, np.ndarray]], calibration: str) -> Path:
    """Static QDQ int8 quantization of one fp32 graph over `samples` (the backbone's and the autoencoder's nodes
    and the memory searches left fp32; an autoencoder part graph is left fp32 whole), stamped with its source."""
    model = onnx.load(str(source)) if source.stem in FP32_PARTS else _quantized(source, samples)
    _stamp(model, "int8", source, **{"tdad.calibration": calibration})
    onnx.save(model, str(out))
    check_runs(out)
    return out


def _quantized(source: Path, samples: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static of the graph at `source` over `samples`, the FP32_SCOPES nodes and the
    consumers of FP32_INITIALIZERS excluded."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False).graph
    kept = {i.name for i in graph.initializer if i.name.endswith(FP32_INITIALIZERS)}
    fp32_nodes = [n.name for n in graph.node
                  if any(scope in n.name for scope in FP32_SCOPES) or kept.intersection(n.input)]
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer's notes on the root logger ("consider pre-processing")
    try:
        with tempfile.TemporaryDirectory(prefix="tdad-quant-") as tmp:
            staged = Path(tmp) / source.name
            quantize_static(
                str(source), str(staged), _reader(samples), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=fp32_nodes,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
            return onnx.load(str(staged))
    finally:
        root_logger.setLevel(level)


def quantize_int8(sku_dir: Path, calib_dir: Path, limit: int = DEFAULT_CALIB_IMAGES, threads: int = 0) -> list[Path]:
    """Q/DQ int8 graphs of every exported graph, calibrated on up to `limit` good images of `calib_dir`."""
    sku_dir = Path(sku_dir)
    names = _exported_names(sku_dir)
    manifest = read_manifest(sku_dir)
    images = calibration_images(calib_dir, manifest.image_size, limit, manifest.preprocess.resize, manifest.tiling)
    feeds = calibration_feeds(sku_dir, images, threads)
    calibration = f"{len(images)} images of {Path(calib_dir).resolve()}"
    paths = []
    for name in names:
        if not feeds.get(name):
            raise EngineError(f"no calibration samples reached {name}.onnx; re-run inspector export")
        paths.append(quantize_graph(graph_file(sku_dir, name, "fp32"), graph_file(sku_dir, name, "int8"),
                                    feeds[name], calibration))
        log.info("int8_graph_written", graph=paths[-1].name, samples=len(feeds[name]))
    _record(sku_dir, "int8", DerivedGraphsRecord(
        files=[p.name for p in paths], calibration=calibration, ops=list(QUANTIZED_OPS), tool=_version("onnxruntime"),
        method=INT8_METHOD))
    return paths


def _version(dist: str) -> str:
    """`dist==version` of an installed distribution, for the export record."""
    from importlib.metadata import version

    return f"{dist}=={version(dist)}"
