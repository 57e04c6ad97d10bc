"""Precision as data: which ONNX file holds a graph at fp32, fp16 or int8, and whether it still matches its source.

`<name>.onnx` is the fp32 export; `<name>.fp16.onnx` (fp16 compute, fp32 inputs/outputs) and `<name>.int8.onnx`
(Q/DQ nodes from static quantization) are derived from it by engines/quantize.py and record in their ONNX
metadata the precision and the SHA-256 of the fp32 graph they came from. A derived graph whose source was
re-exported since is refused with the command that regenerates it. Torch- and ONNX-Runtime-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engines.runtime.staged import file_sha256
from foundation.errors import EngineError

if TYPE_CHECKING:
    from tdad.manifest import ExportRecord

GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
DERIVED_PRECISIONS = ("fp16", "int8")
META_PRECISION = "tdad.precision"
META_SOURCE = "tdad.source"
META_SOURCE_SHA256 = "tdad.source_sha256"
# how engines/quantize.py makes int8 graphs now (recorded in the manifest); graphs made otherwise still run
INT8_METHOD = ("onnxruntime quantize_static QDQ, symmetric int8, per-channel, minmax; frozen backbone and "
               "autoencoder fp32")


def graph_file(sku_dir: Path, name: str, precision: str) -> Path:
    """`<name>.onnx` for fp32, `<name>.<precision>.onnx` for the derived precisions."""
    if precision not in GRAPH_PRECISIONS:
        raise EngineError(f"precision {precision!r}: valid are {', '.join(GRAPH_PRECISIONS)}")
    return Path(sku_dir) / (f"{name}.onnx" if precision == "fp32" else f"{name}.{precision}.onnx")


def regenerate_hint(sku_dir: Path, precision: str) -> str:
    """The command that (re)writes the SKU's graphs of `precision`."""
    if precision == "int8":
        return f"run: inspector export --sku-dir {sku_dir} --int8 --calib DIR (a folder of the SKU's good images)"
    flag = " --fp16" if precision == "fp16" else ""
    return f"run: inspector export --sku-dir {sku_dir}{flag}"


def int8_outdated(sku_dir: Path, export: ExportRecord) -> str | None:
    """One line when the SKU's int8 graphs were quantized another way than this version's INT8_METHOD (they run,
    without what it mended: before it, the autoencoder was quantized too, which cost magnetic_tile 0.03 of pixel
    AUROC), naming the command that makes them again; None when they are current or absent."""
    record = export.int8
    if record is None or record.method == INT8_METHOD:
        return None
    return (f"{sku_dir}: its int8 graphs were quantized as {record.method or 'an unrecorded scheme'!r}, not as this "
            f"version does ({INT8_METHOD}); they run, but to have them made as now {regenerate_hint(sku_dir, 'int8')}")


def graph_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def derived_is_current(sku_dir: Path, name: str, precision: str) -> bool:
    """True when the derived graph exists and was made from the fp32 graph now on disk."""
    path, source = graph_file(sku_dir, name, precision), graph_file(sku_dir, name, "fp32")
    if not (path.is_file() and source.is_file()):
        return False
    meta = graph_metadata(path)
    return meta.get(META_PRECISION) == precision and meta.get(META_SOURCE_SHA256) == file_sha256(source)


def check_graph(sku_dir: Path, name: str, precision: str) -> Path:
    """The graph of `name` at `precision`, or EngineError saying it is missing or stale and how to regenerate it."""
    path = graph_file(sku_dir, name, precision)
    fix = regenerate_hint(sku_dir, precision)
    if not path.is_file():
        what = "" if precision == "fp32" else f" (the SKU has no {precision} graphs)"
        raise EngineError(f"{path} is missing{what}; {fix}")
    if precision in DERIVED_PRECISIONS and not derived_is_current(sku_dir, name, precision):
        raise EngineError(f"{path} was not made from the current {name}.onnx (re-exported since, or not a "
                          f"{precision} graph of this SKU); {fix}")
    return path
