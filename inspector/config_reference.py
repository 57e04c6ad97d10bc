"""docs/configuration.md, generated from the pydantic models of inspector.toml, so the reference cannot drift.

    inspector config reference > docs/configuration.md

Every key of every table: its type, default, allowed values (literals, bounds, patterns) and description. The
camera and engine tables are one table per `type` / `backend`, since each takes its own keys.
tests/test_config.py fails when the committed file differs from what this renders.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from engines.runtime.config import OnnxRuntimeSettings, TensorRTSettings, TorchSettings
from inspector.config import (
    ArchiveConfig,
    DriftConfig,
    FolderCamera,
    GenTLCamera,
    InspectorConfig,
    LineConfig,
    MqttConfig,
    ServiceConfig,
    SkuConfig,
    StoreConfig,
    SyntheticCamera,
    VideoCamera,
    WebConfig,
)

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

# (heading, model, keys left out because the heading names them)
TABLES: tuple[tuple[str, type[BaseModel], tuple[str, ...]], ...] = (
    ("`[line]`", LineConfig, ()),
    ('`[camera]` with `type = "gentl"`', GenTLCamera, ("type",)),
    ('`[camera]` with `type = "folder"`', FolderCamera, ("type",)),
    ('`[camera]` with `type = "video"`', VideoCamera, ("type",)),
    ('`[camera]` with `type = "synthetic"` (the default)', SyntheticCamera, ("type",)),
    ("`[mqtt]`", MqttConfig, ()),
    ('`[engine]` with `backend = "onnxruntime"` (the default)', OnnxRuntimeSettings, ("backend",)),
    ('`[engine]` with `backend = "tensorrt"`', TensorRTSettings, ("backend",)),
    ('`[engine]` with `backend = "torch"`', TorchSettings, ("backend",)),
    ("`[archive]`", ArchiveConfig, ()),
    ("`[service]`", ServiceConfig, ()),
    ("`[web]`", WebConfig, ()),
    ("`[drift]`", DriftConfig, ()),
    ("`[store]`", StoreConfig, ()),
    ("`[skus.<name>]`, one per SKU", SkuConfig, ()),
)

HEADER = """# Configuration reference

Generated from the pydantic models (`inspector config reference > docs/configuration.md`; a test fails when
this file and the models disagree). One `inspector.toml` per camera station; the shipped one is commented
and valid. It is found at `--config`, else `$INSPECTOR_CONFIG`, else `./inspector.toml`. Every key can be
overridden from the environment as `INSPECTOR_<SECTION>__<KEY>` (`INSPECTOR_MQTT__HOST=10.0.0.5`). Relative
paths are resolved against the config file's folder. An unknown key, a wrong type or a value out of range is
one error line naming the file and the key (`inspector config check`).
"""


def type_name(annotation: Any) -> str:
    """A TOML-minded name for a field's type: string, integer, number, boolean, path, list, table."""
    origin = get_origin(annotation)
    if origin is Literal:
        kinds = {type(v) for v in get_args(annotation)}
        return "string" if kinds == {str} else "integer"
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in get_args(annotation) if a is not type(None)]
        return " or ".join(names)
    if origin is tuple:
        return f"array of {len(get_args(annotation))} {type_name(get_args(annotation)[0])}s"
    if origin is list:
        return f"array of {type_name(get_args(annotation)[0])}s"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def allowed(info: FieldInfo) -> str:
    """The values a field takes: its literals, bounds and pattern."""
    parts: list[str] = []
    annotation = info.annotation
    for arg in (annotation, *get_args(annotation)):
        if get_origin(arg) is Literal:
            parts.append(", ".join(f"`{_toml(v)}`" for v in get_args(arg)))
    symbols = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("≤", "le"),
               annotated_types.Lt: ("<", "lt")}
    for meta in info.metadata:
        for kind, (symbol, attr) in symbols.items():
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None):
            parts.append(f"at least {meta.min_length}")
        if getattr(meta, "pattern", None):
            parts.append(f"`{meta.pattern}`")
    return "; ".join(parts)


def default(info: FieldInfo) -> str:
    """The default as it would be written in TOML; "required" when there is none, "unset" for None."""
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see its table"
    return f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    """A scalar or list in TOML spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    """A markdown table of a model's keys; ValueError names a key without a description."""
    rows = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        if not info.description:
            raise ValueError(f"{model.__name__}.{name} has no description: give its Field one")
        meaning = re.sub(r"(?<!`)(<[^>\s]+>)", r"`\1`", info.description.replace("|", "\\|"))
        rows.append(f"| `{name}` | {type_name(info.annotation)} | {default(info)} | {allowed(info)} | {meaning} |")
    return rows


def render() -> str:
    """The whole reference document."""
    sections = ("line", "camera", "mqtt", "engine", "archive", "service", "web", "drift", "store", "skus")
    lines = [HEADER, "## Top level", "", *table(InspectorConfig, skip=sections), ""]
    for heading, model, skip in TABLES:
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        lines += [f"## {heading}", "", doc, "", *table(model, skip), ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n")
