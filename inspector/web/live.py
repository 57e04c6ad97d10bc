"""The live view's plumbing: a latest-wins slot filled by the publish thread, the overlay drawn off the hot
path, and the broadcast that hands the newest state and frame to every server-sent-events stream.

Threads: the pipeline's publish thread only `offer`s (a lock and a reference swap); the web's render
thread draws and encodes at most `live_fps` frames per second while a page is open; the server's event
loop streams whatever is newest to each page, so a slow page skips frames and never holds anyone back.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import cv2
import numpy as np

from inspector.archive import heatmap_overlay
from inspector.pipeline import Published

KEEPALIVE_S = 10.0  # an SSE comment this often keeps proxies and the browser from closing an idle stream
MIN_SIDE, MAX_SIDE = 480, 960  # live frames are scaled so their long side is within these (px)
JPEG_QUALITY = 80


class LiveFeed:
    """Latest-wins slot between the publish thread (offer) and the render thread (latest), plus per-SKU counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: Published | None = None
        self._seq = 0
        self._counts: dict[str, Counter[str]] = {}

    def offer(self, item: Published) -> None:
        """Replace the latest verdict and count it for its SKU; O(1), never blocks on a reader."""
        verdict = item.verdict
        with self._lock:
            self._latest = item
            self._seq += 1
            counts = self._counts.setdefault(verdict.sku, Counter())
            counts["frames"] += 1
            counts["ok" if verdict.ok else "ng"] += 1
            if verdict.reason:
                counts["fail_safe"] += 1

    def latest(self) -> tuple[int, Published | None]:
        """The sequence number of the latest offer and the item itself."""
        with self._lock:
            return self._seq, self._latest

    def counts(self) -> dict[str, dict[str, int]]:
        """Frames, OK, NG and fail-safe verdicts per SKU since start."""
        with self._lock:
            return {sku: {k: c[k] for k in ("frames", "ok", "ng", "fail_safe")} for sku, c in self._counts.items()}


def render_overlay(item: Published) -> tuple[bytes, tuple[int, int]] | None:
    """JPEG of the frame with the heat map, the binarised mask's outline and the defect boxes; None without image.

    The frame is scaled so its long side lies within MIN_SIDE..MAX_SIDE, so lines stay crisp on small frames
    and large frames stay cheap to send. Returns the JPEG bytes and (width, height).
    """
    image = item.image_u8_hwc
    if image is None:
        return None
    rect = item.map_rect
    if item.map_f32_hw is not None:
        bgr = heatmap_overlay(image, item.map_f32_hw, rect)
    else:
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    long_side = max(h, w)
    scale = MIN_SIDE / long_side if long_side < MIN_SIDE else min(1.0, MAX_SIDE / long_side)
    if scale != 1.0:
        interp = cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA
        bgr = cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=interp)
    thickness = max(2, round(bgr.shape[0] / 240))
    if item.map_f32_hw is not None and item.pixel_threshold is not None:
        x, y, rw, rh = rect if rect is not None else (0, 0, w, h)
        mask = (item.map_f32_hw > item.pixel_threshold).astype(np.uint8)
        mask = cv2.resize(mask, (max(1, round(rw * scale)), max(1, round(rh * scale))),
                          interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(round(x * scale), round(y * scale)))
        cv2.drawContours(bgr, contours, -1, (255, 255, 255), thickness)
    box_colour = (0, 255, 255) if item.verdict.ok else (0, 0, 255)  # BGR: yellow on OK parts, red on NG
    margin = 2 * thickness  # boxes sit just outside the region, so the mask outline inside stays visible
    for r in item.verdict.regions:
        top_left = (round(r.x * scale) - margin, round(r.y * scale) - margin)
        bottom_right = (round((r.x + r.w) * scale) - 1 + margin, round((r.y + r.h) * scale) - 1 + margin)
        cv2.rectangle(bgr, top_left, bottom_right, box_colour, thickness)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding of the live frame failed")
    return jpeg.tobytes(), (bgr.shape[1], bgr.shape[0])


def data_url(jpeg: bytes) -> str:
    """A JPEG as a data: URL the page can show without a second request."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Broadcast:
    """Newest "state" and "frame" events, written by the render thread, streamed to every page as SSE.

    Each stream sends an event kind only when its sequence number moved, so a page that cannot keep up
    gets the newest event next and skips the ones in between (latest wins per page).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._events: dict[str, tuple[int, str]] = {"state": (0, ""), "frame": (0, "")}
        self.clients = 0
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the server's event loop (called there, at start-up)."""
        self._loop = loop
        self._changed = asyncio.Event()

    def put(self, kind: str, data: str) -> None:
        """Store the newest event of a kind (from any thread) and wake the streams."""
        seq, _ = self._events[kind]
        self._events[kind] = (seq + 1, data)
        self._wake_threadsafe()

    def close(self) -> None:
        """End every stream (the server is stopping)."""
        self.closed = True
        self._wake_threadsafe()

    def _wake_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        """On the loop: release the streams waiting on the current event and give later waiters a fresh one."""
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    async def stream(self) -> AsyncIterator[str]:
        """One page's event stream: the newest state and frame whenever they change, a keep-alive otherwise."""
        self.clients += 1
        sent = {"state": 0, "frame": 0}
        try:
            yield "retry: 2000\n\n"
            while not self.closed:
                changed = self._changed
                assert changed is not None, "Broadcast.bind() runs at server start-up"
                for kind, (seq, data) in list(self._events.items()):
                    if seq > sent[kind]:
                        sent[kind] = seq
                        yield f"event: {kind}\ndata: {data}\n\n"
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self.clients -= 1


def frame_event(seq: int, item: Published) -> dict[str, Any]:
    """The "frame" event's body: the verdict as published and the overlay as a data URL (None without image)."""
    rendered = render_overlay(item)
    event: dict[str, Any] = {"seq": seq, "verdict": item.verdict.model_dump(mode="json"), "image": None}
    if rendered is not None:
        jpeg, (width, height) = rendered
        event |= {"image": data_url(jpeg), "width": width, "height": height}
    return event
