"""Replay images from a folder as camera frames: commissioning, regression runs and the demo.

Every file is checked by Pillow (LOAD_TRUNCATED_IMAGES off: a truncated or damaged file raises) before
OpenCV decodes it as training did: OpenCV/libjpeg decode half a JPEG into a frame with a grey lower half
and only print a warning, which must be a corrupt_frame fail-safe, never an OK verdict.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

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
                    check_complete(path)
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


def check_complete(path: Path) -> None:
    """DataError naming the file when Pillow finds it truncated or damaged; formats Pillow does not know pass."""
    try:
        with Image.open(path) as image:
            image.load()
    except UnidentifiedImageError:
        return  # not an image Pillow reads (or no image at all): OpenCV's decode decides
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read image {path}: damaged or truncated ({exc})") from None
