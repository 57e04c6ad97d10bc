"""Durable file-system steps the station's stores share (spool, version store)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Sync a file's data, or a folder's entries (a new name: a rename, a link, a new file), to disk, so they
    survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
