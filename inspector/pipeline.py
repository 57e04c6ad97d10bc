"""Frame -> engine -> verdict on three threads joined by bounded queues; every frame gets exactly one verdict.

Threads: acquisition (pulls frames from the Source), inference (preprocess, micro-batch, infer, decide) and
publish (hands verdicts to the sink, feeds stats and the archive). A frame the pipeline cannot inspect —
queue full, deadline passed, engine error, corrupt or wrong-size image, shutdown timeout — gets a fail-safe
verdict (ok=False, or ok=True with service.fail_safe="ok") carrying a `reason`; nothing is dropped.

No thread dies of its input: an exception from one batch (preprocess, engine, decider) fail-safes that
batch's frames, one from the sink, stats or archive is logged and counted (`publish_errors`) and the next
verdict goes on. A source that raises ends the run (`source_error`), and the daemon exits non-zero.

Verdicts leave in frame order, except that a queue_full fail-safe is published at once (it overtakes the
frames still queued for inference); consumers key on frame_id, never on arrival order.

An optional gate (the Publisher) is asked before each frame is pulled: while it names a reason (verdicts
that could be neither stored nor sent), acquisition holds (`not_ready`, the `on_hold` hook is told) and the
camera/driver buffers or drops frames, as when paused; the gate also counts every frame pulled, so a crash
leaves a count of what was owed (inspector/spool.py, the journal).

Pause stops the acquisition thread from pulling frames (the camera/driver buffers or drops them, as it
would with no consumer); frames already pulled are still inspected and published. Resume continues pulling.
A SKU changeover swaps the ActiveSku between two batches, so no frame is inspected half-way through it; the
engine it retires is closed then (a TensorRT engine frees its device memory), as is one swapped in and replaced
before any batch used it.
An optional `on_published` hook sees every published verdict with its frame, map, model input and calibration
(the station page's live view and metrics, the drift watch, the trend); it runs on the publish thread, so it only
keeps references and counts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engines.runtime.base import Engine, close_engine
from engines.tiled import infer_tiled
from foundation.log import get_logger
from inspector.acquisition import Frame, Source
from inspector.archive import Archive, ArchiveItem
from inspector.config import LineConfig, ServiceConfig
from inspector.decider import Decider, Decision, Placement
from inspector.verdict import Verdict, new_run_id
from tdad.manifest import TilingRecord
from tdad.preprocess import Geometry, ResizeMode, resize_to_model
from tdad.tiling import scale_image

if TYPE_CHECKING:
    from calibration.thresholds import Calibration

log = get_logger(__name__)

VerdictSink = Callable[[Verdict, bytes | None], None]
HOLD_POLL_S = 0.2  # how often a held acquisition asks the gate again


class Gate(Protocol):
    """What acquisition asks before each frame (the Publisher): may one more verdict be accounted for?"""

    def not_ready(self) -> str | None:
        """None when a frame may be taken, else why not."""

    def acquired(self) -> None:
        """Count one frame pulled from the source."""

# Fail-safe reasons (the `reason` field of a verdict that was not decided by the model).
QUEUE_FULL = "queue_full"
DEADLINE = "deadline_missed"
ENGINE_ERROR = "engine_error"
CORRUPT_FRAME = "corrupt_frame"
INVALID_FRAME = "invalid_frame"
WRONG_SIZE = "wrong_size"
SHUTDOWN = "shutdown_timeout"


class FrameRejected(Exception):
    """A frame that cannot be inspected; `reason` becomes the fail-safe verdict's reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class ActiveSku:
    """Everything one SKU needs at inspection time: name, ROI, loaded engine, its decider, resize mode and
    tiling (None: the whole ROI becomes one model input)."""

    name: str
    engine: Engine
    decider: Decider
    roi: tuple[int, int, int, int] | None = None
    resize: ResizeMode = "stretch"
    tiling: TilingRecord | None = None
    version: str = ""  # its version in the SKU store ("" when not run from it; inspector/activation.py)
    content_hash: str = ""  # that version's content hash (else its meta.json's sha256): what runs, for status


