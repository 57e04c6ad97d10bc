"""Replay a video file as camera frames through OpenCV's VideoCapture."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2

from foundation.errors import DataError
from inspector.acquisition.base import Frame, PacedSource
from inspector.config import VideoCamera


class VideoSource(PacedSource):
    """Frames of a video file, once or looping, at `fps` (0 = as fast as consumed)."""

    def __init__(self, cfg: VideoCamera) -> None:
        super().__init__(cfg.fps)
        self._cfg = cfg
        self._cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        """Open the file; a missing or undecodable file is an operator error."""
        path = Path(self._cfg.path)
        if not path.is_file():
            raise DataError(f"camera.path = {path} does not exist; point it at a video file")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            cap.release()
            raise DataError(f"camera.path = {path} cannot be opened as a video; use a format OpenCV decodes")
        self._cap = cap

    def frames(self) -> Iterator[Frame]:
        """Yield decoded frames; at the end rewind when looping, else stop."""
        if self._cap is None:
            raise DataError("video source used before open(); call open() first")
        self._start_run()
        rewound_empty = False
        while self._pace():
            ok, bgr = self._cap.read()
            if not ok:
                if not self._cfg.loop or rewound_empty:
                    return
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                rewound_empty = True
                continue
            rewound_empty = False
            meta = {"source": "video", "path": str(self._cfg.path), "pos_ms": self._cap.get(cv2.CAP_PROP_POS_MSEC)}
            yield Frame(self._next_id(), time.time(), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), meta)

    def close(self) -> None:
        """Release the decoder."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> dict[str, Any]:
        """File and progress for the status topic."""
        return {
            "type": "video",
            "path": str(self._cfg.path),
            "frames": self.frames_produced,
            "connected": self._cap is not None,
            "reconnects": 0,
        }
