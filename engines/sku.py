"""Compatibility names for engines/runtime/build.py, which issue 14 rewrites; delete this module then.

Everything else reads the SKU through engines.manifest and preprocesses through engines.preprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.manifest import read_manifest
from engines.preprocess import preprocess


def read_meta(sku_dir: Path) -> dict[str, Any]:
    """meta.json as the validated manifest's JSON document (image_size, export, ...)."""
    return read_manifest(sku_dir).model_dump(mode="json")


__all__ = ["preprocess", "read_meta"]