def preprocess(image_u8_hwc: Any, roi: tuple[int, int, int, int] | None, size: int,
               expected_hw: tuple[int, int] | None, resize: ResizeMode = "stretch",
               tiling: TilingRecord | None = None) -> tuple[np.ndarray, Placement]:
    """Validate, crop the ROI (x, y, w, h) and resize to size x size RGB uint8 by the SKU's resize mode, or for
    a tiled SKU scale it by the SKU's scale (tdad.tiling, tiled later); raise FrameRejected if unusable."""
    if image_u8_hwc is None:
        raise FrameRejected(CORRUPT_FRAME, "source delivered no image (unreadable or truncated)")
    if not isinstance(image_u8_hwc, np.ndarray) or image_u8_hwc.dtype != np.uint8 or image_u8_hwc.ndim != 3 \
            or image_u8_hwc.shape[2] != 3 or min(image_u8_hwc.shape[:2]) < 1:
        shape = getattr(image_u8_hwc, "shape", None)
        dtype = getattr(image_u8_hwc, "dtype", type(image_u8_hwc).__name__)
        raise FrameRejected(INVALID_FRAME, f"expected uint8 HxWx3 RGB, got shape={shape} dtype={dtype}")
    h, w = image_u8_hwc.shape[:2]
    if expected_hw is not None and (h, w) != expected_hw:
        raise FrameRejected(WRONG_SIZE, f"frame is {w}x{h}, the stream is {expected_hw[1]}x{expected_hw[0]}")
    x, y, rw, rh = roi if roi is not None else (0, 0, w, h)
    if x < 0 or y < 0 or rw < 1 or rh < 1 or x + rw > w or y + rh > h:
        raise FrameRejected(WRONG_SIZE, f"ROI {(x, y, rw, rh)} does not fit a {w}x{h} frame")
    if tiling is not None:
        scaled = scale_image(image_u8_hwc[y:y + rh, x:x + rw], tiling.scale)
        return scaled, Placement(origin_xy=(x, y), scale_xy=(rw / scaled.shape[1], rh / scaled.shape[0]))
    crop = resize_to_model(image_u8_hwc[y:y + rh, x:x + rw], size, resize)
    geometry = Geometry.fit(rh, rw, size, resize)
    origin_x, origin_y = geometry.frame_origin_xy(rh, rw)
    return crop, Placement(origin_xy=(x + origin_x, y + origin_y), scale_xy=geometry.frame_scale_xy(rh, rw))


