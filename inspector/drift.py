"""Drift watch: recent OK parts against what good parts looked like at calibration, so that a slow drift (lamp
ageing, a new material batch, a smudged lens) raises an alarm before it raises the false-reject rate.

The pipeline's on_published hook calls `observe` on the publish thread, which only appends the verdict's
score, its calibration and a reference to the model input to a bounded queue. The drift thread (`run`) takes
the image statistics of each OK part (calibration/reference.py: brightness, contrast, focus) and keeps the last
`window` OK parts ([drift] in inspector.toml). Once the window is full it evaluates, every window/20 OK parts,
six statistics against the SKU calibration's `reference`:

| statistic        | value                                                             | as calibrated |
| ---------------- | ----------------------------------------------------------------- | ------------- |
| `score_p50`      | (window p50 - good p50) / (threshold - good p50)                  | about 0       |
| `score_p90`      | (window p90 - good p90) / (threshold - good p50)                  | about 0       |
| `near_threshold` | share of the window scoring >= good p99 + warning_level x (threshold - good p99) | below 0.01 |
| `brightness`, `contrast`, `focus` | window median / calibration median - 1           | about 0       |

Both score shifts are in units of the calibrated median margin (threshold - good p50), which is wide and
stable; the p90 margin of a threshold set at one of the top few good scores would magnify noise. The score
statistics are not watched when the good p50 (p99 for near_threshold) is not below the threshold.

A statistic whose |value| passes its bound raises one alarm: one `drift` event (state "raised", with the
(run_id, frame_id) of the part whose evaluation raised it) handed to `on_event` (the daemon publishes it on
<root>/drift) and one structlog warning; it clears with one event (state "cleared") and an info line once
|value| has stayed <= hysteresis x bound for half a window of OK parts (CALM_EVALUATIONS), so a statistic
wandering about its bound does not flap. `status()` is the `drift` field of the status document.

A verdict decided with another Calibration than the window's (a SKU changeover, or reloaded thresholds) resets
the window to that calibration's reference and clears the alarms of the old one (state "cleared", reason
"reset"). A calibration without a reference (calibrated before drift watch) turns the watch off for that SKU
with one `drift_watch_off` warning naming the fix; one without image statistics (thresholds fitted from
scores alone) watches the three score statistics.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from calibration.reference import IMAGE_STATISTICS, STATS_SIDE, DriftReference, ImageReference, image_stats
from foundation.log import get_logger
from inspector.config import DriftConfig
from inspector.pipeline import Published

if TYPE_CHECKING:
    from calibration.thresholds import Calibration

log = get_logger(__name__)

PENDING_MAX = 64  # parts queued for the drift thread; beyond, the oldest are skipped (counted)
EVALUATIONS_PER_WINDOW = 20
CALM_EVALUATIONS = EVALUATIONS_PER_WINDOW // 2  # evaluations in a row within hysteresis x bound that clear an alarm
WAKE_S = 0.5  # the drift thread looks for parts (and for the daemon stopping) at least this often
GATHER_S = 0.05  # and at most this often: a few parts per wake-up, not one thread switch per part

DriftEvent = dict[str, Any]


class _Part(NamedTuple):
    """What the drift thread needs of one model-decided verdict."""

    sku: str
    run_id: str
    frame_id: int
    ok: bool
    score: float
    calibration: Calibration
    input_u8_hwc: np.ndarray | None


class DriftWatch:
    """One station's drift watch (module docstring): observe() on the publish thread, run() on its own thread."""

    def __init__(self, cfg: DriftConfig, on_event: Callable[[DriftEvent], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """on_event: called on the drift thread with each event; clock: epoch seconds of events."""
        self.cfg = cfg
        self.on_event = on_event
        self._clock = clock
        self._queue: deque[_Part] = deque(maxlen=PENDING_MAX)
        self._wake = threading.Event()
        self._lock = threading.Lock()  # the status snapshot, read by other threads
        self._every = max(1, cfg.window // EVALUATIONS_PER_WINDOW)
        self.skipped = 0  # parts dropped unread because the drift thread fell behind
        self.events = 0  # alarms raised
        self._calibration: Calibration | None = None
        self._image_reference: ImageReference | None = None
        self._scores: deque[float] = deque(maxlen=cfg.window)
        self._images: deque[tuple[float, float, float]] = deque(maxlen=cfg.window)
        self._fresh = 0  # OK parts since the last evaluation
        self._alarms: dict[str, float] = {}  # statistic -> when its alarm was raised (epoch s)
        self._calm: dict[str, int] = {}  # statistic in alarm -> evaluations in a row back within its clear level
        self._values: dict[str, float] = {}
        self._status: dict[str, Any] = {"state": "waiting", "sku": None}
        self._frame: tuple[str, int] | None = None  # (run_id, frame_id) of the part taken last

    # ---- publish thread --------------------------------------------------------------------------------------

    def observe(self, item: Published) -> None:
        """Queue a model-decided verdict for the drift thread: O(1), never blocks (fail-safes are ignored)."""
        verdict = item.verdict
        if verdict.score is None or item.calibration is None:
            return
        if len(self._queue) == PENDING_MAX:
            self.skipped += 1
        self._queue.append(_Part(verdict.sku, verdict.run_id, verdict.frame_id, verdict.ok, verdict.score,
                                 item.calibration, item.input_u8_hwc))
        self._wake.set()

    # ---- drift thread ----------------------------------------------------------------------------------------

    def run(self, halt: threading.Event) -> None:
        """The drift thread: take the queued parts as they come until `halt` is set, then the last ones."""
        while not halt.is_set():
            self._wake.wait(WAKE_S)
            self._wake.clear()
            self.process()
            halt.wait(GATHER_S)
        self.process()

    def process(self) -> None:
        """Take every queued part; an error is logged with the SKU and the next part goes on."""
        while self._queue:
            part = self._queue.popleft()
            try:
                self._take(part)
            except Exception:
                log.exception("drift_watch_failed", sku=part.sku)

    def _take(self, part: _Part) -> None:
        """Add one part to the window (OK parts only) and evaluate when due."""
        self._frame = part.run_id, part.frame_id
        if part.calibration is not self._calibration:
            self._reset(part.sku, part.calibration)
        reference = part.calibration.reference
        if reference is None or not part.ok:
            return
        self._scores.append(part.score)
        if self._image_reference is not None and part.input_u8_hwc is not None:
            self._images.append(image_stats(part.input_u8_hwc))
        self._fresh += 1
        if len(self._scores) >= self.cfg.window and self._fresh >= self._every:
            self._fresh = 0
            self._evaluate(float(part.calibration.image_threshold), reference)

    def _reset(self, sku: str, calibration: Calibration) -> None:
        """Start a new window on `calibration`'s reference; the old calibration's alarms clear (reason "reset")."""
        cleared = [self._event(name, "cleared", self._values.get(name), reason="reset") for name in self._alarms]
        self._calibration = calibration
        self._scores.clear()
        self._images.clear()
        self._fresh = 0
        self._alarms.clear()
        self._calm.clear()
        self._values = {}
        reference = calibration.reference
        image = reference.image if reference is not None else None
        reason = None
        if reference is None:
            reason = (f"the calibration of SKU {sku} has no reference statistics (calibrated before drift watch); "
                      f"run `inspector calibrate` for {sku} again to watch it")
            log.warning("drift_watch_off", sku=sku, reason=reason)
        elif image is None:
            log.info("drift_watch_scores_only", sku=sku, window=self.cfg.window,
                     reason="the calibration has no image statistics (thresholds fitted from scores alone)")
        elif image.side_px != STATS_SIDE:
            log.info("drift_watch_scores_only", sku=sku, window=self.cfg.window,
                     reason=f"the calibration's image statistics were taken at {image.side_px} px, this version "
                            f"takes them at {STATS_SIDE} px; calibrate again to watch them")
            image = None
        else:
            log.info("drift_watch_reset", sku=sku, window=self.cfg.window)
        self._image_reference = image
        self._set_status({"state": "off" if reference is None else "warming", "sku": sku, "reason": reason})
        for event in cleared:
            self._emit(event)

    def _evaluate(self, threshold: float, reference: DriftReference) -> None:
        """Compute the statistics of the full window, raise or clear alarms, refresh the status."""
        scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        p50, p90 = np.quantile(scores, (0.5, 0.9))
        values: dict[str, float] = {}
        if threshold > reference.score_p50:
            margin = threshold - reference.score_p50
            values["score_p50"] = (p50 - reference.score_p50) / margin
            values["score_p90"] = (p90 - reference.score_p90) / margin
        if threshold > reference.score_p99:
            level = reference.score_p99 + self.cfg.warning_level * (threshold - reference.score_p99)
            values["near_threshold"] = float(np.count_nonzero(scores >= level)) / scores.size
        image = self._image_reference
        if image is not None and len(self._images) >= self.cfg.window:
            medians = np.median(np.asarray(self._images, dtype=np.float64), axis=0)
            for name, median in zip(IMAGE_STATISTICS, medians, strict=True):
                calibrated = float(getattr(image, name))
                if calibrated > 0:
                    values[name] = float(median) / calibrated - 1.0
        now = self._clock()
        events = []
        for name, value in values.items():
            bound = float(getattr(self.cfg, name))
            if name not in self._alarms:
                if abs(value) > bound:
                    self._alarms[name], self._calm[name] = now, 0
                    events.append(self._event(name, "raised", value))
                continue
            self._calm[name] = self._calm[name] + 1 if abs(value) <= self.cfg.hysteresis * bound else 0
            if self._calm[name] >= CALM_EVALUATIONS:
                del self._alarms[name], self._calm[name]
                events.append(self._event(name, "cleared", value))
        self._values = values
        self._set_status({
            "state": "drifting" if self._alarms else "ok", "sku": self._status.get("sku"), "reason": None,
            "alarms": sorted(self._alarms), "since": min(self._alarms.values(), default=None),
            "statistics": {name: {"value": round(value, 4), "bound": float(getattr(self.cfg, name)),
                                  "alarm": name in self._alarms} for name, value in values.items()},
            "evaluated": now,
        })
        for event in events:
            self._emit(event)

    def _event(self, name: str, state: str, value: float | None, **extra: Any) -> DriftEvent:
        """The payload of one drift event (published on <root>/drift, logged)."""
        bound = float(getattr(self.cfg, name))
        event: DriftEvent = {"event": "drift", "state": state, "statistic": name,
                             "value": None if value is None else round(value, 4), "bound": bound,
                             "window": len(self._scores), "sku": self._status.get("sku"), "ts": self._clock()}
        if self._frame is not None:
            event["run_id"], event["frame_id"] = self._frame
        if value is not None:
            event["detail"] = describe(name, value, bound, len(self._scores))
        return event | extra

    def _emit(self, event: DriftEvent) -> None:
        """Count, log and hand on one event; a failing on_event is logged, never fatal."""
        if event["state"] == "raised":
            self.events += 1
            log.warning("drift_raised", **{k: v for k, v in event.items() if k != "event"})
        else:
            log.info("drift_cleared", **{k: v for k, v in event.items() if k != "event"})
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("drift_event_failed", statistic=event["statistic"])

    # ---- any thread ------------------------------------------------------------------------------------------

    def _set_status(self, status: dict[str, Any]) -> None:
        """Replace the status snapshot (the drift thread)."""
        with self._lock:
            self._status = status

    def status(self) -> dict[str, Any]:
        """The `drift` field of the status document: state (waiting, off, warming, ok, drifting), SKU, alarms,
        each watched statistic's value, bound and alarm, the window's fill and the event counts."""
        with self._lock:
            status = dict(self._status)
        return status | {"window": len(self._scores), "window_size": self.cfg.window, "events": self.events,
                         "skipped": self.skipped}


def describe(name: str, value: float, bound: float, window: int) -> str:
    """One sentence on a statistic's value for an operator (the event's `detail` and its log line)."""
    if name in ("score_p50", "score_p90"):
        quantile = "median" if name == "score_p50" else "90th percentile"
        return (f"the {quantile} of the last {window} OK parts' scores has moved {value:+.0%} of the calibrated "
                f"margin towards the threshold (bound {bound:.0%})")
    if name == "near_threshold":
        return f"{value:.1%} of the last {window} OK parts scored near the threshold (bound {bound:.1%})"
    return (f"the {name} of the last {window} OK parts is {abs(value):.1%} {'above' if value > 0 else 'below'} "
            f"calibration (bound {bound:.0%})")
