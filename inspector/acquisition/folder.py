"""Replay images from a folder as camera frames: commissioning, regression runs and the demo.

Files are decoded by foundation.images.load_image_rgb, as training decodes them: only a file its decoder
reads without repair is a frame. A JPEG that libjpeg would warn about (truncated, its tail zeroed with or
without the EOI marker kept, scan bytes overwritten), a PNG with a bad chunk CRC or broken data, or any file
that does not decode yields image=None with meta["error"] naming the file and what the decoder said, which
the pipeline turns into a corrupt_frame fail-safe verdict, never an OK or a model NG.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError
from foundation.images import load_image_rgb
from inspector.acquisition.base import Frame, PacedSource
from inspector.config import FolderCamera


class FolderSource(PacedSource):
    """Images matching `pattern` in `path`, in sorted name order, once or looping, at `fps` (0 = as consumed)."""

    def __init__(self, cfg: FolderCamera) -> None:
        super().__init__(cfg.fps)
        self._cfg = cfg
        self._paths: list[Path] = []
        self._corrupt = 0

    def open(self) -> None:
        """List the folder; a missing or empty folder is an operator error."""
        folder = Path(self._cfg.path)
        if not folder.is_dir():
            raise DataError(f"camera.path = {folder} is not a folder; point it at a folder of images")
        self._paths = sorted(p for p in folder.glob(self._cfg.pattern) if p.is_file())
        if not self._paths:
            raise DataError(
                f"camera.path = {folder} has no files matching camera.pattern = {self._cfg.pattern!r}; "
                "fix the pattern or add images"
            )

    def frames(self) -> Iterator[Frame]:
        """Yield one Frame per file; an undecodable file yields image=None with meta["error"] naming it."""
        self._start_run()
        while True:
            for path in self._paths:
                if not self._pace():
                    return
                meta: dict[str, Any] = {"source": "folder", "path": str(path)}
                image: np.ndarray | None
                try:
                    image = load_image_rgb(path)
                except DataError as exc:
                    image, meta["error"] = None, str(exc)
                    self._corrupt += 1
                yield Frame(self._next_id(), time.time(), image, meta)
            if not self._cfg.loop:
                return

    def close(self) -> None:
        """Nothing to release; kept for the Source protocol."""
        self._paths = []

    def describe(self) -> dict[str, Any]:
        """Folder, file count and progress for the status topic."""
        return {
            "type": "folder",
            "path": str(self._cfg.path),
            "files": len(self._paths),
            "frames": self.frames_produced,
            "corrupt": self._corrupt,
            "connected": bool(self._paths),
            "reconnects": 0,
        }

