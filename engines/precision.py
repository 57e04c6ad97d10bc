"""Precision as data: which ONNX file holds a graph at fp32, fp16 or int8, and whether it still matches its source.

`<name>.onnx` is the fp32 export; `<name>.fp16.onnx` (fp16 compute, fp32 inputs/outputs) and `<name>.int8.onnx`
(Q/DQ nodes from static quantization) are derived from it by engines/quantize.py and record in their ONNX
metadata the precision and the SHA-256 of the fp32 graph they came from. A derived graph whose source was
re-exported since is refused with the command that regenerates it. Torch- and ONNX-Runtime-free.
"""

from __future__ import annotations

from pathlib import Path

from engines.runtime.staged import file_sha256
from foundation.errors import EngineError

GRAPH_PRECISIONS = ("fp32", "fp16", "int8")
DERIVED_PRECISIONS = ("fp16", "int8")
META_PRECISION = "tdad.precision"
META_SOURCE = "tdad.source"
META_SOURCE_SHA256 = "tdad.source_sha256"


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
