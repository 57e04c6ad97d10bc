"""Replay a video file as camera frames through OpenCV's VideoCapture (FFmpeg).

VideoCapture reports no decode error: FFmpeg conceals a damaged packet (a frame with grey or smeared blocks,
judged as if intact) or drops it, and a failed read looks like the end of the file. So:

- Motion-JPEG (fourcc MJPG) is read as packets and each packet decoded like an image file
  (foundation.images: strict libjpeg check, then OpenCV's decode, as training decodes JPEGs): a packet the
  decoder would have to repair yields image=None with meta["error"], a corrupt_frame verdict.
- Any codec: a pass over the file that ends before the container's frame count (a file cut short, packets
  dropped) ends with one frame with image=None and meta["error"].
- Other codecs (H.264, MPEG-4, ...): a damaged packet that FFmpeg conceals gives no signal and is judged as
  decoded. Replay MJPG or an image folder where a damaged frame must fail safe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from foundation.errors import DataError
from foundation.images import decode_image_rgb
from inspector.acquisition.base import Frame, PacedSource
from inspector.config import VideoCamera


class VideoSource(PacedSource):
    """Frames of a video file, once or looping, at `fps` (0 = as fast as consumed)."""

    def __init__(self, cfg: VideoCamera) -> None:
        super().__init__(cfg.fps)
        self._cfg = cfg
        self._cap: cv2.VideoCapture | None = None
        self._packets = False  # read() returns MJPG packets, decoded here, instead of FFmpeg's frames
        self._frame_count = 0  # the container's frame count; 0 when it has none

    def open(self) -> None:
        """Open the file; a missing or undecodable file is an operator error."""
        path = Path(self._cfg.path)
        if not path.is_file():
            raise DataError(f"camera.path = {path} does not exist; point it at a video file")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            cap.release()
            raise DataError(f"camera.path = {path} cannot be opened as a video; use a format OpenCV decodes")
        fourcc = (int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little").upper()
        self._packets = fourcc == b"MJPG" and cap.set(cv2.CAP_PROP_FORMAT, -1)  # -1: raw packets
        self._frame_count = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        self._cap = cap

    def frames(self) -> Iterator[Frame]:
        """Yield decoded frames (image=None for a damaged MJPG packet or a pass cut short of the frame count);
        at the end rewind when looping, else stop."""
        if self._cap is None:
            raise DataError("video source used before open(); call open() first")
        cap = self._cap
        self._start_run()
        read = 0  # frames read in this pass over the file
        while self._pace():
            ok, data = cap.read()
            meta: dict[str, Any] = {"source": "video", "path": str(self._cfg.path),
                                    "pos_ms": cap.get(cv2.CAP_PROP_POS_MSEC)}
            if ok:
                read += 1
                yield self._frame(data, read, meta)
                continue
            if read < self._frame_count:
                meta["error"] = (f"cannot read video {self._cfg.path}: it ended after {read} of its "
                                 f"{self._frame_count} frames (file cut short or damaged)")
                yield Frame(self._next_id(), time.time(), None, meta)
            if not self._cfg.loop or read == 0:
                return
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            read = 0

    def _frame(self, data: np.ndarray, n: int, meta: dict[str, Any]) -> Frame:
        """The Frame for what read() returned as the pass's n-th frame: a BGR frame, or an MJPG packet."""
        image: np.ndarray | None = None
        if not self._packets:
            image = cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
        else:
            try:
                image = decode_image_rgb(data.tobytes(), f"video {self._cfg.path} frame {n}")
            except DataError as exc:
                meta["error"] = str(exc)
        return Frame(self._next_id(), time.time(), image, meta)

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
