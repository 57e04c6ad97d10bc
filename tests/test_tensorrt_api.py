"""The TensorRT names the code uses exist in the oldest and newest supported TensorRT, checked without a GPU.

1. An AST walk of the TensorRT modules lists every attribute the code reads from `trt` (whole chains such as
   `trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED`) or from TensorRT objects (builder, network, config,
   parser, profile, runtime, engine, context, ...); it must equal the checked-in tests/tensorrt_api.txt, so
   the list cannot go stale and a new name shows up in review.
2. Each listed name must be in the real bindings of both ends of the supported range: in the string table of
   `tensorrt_bindings/tensorrt.so` (pybind11 keeps every bound name there as a NUL-terminated literal; the
   linker may store one as the tail of a longer literal, so a whole entry or an entry's tail counts) or among
   the names the package's Python files define. `make venv` installs those wheels as plain files under
   .venv/tensorrt-api/<version> (pip --target, no libnvinfer, never imported); a missing install fails here
   rather than skipping.
3. The check can fail: BuilderFlag.FP16 and the implicit-quantization calibrator API are found in 10.x and
   reported missing in 11.x.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

from foundation.gpu import TENSORRT_CEILING, TENSORRT_FLOOR, tensorrt_version_ok

ROOT = Path(__file__).resolve().parent.parent
API_LIST = Path(__file__).with_name("tensorrt_api.txt")
TRT_MODULES = ("engines/runtime/build.py", "engines/runtime/tensorrt_backend.py")
# variables/attributes that hold TensorRT objects in those modules: attributes read from them are TensorRT API
TRT_OBJECTS = {"builder", "network", "config", "parser", "profile", "runtime", "engine", "context", "sizing",
               "engine_inspector", "tensor"}
API_ROOT = Path(sys.prefix) / "tensorrt-api"
SUPPORTED_ENDS = ("10.8.0.43", "11.4.0.106")  # keep in step with TRT_API_VERSIONS in the Makefile
IMPLICIT_QUANTIZATION = ("FP16", "IInt8EntropyCalibrator2", "int8_calibrator", "set_calibration_profile")


def _root(node: ast.expr) -> ast.expr:
    """The base of an attribute chain (`trt` in `trt.Logger.WARNING`, `self.trt` in `self.trt.DataType.HALF`)."""
    while isinstance(node, ast.Attribute) and node.attr != "trt":
        node = node.value
    return node


def _receiver(node: ast.expr) -> str | None:
    """The name that holds the object an attribute is read from: x, self.x, or the x of a call x(...)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_trt(node: ast.expr) -> bool:
    """True for `trt` and `self.trt`."""
    return (isinstance(node, ast.Name) and node.id == "trt") or (isinstance(node, ast.Attribute) and node.attr == "trt")


def used_tensorrt_names() -> set[str]:
    """Every TensorRT attribute name the TensorRT modules read (dunders aside)."""
    names: set[str] = set()
    for module in TRT_MODULES:
        for node in ast.walk(ast.parse((ROOT / module).read_text())):
            if not isinstance(node, ast.Attribute) or node.attr.startswith("__") or node.attr == "trt":
                continue
            chain_on_trt = isinstance(node.value, ast.Attribute | ast.Name) and _is_trt(_root(node.value))
            if chain_on_trt or _is_trt(node.value) or _receiver(node.value) in TRT_OBJECTS:
                names.add(node.attr)
    return names


@cache
def bindings_strings(version: str) -> tuple[frozenset[bytes], frozenset[str]]:
    """The real TensorRT `version` bindings: the .so's string-table entries and the names its Python files define."""
    base = API_ROOT / version
    so = base / "tensorrt_bindings" / "tensorrt.so"
    if not so.is_file():
        pytest.fail(f"{so} is missing: run `make venv` (it installs the TensorRT {version} bindings as files)")
    entries = frozenset(e for e in so.read_bytes().split(b"\0") if e)
    defined: set[str] = set()
    for py in [*base.glob("tensorrt_bindings/*.py"), *base.glob("tensorrt/*.py")]:
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    return entries, frozenset(defined)


def in_bindings(name: str, version: str) -> bool:
    """True when TensorRT `version` binds or defines `name`."""
    entries, defined = bindings_strings(version)
    raw = name.encode()
    return name in defined or any(entry.endswith(raw) for entry in entries)


def test_checked_in_list_is_what_the_code_uses() -> None:
    listed = {line.strip() for line in API_LIST.read_text().splitlines() if line.strip() and not line.startswith("#")}
    used = used_tensorrt_names()
    assert used == listed, (f"update {API_LIST.name}: new {sorted(used - listed)}, gone {sorted(listed - used)}")


@pytest.mark.parametrize("version", SUPPORTED_ENDS)
def test_every_used_name_exists_in_the_supported_bindings(version: str) -> None:
    assert tensorrt_version_ok(version), (version, TENSORRT_FLOOR, TENSORRT_CEILING)
    missing = sorted(n for n in used_tensorrt_names() if not in_bindings(n, version))
    assert not missing, f"TensorRT {version} lacks {missing}"


def test_the_check_catches_the_removed_implicit_quantization_api() -> None:
    old, new = SUPPORTED_ENDS[0], SUPPORTED_ENDS[-1]
    assert all(in_bindings(name, old) for name in IMPLICIT_QUANTIZATION)
    assert not any(in_bindings(name, new) for name in IMPLICIT_QUANTIZATION)
    assert in_bindings("STRONGLY_TYPED", old) and in_bindings("STRONGLY_TYPED", new)


def test_supported_range_matches_the_checked_ends() -> None:
    assert tensorrt_version_ok(SUPPORTED_ENDS[0]) and tensorrt_version_ok(SUPPORTED_ENDS[-1])
    assert not tensorrt_version_ok("10.7.0") and not tensorrt_version_ok("12.0.0.1")
    assert not tensorrt_version_ok("garbage")
