"""The inspector.toml of a test station, written by one builder so the daemon tests differ only where their
stations do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w


def write_station(path: Path, *, port: int, station_id: str, active: str, skus: dict[str, dict[str, Any]],
                  line_id: str = "it", **tables: dict[str, Any]) -> Path:
    """Write an inspector.toml at `path` for a station on the local broker at `port` and return the path.

    The base: [line] line_id/station_id, [mqtt] on `port` spooling to "spool", [engine] on 1 thread, [service]
    with a 60 s frame timeout. Each keyword table (camera, archive, web, ...)
    is merged over the base's table of that name; `skus` gives one [skus.NAME] table per SKU. Paths may be Path.
    """
    base: dict[str, dict[str, Any]] = {
        "line": {"line_id": line_id, "station_id": station_id},
        "mqtt": {"port": port, "spool_dir": "spool"},
        "engine": {"threads": 1},
        "service": {"frame_timeout_ms": 60000},
    }
    for name, table in tables.items():
        base[name] = base.get(name, {}) | table
    document = {"active_sku": active, **base, "skus": skus}
    path.write_text(tomli_w.dumps(_plain(document)))
    return path


def _plain(value: Any) -> Any:
    """Paths as strings, all the way down (tomli_w writes only TOML's own types)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value
