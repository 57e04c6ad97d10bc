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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that a reader sees the old or the new content, never half of it, and a power cut
    keeps one of them: a temp file beside it, synced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
