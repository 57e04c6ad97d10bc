"""Prometheus metrics of one station: verdict counters and latency histograms fed per verdict, gauges read
from the daemon's status document at scrape time. Exposed at /metrics of the station page's server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inspector.pipeline import CORRUPT_FRAME, DEADLINE, ENGINE_ERROR, INVALID_FRAME, QUEUE_FULL, SHUTDOWN, WRONG_SIZE
from inspector.spool import LOSS_CAUSES
from inspector.trend import QUANTILES
from inspector.verdict import Verdict

FAIL_SAFE_REASONS = (QUEUE_FULL, DEADLINE, ENGINE_ERROR, CORRUPT_FRAME, INVALID_FRAME, WRONG_SIZE, SHUTDOWN)
# seconds: a line at 5-50 parts/s wants 10-200 ms; queueing and a slow GPU start show up in the tail
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class StationMetrics:
    """The station's registry; `observe` runs on the publish thread (a few counter increments, no I/O)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        disable_created_metrics()  # process-wide: no *_created series (Prometheus does not need them)
        self.registry = CollectorRegistry()
        self.verdicts = Counter("inspector_verdicts", "Verdicts published, by SKU and result (ok or ng)",
                                ["sku", "result"], registry=self.registry)
        self.fail_safe = Counter("inspector_fail_safe_verdicts",
                                 "Fail-safe verdicts (frames the model did not decide), by reason", ["reason"],
                                 registry=self.registry)
        for reason in FAIL_SAFE_REASONS:
            self.fail_safe.labels(reason)
        self.latency = Histogram("inspector_camera_to_verdict_seconds",
                                 "Camera acquisition to verdict handed to the publisher (spooled for MQTT)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.engine = Histogram("inspector_engine_seconds",
                                "Engine inference time of the micro-batch each verdict was inferred in",
                                buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StatusCollector(status))

    def observe(self, verdict: Verdict) -> None:
        """Count one published verdict and record its latencies."""
        self.verdicts.labels(verdict.sku, "ok" if verdict.ok else "ng").inc()
        if verdict.reason:
            self.fail_safe.labels(verdict.reason.split(":", 1)[0]).inc()
        if (total_ms := verdict.latency_ms.get("total")) is not None:
            self.latency.observe(total_ms / 1000.0)
        if (infer_ms := verdict.latency_ms.get("infer")) is not None:
            self.engine.observe(infer_ms / 1000.0)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """Gauges (and the acquired-frames counter) taken from the daemon's status document on each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        """Nothing to pre-register: the families are built per scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        doc = self._status()
        stats = doc.get("stats", {})
        yield CounterMetricFamily("inspector_frames_acquired", "Frames pulled from the camera",
                                  value=stats.get("acquired", 0))
        for name, help_text, value in (
            ("inspector_queue_depth", "Frames acquired and waiting for inference", doc.get("queued", 0)),
            ("inspector_spool_backlog", "Verdict records spooled and not yet acknowledged by the broker",
             doc.get("spool_pending", 0)),
            ("inspector_camera_connected", "1 while the camera delivers frames", doc.get("camera_connected")),
            ("inspector_broker_connected", "1 while the MQTT session is up", doc.get("broker_connected")),
            ("inspector_paused", "1 while acquisition is paused by a command", doc.get("paused")),
            ("inspector_not_ready", "1 while acquisition holds: verdicts can be neither stored nor sent",
             bool(doc.get("not_ready"))),
        ):
            yield GaugeMetricFamily(name, help_text, value=float(value or 0))
        spool = doc.get("spool") or {}
        lost = CounterMetricFamily("inspector_verdicts_lost",
                                   "Verdicts neither delivered nor kept, by cause (spool cap or full disk: "
                                   "dropped_ok, dropped_ng; in memory at a stop: unsaved; owed by a killed "
                                   "run: lost_in_crash)", labels=["cause"])
        for cause in LOSS_CAUSES:
            lost.add_metric([cause], float(spool.get(cause, 0) or 0))
        yield lost
        yield from _drift_and_trend(doc)
        if doc.get("sku") is not None:
            sku = GaugeMetricFamily("inspector_active_sku", "The SKU being inspected (value 1)", labels=["sku"])
            sku.add_metric([str(doc["sku"])], 1.0)
            yield sku
            bundle = GaugeMetricFamily("inspector_sku_bundle_info",
                                       "Version and content hash of the SKU being inspected (value 1); version \"\" "
                                       "when it does not run from the SKU store, the hash then of its meta.json",
                                       labels=["sku", "version", "hash"])
            bundle.add_metric([str(doc["sku"]), str(doc.get("sku_version") or ""), str(doc.get("sku_hash") or "")],
                              1.0)
            yield bundle
        engine = doc.get("engine") or {}
        if "backend" in engine:
            info = GaugeMetricFamily("inspector_engine_info", "Backend and precision of the active engine (value 1)",
                                     labels=["backend", "precision"])
            info.add_metric([str(engine["backend"]), str(engine.get("precision", ""))], 1.0)
            yield info


def _drift_and_trend(doc: dict[str, Any]) -> Iterator[Metric]:
    """The drift watch's statistics, alarms and event count, and the last minute's OK-score quantiles with the
    threshold (the status document's `drift` and `trend`, inspector/drift.py and inspector/trend.py)."""
    drift = doc.get("drift") or {}
    value = GaugeMetricFamily("inspector_drift", "Drift watch statistic of the recent OK parts (0 = as calibrated; "
                                                 "docs/operations.md)", labels=["statistic"])
    alarm = GaugeMetricFamily("inspector_drift_alarm", "1 while the statistic is beyond its [drift] bound",
                              labels=["statistic"])
    for name, stat in (drift.get("statistics") or {}).items():
        value.add_metric([name], float(stat["value"]))
        alarm.add_metric([name], float(bool(stat["alarm"])))
    yield value
    yield alarm
    yield CounterMetricFamily("inspector_drift_events", "Drift alarms raised", value=float(drift.get("events", 0)))
    trend = doc.get("trend") or {}
    score = GaugeMetricFamily("inspector_ok_score", "Score quantiles of the OK parts of the last complete minute",
                              labels=["quantile"])
    minute = (trend.get("minute") or {}).get("score") or {}
    for name, quantile in QUANTILES.items():
        if minute.get(name) is not None:
            score.add_metric([str(quantile)], float(minute[name]))
    yield score
    if trend.get("threshold") is not None:
        yield GaugeMetricFamily("inspector_score_threshold", "Image threshold of the active SKU (score >= it: NG)",
                                value=float(trend["threshold"]))