def map_rect(placement: Placement, map_hw: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The frame rectangle (x, y, w, h) an anomaly map covers: the ROI when stretched, a part of it when cropped,
    more than it (padding) when letterboxed; what overlays draw the map onto."""
    (x, y), (sx, sy) = placement.origin_xy, placement.scale_xy
    return round(x), round(y), max(1, round(map_hw[1] * sx)), max(1, round(map_hw[0] * sy))


class Stats:
    """Thread-safe counters and latency/fps windows for status messages and the final summary."""

    def __init__(self, window: int = 4096, fps_window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.acquired = 0
        self.frames = 0
        self.ok = 0
        self.ng = 0
        self.publish_errors = 0
        self.fail_safe: Counter[str] = Counter()
        self._latency_ms: deque[float] = deque(maxlen=window)
        self._published_at: deque[float] = deque()
        self._fps_window_s = fps_window_s
        self._t0 = time.monotonic()

    def count_acquired(self) -> None:
        """One frame pulled from the source."""
        with self._lock:
            self.acquired += 1

    def count_publish_error(self) -> None:
        """One verdict the sink raised on (logged; the verdict was not handed over)."""
        with self._lock:
            self.publish_errors += 1

    def record(self, verdict: Verdict, total_ms: float) -> None:
        """One verdict published."""
        now = time.monotonic()
        with self._lock:
            self.frames += 1
            if verdict.reason:
                self.fail_safe[verdict.reason.split(":", 1)[0]] += 1
            if verdict.ok:
                self.ok += 1
            else:
                self.ng += 1
            self._latency_ms.append(total_ms)
            self._published_at.append(now)
            while self._published_at and now - self._published_at[0] > self._fps_window_s:
                self._published_at.popleft()

    def snapshot(self) -> dict[str, Any]:
        """Counters, fps over the last window and p50/p99 camera-to-publish latency (ms)."""
        with self._lock:
            lat = np.asarray(self._latency_ms, dtype=np.float64)
            now = time.monotonic()
            recent = [t for t in self._published_at if now - t <= self._fps_window_s]
            span = min(self._fps_window_s, now - self._t0)
            return {
                "acquired": self.acquired,
                "frames": self.frames,
                "ok": self.ok,
                "ng": self.ng,
                "fail_safe": dict(self.fail_safe),
                "publish_errors": self.publish_errors,
                "fps": round(len(recent) / span, 2) if span > 0 else 0.0,
                "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
                "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            }


@dataclass
class _Job:
    """A frame on its way through the pipeline with the timestamps of its stages (epoch seconds)."""

    frame: Frame
    t_enqueued: float
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class _Out:
    """A verdict ready to publish, plus what the archive and viewers may want (map, model input, calibration)."""

    verdict: Verdict
    mask_png: bytes | None
    frame: Frame
    map_f32_hw: np.ndarray | None = None
    map_rect: tuple[int, int, int, int] | None = None
    pixel_threshold: float | None = None
    input_u8_hwc: np.ndarray | None = None
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Published:
    """A verdict just handed to the sink, with what a viewer needs to draw it (the on_published hook's argument).

    The hook runs on the publish thread: it must only keep references (no encoding, no I/O).
    """

    verdict: Verdict
    image_u8_hwc: np.ndarray | None
    map_f32_hw: np.ndarray | None
    map_rect: tuple[int, int, int, int] | None  # x, y, w, h in frame px that the map covers (see map_rect())
    pixel_threshold: float | None
    input_u8_hwc: np.ndarray | None = None  # what the engine saw: the ROI resized (or scaled, for a tiled SKU)
    calibration: Calibration | None = None  # the thresholds the verdict was decided with (None: fail-safe)


_STOP = object()


class Pipeline:
    """Runs a Source through the active SKU's engine and decider into a verdict sink (normally the Publisher)."""

    def __init__(
        self,
        source: Source,
        sku: ActiveSku,
        sink: VerdictSink,
        service: ServiceConfig | None = None,
        *,
        line: LineConfig | None = None,
        batch: int = 1,
        archive: Archive | None = None,
        run_id: str | None = None,
        on_published: Callable[[Published], None] | None = None,
        gate: Gate | None = None,
        on_hold: Callable[[str | None], None] | None = None,
    ) -> None:
        """service: queue depth, per-frame deadline and fail-safe policy; line: ids stamped on verdicts;
        batch: frames per engine call (engine.batch); gate / on_hold: see the module docstring."""
        service = service or ServiceConfig()
        line = line or LineConfig()
        queue_depth = service.queue_depth
        self.source = source
        self.run_id = run_id or new_run_id()
        self.sink = sink
        self.batch = max(1, batch)
        self.frame_timeout_s = service.frame_timeout_ms / 1000.0
        self.fail_safe_ok = service.fail_safe == "ok"
        self.line_id = line.line_id
        self.station_id = line.station_id
        self.archive = archive
        self.on_published = on_published
        self.gate = gate
        self.on_hold = on_hold
        self.not_ready: str | None = None  # why acquisition holds, while it does
        self.stats = Stats()
        self._sku = sku
        self._next_sku: ActiveSku | None = None
        self._sku_lock = threading.Lock()
        self._inbox: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_depth))
        self._outbox: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_depth) * 4)
        self._resumed = threading.Event()
        self._resumed.set()
        self._stopping = threading.Event()
        self.source_done = threading.Event()
        self.source_error: str | None = None
        self.finished = threading.Event()
        self._expected_hw: tuple[int, int] | None = None
        self._in_flight: list[_Job] = []
        self._abandoned = False
        self._heartbeat = {"inference": time.monotonic(), "publish": time.monotonic()}
        self._threads = [
            threading.Thread(target=self._acquire_loop, name="acquisition", daemon=True),
            threading.Thread(target=self._infer_loop, name="inference", daemon=True),
            threading.Thread(target=self._publish_loop, name="publish", daemon=True),
        ]

    # ---- control -------------------------------------------------------------------------------------------

    @property
    def sku(self) -> ActiveSku:
        """The SKU the next batch will be inspected with (a changeover waiting for that batch included)."""
        return self._next_sku or self._sku

    @property
    def paused(self) -> bool:
        """True while acquisition is paused."""
        return not self._resumed.is_set()

    def start(self) -> None:
        """Start the three threads; the source must already be open."""
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Stop pulling frames; frames already pulled are still inspected and published."""
        self._resumed.clear()

    def resume(self) -> None:
        """Continue pulling frames."""
        self._resumed.set()

    def swap_sku(self, sku: ActiveSku) -> None:
        """Inspect with `sku` from the next batch on (atomic between batches; the engine must be warm)."""
        with self._sku_lock:
            replaced, self._next_sku = self._next_sku, sku
            current = self._sku
        if replaced is not None:  # a changeover overtaken before its first batch
            self._retire(replaced, sku, current)

    def _retire(self, old: ActiveSku, *kept: ActiveSku) -> None:
        """Close the engine of a SKU no batch will use again (unless a kept SKU shares it); a failure is logged."""
        if any(old.engine is sku.engine for sku in kept):
            return
        try:
            close_engine(old.engine)
        except Exception:
            log.exception("engine_close_failed", sku=old.name)

    def queued(self) -> int:
        """Frames acquired and waiting for inference."""
        return self._inbox.qsize()

    def healthy(self, stuck_after_s: float) -> bool:
        """False when a thread died or the inference/publish thread has not come round for stuck_after_s."""
        if self.finished.is_set():
            return True
        now = time.monotonic()
        alive = all(t.is_alive() for t in self._threads[1:])
        return alive and all(now - beat < stuck_after_s for beat in self._heartbeat.values())

    def stop(self, drain_timeout_s: float) -> bool:
        """Stop acquisition and drain: in-flight frames get verdicts; True if drained within the timeout."""
        deadline = time.monotonic() + drain_timeout_s
        self._stopping.set()
        self._resumed.set()
        try:
            self.source.stop()
        except Exception as exc:
            log.warning("source_stop_failed", error=str(exc))
        acq, inf, pub = self._threads
        if not acq.is_alive() and not inf.is_alive() and not pub.is_alive():
            self.finished.set()
            return True
        acq.join(max(0.0, deadline - time.monotonic()))
        if acq.is_alive():
            log.error("acquisition_stuck_on_stop", detail="source.frames() did not return after stop()")
            with contextlib.suppress(queue.Full):
                self._inbox.put(_STOP, timeout=max(0.1, deadline - time.monotonic()))
        inf.join(max(0.0, deadline - time.monotonic()))
        drained = not inf.is_alive()
        if not drained:
            self._abandon_in_flight()
        pub.join(max(0.1, deadline - time.monotonic()))
        self.finished.set()
        log.info("pipeline_stopped", drained=drained and not pub.is_alive(), **self.stats.snapshot())
        return drained

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a finite source is exhausted and its last verdict published."""
        return self.finished.wait(timeout_s)

    # ---- verdicts --------------------------------------------------------------------------------------------

    def _verdict(self, job: _Job, sku: ActiveSku, decision: Decision | None, reason: str | None,
                 detail: str | None = None) -> Verdict:
        """Build the verdict for one frame: the model's decision, or the fail-safe for `reason`."""
        frame = job.frame
        camera_ts = frame.meta.get("camera_ts")
        fields: dict[str, Any] = {
            "frame_id": frame.id, "run_id": self.run_id, "t_acquired": frame.t_acquired, "sku": sku.name,
            "camera_ts": float(camera_ts) if isinstance(camera_ts, int | float) else None,
            "engine": sku.engine.backend, "line": self.line_id, "station": self.station_id,
            "latency_ms": dict(job.timings_ms),
        }
        if decision is not None:
            fields |= {"ok": decision.ok, "score": decision.score, "threshold": decision.threshold,
                       "regions": decision.regions}
        else:
            fields |= {"ok": self.fail_safe_ok, "score": None,
                       "threshold": float(sku.decider.calibration.image_threshold),
                       "reason": f"{reason}: {detail}" if detail else reason}
        return Verdict(**fields)

    def _fail(self, job: _Job, reason: str, detail: str) -> _Out:
        """A fail-safe verdict for a frame that could not be inspected."""
        log.warning("fail_safe", frame_id=job.frame.id, reason=reason, detail=detail)
        return _Out(self._verdict(job, self._sku, None, reason, detail), None, job.frame)

    # ---- threads ---------------------------------------------------------------------------------------------

    def _acquire_loop(self) -> None:
        """Pull frames while not paused; a full inbox turns the frame into a queue_full fail-safe."""
        frames: Iterator[Frame] = iter(self.source.frames())
        try:
            while not self._stopping.is_set():
                self._resumed.wait()
                if self._stopping.is_set() or not self._wait_ready():
                    break
                frame = next(frames, None)
                if frame is None:
                    break
                self.stats.count_acquired()
                if self.gate is not None:
                    self.gate.acquired()
                job = _Job(frame, time.time())
                try:
                    self._inbox.put_nowait(job)
                except queue.Full:
                    self._outbox.put(self._fail(job, QUEUE_FULL, f"inference queue full ({self._inbox.maxsize})"))
        except Exception as exc:
            self.source_error = f"{type(exc).__name__}: {exc}"
            log.exception("source_failed", error=str(exc))
        finally:
            self.source_done.set()
            self._inbox.put(_STOP)

    def _wait_ready(self) -> bool:
        """Hold while the gate names a reason; False when the pipeline stops meanwhile."""
        reason = self.gate.not_ready() if self.gate is not None else None
        if reason is None:
            return True
        held = time.monotonic()
        self._hold(reason)
        log.error("not_ready", reason=reason, detail="acquisition holds until the verdicts waiting can be stored "
                                                     "or sent")
        while reason is not None:
            if self._stopping.wait(HOLD_POLL_S):
                return False
            reason = self.gate.not_ready() if self.gate is not None else None
        self._hold(None)
        log.info("ready_again", held_s=round(time.monotonic() - held, 2))
        return True

    def _hold(self, reason: str | None) -> None:
        """Record (and report through on_hold) why acquisition holds, or that it no longer does."""
        self.not_ready = reason
        if self.on_hold is not None:
            try:
                self.on_hold(reason)
            except Exception:
                log.exception("on_hold_failed")

    def _next_batch(self) -> list[_Job] | None:
        """Block for one job, then take what is already queued up to the batch size (never waits to fill)."""
        while True:
            self._heartbeat["inference"] = time.monotonic()
            try:
                first = self._inbox.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        if first is _STOP:
            return None
        jobs = [first]
        while len(jobs) < self.batch:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._inbox.put(_STOP)
                break
            jobs.append(item)
        return jobs

    def _infer_loop(self) -> None:
        """Preprocess, batch-infer and decide; every job leaves as exactly one _Out."""
        try:
            while (jobs := self._next_batch()) is not None:
                retired = None
                with self._sku_lock:
                    if self._next_sku is not None:
                        retired, self._sku, self._next_sku = self._sku, self._next_sku, None
                        self._expected_hw = None
                        log.info("sku_active", sku=self._sku.name)
                if retired is not None:  # its last batch is done: this thread is the only one that ran it
                    self._retire(retired, self._sku)
                try:
                    outs = self._inspect(jobs, self._sku)
                except Exception as exc:  # preprocess or decider raised on something unforeseen
                    log.exception("inspect_failed", sku=self._sku.name, batch=len(jobs))
                    self._in_flight = []
                    outs = [self._fail(job, ENGINE_ERROR, f"{type(exc).__name__}: {exc}") for job in jobs]
                for out in outs:
                    if not self._abandoned:
                        self._outbox.put(out)
        finally:
            self._outbox.put(_STOP)

    def _inspect(self, jobs: list[_Job], sku: ActiveSku) -> list[_Out]:
        """Turn one batch of jobs into outputs, fail-safe for each job that cannot be inspected."""
        outs: dict[int, _Out] = {}
        ready: list[tuple[int, np.ndarray, Placement]] = []
        t_start = time.time()
        for i, job in enumerate(jobs):
            job.timings_ms["queue"] = (t_start - job.frame.t_acquired) * 1000.0
            if t_start - job.frame.t_acquired > self.frame_timeout_s:
                outs[i] = self._fail(job, DEADLINE, f"waited {job.timings_ms['queue']:.0f} ms before inference")
                continue
            t0 = time.perf_counter()
            try:
                image, placement = preprocess(job.frame.image, sku.roi, sku.engine.image_size, self._expected_hw,
                                              sku.resize, sku.tiling)
            except FrameRejected as exc:
                detail = job.frame.meta.get("error") if exc.reason == CORRUPT_FRAME else None
                outs[i] = self._fail(job, exc.reason, str(detail or exc))
                continue
            if self._expected_hw is None:
                self._expected_hw = job.frame.image.shape[:2]
            job.timings_ms["preprocess"] = (time.perf_counter() - t0) * 1000.0
            ready.append((i, image, placement))
        if ready:
            self._in_flight = [jobs[i] for i, _, _ in ready]
            t0 = time.perf_counter()
            try:
                maps = self._maps(sku, [img for _, img, _ in ready])
            except Exception as exc:
                log.exception("engine_failed", sku=sku.name, batch=len(ready))
                for i, _, _ in ready:
                    outs[i] = self._fail(jobs[i], ENGINE_ERROR, f"{type(exc).__name__}: {exc}")
                ready = []
            infer_ms = (time.perf_counter() - t0) * 1000.0
            for k, (i, image, placement) in enumerate(ready):
                job = jobs[i]
                job.timings_ms["infer"] = infer_ms
                t0 = time.perf_counter()
                calibration = sku.decider.calibration
                decision = sku.decider.decide(maps[k], placement)
                job.timings_ms["decide"] = (time.perf_counter() - t0) * 1000.0
                outs[i] = _Out(self._verdict(job, sku, decision, None), decision.mask_png, job.frame, maps[k],
                               map_rect(placement, maps[k].shape), float(calibration.pixel_threshold),
                               image, calibration)
            self._in_flight = []
        return [outs[i] for i in range(len(jobs))]

    def _maps(self, sku: ActiveSku, images: list[np.ndarray]) -> list[np.ndarray]:
        """One float32 map per image: one engine call on the batch, or for a tiled SKU every image's tiles in
        chunks of at most the engine batch, stitched (engines.tiled.infer_tiled); ValueError on a bad output."""
        if sku.tiling is not None:
            maps = infer_tiled(sku.engine, images, sku.tiling, self.batch)
        else:
            maps = list(np.asarray(sku.engine.infer(np.stack(images)), dtype=np.float32))
        if len(maps) != len(images) or any(m.ndim != 2 or not np.isfinite(m).all() for m in maps):
            shapes = sorted({m.shape for m in maps})
            raise ValueError(f"engine returned {len(maps)} maps of shapes {shapes} for {len(images)} frames "
                             "(non-finite or wrong count)")
        return maps

    def _abandon_in_flight(self) -> None:
        """Shutdown with a stuck engine: fail-safe the batch inside the engine and everything still queued."""
        self._abandoned = True
        pending = list(self._in_flight)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                pending.append(item)
        log.error("drain_timeout", abandoned=len(pending))
        for job in pending:
            self._outbox.put(self._fail(job, SHUTDOWN, "engine did not finish within drain_timeout_s"))
        self._outbox.put(_STOP)

    def _publish_loop(self) -> None:
        """Hand verdicts to the sink in order, with total camera-to-publish latency; feed stats and hooks."""
        while True:
            self._heartbeat["publish"] = time.monotonic()
            try:
                out = self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if out is _STOP:
                break
            try:
                self._publish(out)
            except Exception:
                self.stats.count_publish_error()
                log.exception("publish_failed", frame_id=out.verdict.frame_id)
        self.finished.set()

    def _publish(self, out: _Out) -> None:
        """One verdict to the sink (with its total latency), then stats, the archive and the on_published hook."""
        total_ms = (time.time() - out.frame.t_acquired) * 1000.0
        out.verdict.latency_ms["total"] = total_ms
        self.sink(out.verdict, out.mask_png)
        self.stats.record(out.verdict, total_ms)
        if self.archive is not None and self.archive.wants(out.verdict.ok):
            self.archive.submit(ArchiveItem(
                sku=out.verdict.sku, frame_id=out.verdict.frame_id, t_acquired=out.frame.t_acquired,
                ok=out.verdict.ok, verdict=out.verdict.model_dump(mode="json"),
                image_u8_hwc=out.frame.image if isinstance(out.frame.image, np.ndarray) else None,
                map_f32_hw=out.map_f32_hw, map_rect=out.map_rect,
            ))
        if self.on_published is not None:
            image = out.frame.image if isinstance(out.frame.image, np.ndarray) else None
            try:
                self.on_published(Published(out.verdict, image, out.map_f32_hw, out.map_rect, out.pixel_threshold,
                                            out.input_u8_hwc, out.calibration))
            except Exception:
                log.exception("on_published_failed", frame_id=out.verdict.frame_id)
