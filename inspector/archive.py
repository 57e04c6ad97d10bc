"""Best-effort archive of NG (and sampled OK) frames: image PNG, heat-map PNG and verdict JSON, size-capped.

Runs on its own thread behind a bounded queue so disk latency never reaches the hot path: when the queue is
full the frame is not archived and `skipped` counts it (verdicts are guaranteed, the archive is not).
Layout: <archive.dir>/<sku>/<YYYY-MM-DD>/<HHMMSS.mmm>_<frame id>_<ok|ng>{.png,_heat.png,.json} (UTC).
When the folder grows past archive.max_mb the oldest files are deleted first; the reviews folder
(<archive.dir>/reviews, inspector/reviews.py) is neither counted nor deleted. The latest NG parts are listed by
`recent_ng` (for the station page's strip) and every part by `parts` (the review queue) without walking the folder.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from foundation.log import get_logger
from inspector.config import REVIEWS_DIR

log = get_logger(__name__)

RECENT_NG = 100  # NG parts remembered for recent_ng()


@dataclass
class ArchiveItem:
    """What one archived frame needs: the verdict as JSON data, the frame and the anomaly map."""

    sku: str
    frame_id: int
    t_acquired: float
    ok: bool
    verdict: dict[str, Any]
    image_u8_hwc: np.ndarray | None
    map_f32_hw: np.ndarray | None
    map_rect: tuple[int, int, int, int] | None = None


def heatmap_overlay(image_u8_hwc: np.ndarray, map_f32_hw: np.ndarray,
                    map_rect: tuple[int, int, int, int] | None) -> np.ndarray:
    """JET-coloured anomaly map blended over the frame rectangle it covers (x, y, w, h; None = the whole frame),
    clipped to the frame (a letterboxed map's padding lies outside it); returned as BGR."""
    bgr = cv2.cvtColor(image_u8_hwc, cv2.COLOR_RGB2BGR)
    x, y, w, h = map_rect if map_rect is not None else (0, 0, bgr.shape[1], bgr.shape[0])
    heat_u8 = np.clip(cv2.resize(map_f32_hw, (w, h), interpolation=cv2.INTER_LINEAR) * 255.0, 0, 255)
    coloured = cv2.applyColorMap(heat_u8.astype(np.uint8), cv2.COLORMAP_JET)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, bgr.shape[1]), min(y + h, bgr.shape[0])
    if x1 > x0 and y1 > y0:
        inside = coloured[y0 - y:y1 - y, x0 - x:x1 - x]
        bgr[y0:y1, x0:x1] = cv2.addWeighted(bgr[y0:y1, x0:x1], 0.5, inside, 0.5, 0.0)
    return bgr


class Archive:
    """Writer thread + bounded queue + oldest-first size cap over one archive folder."""

    def __init__(self, root: Path, *, max_mb: float, ok_sample_rate: float = 0.0, queue_depth: int = 32,
                 seed: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.ok_sample_rate = ok_sample_rate
        self.saved = 0
        self.skipped = 0
        self.errors = 0
        self.deleted = 0
        self._rng = random.Random(seed)
        self._queue: queue.Queue[ArchiveItem | None] = queue.Queue(maxsize=queue_depth)
        self._files: deque[tuple[Path, int]] = deque()
        self._recent_ng: deque[Path] = deque(maxlen=RECENT_NG)
        self._bytes = 0
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    def start(self) -> Archive:
        """Index what is already on disk (oldest first; the reviews folder is not the archive's) and start the
        writer thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        existing = [(p.stat().st_mtime, p) for p in self.root.rglob("*")
                    if p.is_file() and p.relative_to(self.root).parts[0] != REVIEWS_DIR]
        for _, path in sorted(existing):
            size = path.stat().st_size
            self._files.append((path, size))
            self._bytes += size
            if path.name.endswith("_ng.json"):
                self._recent_ng.append(path)
        self._thread.start()
        return self

    def wants(self, ok: bool) -> bool:
        """True for every NG frame and for a random ok_sample_rate share of OK frames."""
        return not ok or (self.ok_sample_rate > 0 and self._rng.random() < self.ok_sample_rate)

    def submit(self, item: ArchiveItem) -> bool:
        """Queue a frame for archiving without blocking; False (and skipped += 1) when the queue is full."""
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.skipped += 1
            return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to timeout_s) and stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def recent_ng(self, limit: int) -> list[Path]:
        """The verdict JSON files of the last `limit` archived NG parts still on disk, newest first."""
        recent = [path for path in reversed(self._recent_ng.copy()) if path.is_file()]  # copy: one C call
        return recent[:limit]

    def parts(self) -> Iterator[Path]:
        """The verdict JSON files of every indexed part (NG and sampled OK), newest first; some may be gone since."""
        return (path for path, _ in reversed(self._files.copy()) if path.suffix == ".json")  # copy: one C call

    def stats(self) -> dict[str, int]:
        """Counters for the status topic."""
        return {"saved": self.saved, "skipped": self.skipped, "errors": self.errors, "deleted": self.deleted,
                "bytes": self._bytes}

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(item)
                self.saved += 1
            except Exception as exc:
                self.errors += 1
                log.warning("archive_write_failed", frame_id=item.frame_id, error=str(exc))

    def _write(self, item: ArchiveItem) -> None:
        """Write the frame's files, then enforce the size cap."""
        stamp = datetime.fromtimestamp(item.t_acquired, UTC)
        folder = self.root / item.sku / stamp.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{stamp.strftime('%H%M%S.%f')[:-3]}_{item.frame_id}_{'ok' if item.ok else 'ng'}"
        written = [self._write_bytes(folder / f"{stem}.json", json.dumps(item.verdict).encode())]
        if item.image_u8_hwc is not None:
            bgr = cv2.cvtColor(item.image_u8_hwc, cv2.COLOR_RGB2BGR)
            written.append(self._write_bytes(folder / f"{stem}.png", _png(bgr)))
            if item.map_f32_hw is not None:
                heat = heatmap_overlay(item.image_u8_hwc, item.map_f32_hw, item.map_rect)
                written.append(self._write_bytes(folder / f"{stem}_heat.png", _png(heat)))
        for path, size in written:
            self._files.append((path, size))
            self._bytes += size
        self._enforce_cap()
        if not item.ok:
            self._recent_ng.append(written[0][0])

    @staticmethod
    def _write_bytes(path: Path, data: bytes) -> tuple[Path, int]:
        path.write_bytes(data)
        return path, len(data)

    def _enforce_cap(self) -> None:
        """Delete the oldest files until the archive is within max_mb."""
        while self._bytes > self.max_bytes and self._files:
            path, size = self._files.popleft()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._bytes -= size
            self.deleted += 1
            parent = path.parent
            if parent != self.root and not any(parent.iterdir()):
                parent.rmdir()


def _png(bgr: np.ndarray) -> bytes:
    """Encode a BGR image as PNG bytes."""
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError("cv2.imencode failed")
    return buf.tobytes()
