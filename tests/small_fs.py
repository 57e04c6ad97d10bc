"""A real, tiny filesystem for full-disk tests: tmpfs mounted on a temporary folder (needs root, as in CI)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_fs(path: Path, size_kib: int) -> Iterator[Path]:
    """Mount a `size_kib` KiB tmpfs on path for the block; skips the test when this box cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write a filler file under path until its filesystem has no free block left; returns the filler."""
    filler = path / "filler"
    with filler.open("ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    return filler
