"""Score and yield over time: one bucket per minute of camera time (verdict.t_acquired) for the last 24 h.

Each bucket holds the SKU and image threshold last seen in it, OK / NG counts, fail-safe counts by reason and
the p50 / p90 / p99 of the OK parts' scores (the minute's scores are kept until it closes, then only the
quantiles). Memory is bounded: at most KEEP_BUCKETS closed buckets and one open one. `observe` runs on the
publish thread (a lock, a few increments, one append); `series()` is GET /api/trend of the station page
(inspector/web), `summary()` the `trend` field of the status document (NG per hour and per shift, the last
closed minute's score quantiles, the threshold), which /metrics exports.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inspector.verdict import Verdict

BUCKET_S = 60
KEEP_BUCKETS = 24 * 60
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
SHIFT_S = 8 * 3600  # the shift figure of the summary: the last 8 hours


@dataclass
class _Bucket:
    """The open minute: counts as they come, the OK scores until it closes."""

    start: float
    sku: str
    threshold: float | None = None
    ok: int = 0
    ng: int = 0
    fail_safe: Counter[str] = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)

    def close(self) -> dict[str, Any]:
        """The bucket as kept and served: counts and the OK-score quantiles (None without OK parts)."""
        score = None
        if self.scores:
            values = np.quantile(np.asarray(self.scores, dtype=np.float64), list(QUANTILES.values()))
            score = {name: round(float(v), 6) for name, v in zip(QUANTILES, values, strict=True)}
        return {"t": self.start, "sku": self.sku, "threshold": self.threshold, "ok": self.ok, "ng": self.ng,
                "fail_safe": dict(self.fail_safe), "score": score}


class Trend:
    """The station's per-minute series (module docstring); thread-safe."""

    def __init__(self, bucket_s: int = BUCKET_S, keep: int = KEEP_BUCKETS,
                 clock: Callable[[], float] = time.time) -> None:
        """clock: epoch seconds, the "now" of summary() and series() (a test moves its own)."""
        self.bucket_s = bucket_s
        self.keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        self._closed: deque[dict[str, Any]] = deque(maxlen=keep)
        self._open: _Bucket | None = None

    def observe(self, verdict: Verdict) -> None:
        """Count one published verdict in its minute (a late one in the open minute)."""
        start = verdict.t_acquired - verdict.t_acquired % self.bucket_s
        with self._lock:
            bucket = self._open
            if bucket is None or start > bucket.start:
                if bucket is not None:
                    self._closed.append(bucket.close())
                bucket = self._open = _Bucket(start, verdict.sku)
            bucket.sku = verdict.sku
            if verdict.reason:
                bucket.fail_safe[verdict.reason.split(":", 1)[0]] += 1
            else:
                bucket.threshold = verdict.threshold
            if verdict.ok:
                bucket.ok += 1
                if verdict.score is not None:
                    bucket.scores.append(verdict.score)
            else:
                bucket.ng += 1

    def _snapshot(self, since: float, scores: bool) -> tuple[list[dict[str, Any]], _Bucket | None]:
        """Closed buckets from `since` on and a copy of the open one (its scores only when asked for), taken
        under the lock so that observe() waits no longer than a copy."""
        with self._lock:
            closed = [b for b in self._closed if b["t"] >= since]
            bucket = self._open
            if bucket is None or bucket.start < since:
                return closed, None
            return closed, _Bucket(bucket.start, bucket.sku, bucket.threshold, bucket.ok, bucket.ng,
                                   Counter(bucket.fail_safe), list(bucket.scores) if scores else [])

    def series(self) -> dict[str, Any]:
        """GET /api/trend: every minute of the last 24 h, oldest first, the open minute last."""
        now = self._clock()
        closed, bucket = self._snapshot(now - self.keep * self.bucket_s, scores=True)
        current = bucket.close() if bucket is not None else None
        return {"bucket_s": self.bucket_s, "now": now, "buckets": closed + ([current] if current is not None else []),
                "summary": _summary(closed, current, now)}

    def summary(self) -> dict[str, Any]:
        """The status document's `trend`: NG in the last hour and shift, the last closed minute, the threshold."""
        now = self._clock()
        closed, bucket = self._snapshot(now - SHIFT_S, scores=False)
        return _summary(closed, bucket.close() if bucket is not None else None, now)


def _totals(buckets: list[dict[str, Any]]) -> dict[str, Any]:
    """OK, NG and fail-safe counts over some buckets, and the NG share of the parts (None without parts)."""
    ok = sum(b["ok"] for b in buckets)
    ng = sum(b["ng"] for b in buckets)
    fail_safe = sum(sum(b["fail_safe"].values()) for b in buckets)
    return {"ok": ok, "ng": ng, "fail_safe": fail_safe, "ng_rate": round(ng / (ok + ng), 6) if ok + ng else None}


def _summary(closed: list[dict[str, Any]], current: dict[str, Any] | None, now: float) -> dict[str, Any]:
    """NG counts in the last hour and shift (the open minute `current` included), the newest closed minute with OK
    scores and the newest threshold."""
    buckets = closed + ([current] if current is not None else [])
    threshold = next((b["threshold"] for b in reversed(buckets) if b["threshold"] is not None), None)
    return {"last_hour": _totals([b for b in buckets if b["t"] > now - 3600]),
            "shift": _totals([b for b in buckets if b["t"] > now - SHIFT_S]), "shift_s": SHIFT_S,
            "minute": next((b for b in reversed(closed) if b["score"] is not None), None), "threshold": threshold}
