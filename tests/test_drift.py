"""Drift watch and the score/yield trend: the reference recorded at calibration, the statistics and their alarms
(unit), the trend's minutes, /metrics, the synthetic camera's lighting drift; then real daemons: the fast one of
test_service for the MQTT event, the status and a changeover; the trained demo SKU on a drifting synthetic camera,
where the alarm must come before the false-reject rate rises, and a steady line that raises none; and the station
page in chromium with the drift banner and the trend chart.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from calibration.reference import STATS_SIDE, DriftReference, image_stats, stats_of_images
from calibration.thresholds import Calibration, fit_thresholds, load_calibration, save_calibration
from foundation.errors import ConfigError
from inspector.acquisition import open_source
from inspector.broker import LocalBroker
from inspector.config import DriftConfig, SyntheticCamera, load_config
from inspector.drift import CALM_EVALUATIONS, DriftWatch
from inspector.pipeline import Published
from inspector.service import Daemon
from inspector.trend import Trend
from inspector.verdict import Verdict
from inspector.web.metrics import StationMetrics
from tdad.preprocess import resize_to_model
from tdad.scoring import image_scores
from tdad.training.sample_data import render_part
from tests.stations import write_station
from tests.test_decider import make_calibration
from tests.test_pipeline import BrightnessEngine, ListSource
from tests.test_service import Subscriber, brightness_loader
from tests.test_service import write_config as write_fast_config
from tests.test_web import metric
from tests.test_web_browser import needs_chromium
from tests.waiting import wait_until

RNG_SEED = 3


def parts(n: int, gain: float = 1.0, seed: int = RNG_SEED, size: int = 64) -> list[np.ndarray]:
    """n rendered brick parts, their intensities times `gain` (a lamp brighter or dimmer than at calibration)."""
    rng = np.random.default_rng(seed)
    return [cv2.convertScaleAbs(render_part("brick", size, rng), alpha=gain) for _ in range(n)]


def calibration_with_reference(scores: np.ndarray, images: list[np.ndarray] | None = None,
                               image_threshold: float = 1.0) -> Calibration:
    """A Calibration whose drift reference comes from these good scores (and images)."""
    stats = stats_of_images(images) if images is not None else None
    return make_calibration(image_threshold=image_threshold, reference=DriftReference.fit(scores, stats))


def item(calibration: Calibration, score: float | None, image: np.ndarray | None = None, *, frame_id: int = 1,
         sku: str = "a", reason: str | None = None, t: float = 0.0) -> Published:
    """A published verdict as the pipeline hands it to on_published."""
    ok = reason is None and score is not None and score < calibration.image_threshold
    verdict = Verdict(frame_id=frame_id, run_id="r", t_acquired=t, sku=sku, ok=ok, score=score,
                      threshold=calibration.image_threshold, reason=reason, engine="test", line="l", station="s")
    return Published(verdict, None, None, None, None, image, None if score is None else calibration)


class Recorder:
    """A DriftWatch with its events recorded, fed synchronously (observe, then process)."""

    def __init__(self, window: int = 40) -> None:
        self.events: list[dict[str, Any]] = []
        self.watch = DriftWatch(DriftConfig(window=window), on_event=self.events.append)
        self.frame = 0

    def feed(self, calibration: Calibration, scores: np.ndarray, images: list[np.ndarray] | None = None,
             sku: str = "a") -> None:
        for i, score in enumerate(scores):
            self.frame += 1
            image = images[i % len(images)] if images is not None else None
            self.watch.observe(item(calibration, float(score), image, frame_id=self.frame, sku=sku))
            self.watch.process()

    def states(self) -> list[tuple[str, str]]:
        return [(e["statistic"], e["state"]) for e in self.events]


# ---- reference at calibration -------------------------------------------------------------------------------


def test_image_statistics_follow_lighting_haze_and_focus() -> None:
    image = parts(1)[0]
    brightness, contrast, focus = image_stats(image)
    dim = image_stats(cv2.convertScaleAbs(image, alpha=0.8))
    assert dim[0] == pytest.approx(0.8 * brightness, rel=0.02)  # a dimmer lamp: all three scale with the gain
    assert dim[1] == pytest.approx(0.8 * contrast, rel=0.03)
    assert dim[2] == pytest.approx(0.64 * focus, rel=0.05)
    blurred = image_stats(cv2.GaussianBlur(image, (0, 0), 1.5))  # a smudged lens: sharpness gone, light the same
    assert blurred[0] == pytest.approx(brightness, rel=0.01) and blurred[2] < 0.3 * focus
    assert image_stats(np.full((40, 30, 3), 77, np.uint8)) == (77.0, 0.0, 0.0)
    big = cv2.resize(image, (4 * STATS_SIDE, 4 * STATS_SIDE), interpolation=cv2.INTER_NEAREST)
    assert image_stats(big)[0] == pytest.approx(brightness, rel=0.01)  # shrunk to STATS_SIDE first: cheap


def test_fit_thresholds_records_the_reference_and_old_calibration_files_still_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.05, 300)
    images = parts(20)
    calibration = fit_thresholds(scores, rng.random((300, 8, 8), dtype=np.float32), 0.01,
                                 good_image_stats=stats_of_images(images))
    reference = calibration.reference
    assert reference is not None and reference.image is not None
    assert (reference.score_p50, reference.score_p90, reference.score_p99) == pytest.approx(
        np.quantile(scores, [0.5, 0.9, 0.99]))
    assert reference.score_p99 < calibration.image_threshold
    assert reference.image.side_px == STATS_SIDE
    assert reference.image.brightness == pytest.approx(np.median([image_stats(i)[0] for i in images]))
    save_calibration(calibration, tmp_path / "calibration.json")
    assert load_calibration(tmp_path / "calibration.json") == calibration
    scores_only = fit_thresholds(scores, rng.random((300, 8, 8), dtype=np.float32), 0.01).reference
    assert scores_only is not None and scores_only.image is None
    old = json.loads(calibration.model_dump_json())
    del old["reference"]  # written before drift watch
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_calibration(tmp_path / "old.json").reference is None


# ---- the statistics and their alarms --------------------------------------------------------------------


def test_a_steady_line_raises_nothing_and_reports_every_statistic() -> None:
    rng = np.random.default_rng(1)
    images = parts(30)
    calibration = calibration_with_reference(rng.normal(0.3, 0.05, 400), parts(30, seed=9))
    recorder = Recorder()
    recorder.feed(calibration, rng.normal(0.3, 0.05, 39), images)
    assert recorder.watch.status()["state"] == "warming" and recorder.watch.status()["window"] == 39
    recorder.feed(calibration, rng.normal(0.3, 0.05, 300), images)
    status = recorder.watch.status()
    assert recorder.events == [] and status["state"] == "ok" and status["alarms"] == []
    assert set(status["statistics"]) == {"score_p50", "score_p90", "near_threshold", "brightness", "contrast",
                                         "focus"}
    assert all(abs(s["value"]) < s["bound"] and not s["alarm"] for s in status["statistics"].values())
    assert status["statistics"]["brightness"]["bound"] == DriftConfig().brightness


def test_rising_scores_raise_one_event_per_statistic_and_clear_once_back_with_hysteresis() -> None:
    rng = np.random.default_rng(2)
    calibration = calibration_with_reference(rng.normal(0.3, 0.05, 400))  # scores only: no image statistics
    recorder = Recorder()
    recorder.feed(calibration, rng.normal(0.3, 0.05, 60))
    recorder.feed(calibration, rng.normal(0.68, 0.05, 200))  # the median has moved half way to the threshold 1.0
    raised = [e for e in recorder.events if e["state"] == "raised"]
    assert {e["statistic"] for e in raised} == {"score_p50", "score_p90", "near_threshold"}
    assert len(raised) == 3  # one event per statistic, not one per evaluation
    p50 = next(e for e in raised if e["statistic"] == "score_p50")
    assert p50["value"] > p50["bound"] == DriftConfig().score_p50 and p50["window"] == 40 and p50["sku"] == "a"
    assert p50["run_id"] == "r" and 60 < p50["frame_id"] <= 100 and "towards the threshold" in p50["detail"]
    status = recorder.watch.status()
    assert status["state"] == "drifting" and status["alarms"] == ["near_threshold", "score_p50", "score_p90"]
    assert status["events"] == 3 and "brightness" not in status["statistics"]
    calm_at = cleared_at = None
    for k in range(200):  # back to normal, part by part
        recorder.feed(calibration, rng.normal(0.3, 0.05, 1))
        value = recorder.watch.status()["statistics"]["score_p50"]["value"]
        if calm_at is None and abs(value) <= DriftConfig().hysteresis * DriftConfig().score_p50:
            calm_at = k
        if cleared_at is None and ("score_p50", "cleared") in recorder.states():
            cleared_at = k
    assert calm_at is not None and cleared_at is not None
    assert cleared_at - calm_at >= (CALM_EVALUATIONS - 1) * 2  # calm for half a window (window 40: every 2 parts)
    cleared = [e for e in recorder.events if e["state"] == "cleared"]
    assert sorted(e["statistic"] for e in cleared) == ["near_threshold", "score_p50", "score_p90"]
    assert recorder.watch.status()["state"] == "ok" and recorder.watch.status()["events"] == 3


def test_a_dimmer_lamp_raises_brightness_contrast_and_focus() -> None:
    rng = np.random.default_rng(4)
    calibration = calibration_with_reference(rng.normal(0.3, 0.05, 400), parts(30, seed=9))
    recorder = Recorder()
    recorder.feed(calibration, rng.normal(0.3, 0.05, 80), parts(30, gain=0.85))
    assert {s for s, state in recorder.states() if state == "raised"} == {"brightness", "contrast", "focus"}
    brightness = recorder.watch.status()["statistics"]["brightness"]
    assert brightness["value"] == pytest.approx(-0.15, abs=0.02) and brightness["alarm"]
    event = next(e for e in recorder.events if e["statistic"] == "brightness")
    assert "below calibration" in event["detail"]


def test_ng_and_fail_safe_verdicts_stay_out_of_the_window() -> None:
    rng = np.random.default_rng(5)
    calibration = calibration_with_reference(rng.normal(0.3, 0.05, 400), image_threshold=0.5)
    watch = DriftWatch(DriftConfig(window=20))
    for i in range(30):
        watch.observe(item(calibration, 0.9, frame_id=i))  # NG: score >= threshold
        watch.observe(item(calibration, None, frame_id=i, reason="deadline_missed"))
        watch.process()
    assert watch.status()["window"] == 0 and watch.status()["state"] == "warming"


def test_a_changeover_or_a_reload_resets_the_window_and_clears_the_old_alarms() -> None:
    rng = np.random.default_rng(6)
    a = calibration_with_reference(rng.normal(0.3, 0.05, 400))
    recorder = Recorder()
    recorder.feed(a, rng.normal(0.68, 0.05, 60))
    raised = recorder.watch.status()["alarms"]
    assert recorder.watch.status()["state"] == "drifting" and "score_p50" in raised
    b = calibration_with_reference(rng.normal(0.6, 0.05, 400))  # SKU b scores higher: no drift for it
    recorder.feed(b, rng.normal(0.6, 0.05, 1), sku="b")
    cleared = [e for e in recorder.events if e["state"] == "cleared"]
    assert sorted(e["statistic"] for e in cleared) == raised
    assert all(e["reason"] == "reset" and e["sku"] == "a" and e["frame_id"] == 61 for e in cleared)
    status = recorder.watch.status()
    assert status["state"] == "warming" and status["sku"] == "b" and status["window"] == 1
    recorder.feed(b, rng.normal(0.6, 0.05, 100), sku="b")
    assert recorder.watch.status()["state"] == "ok" and len(recorder.events) == 2 * len(raised)
    reloaded = b.model_copy()  # reloaded thresholds: a new Calibration object, a new window
    recorder.feed(reloaded, rng.normal(0.6, 0.05, 1), sku="b")
    assert recorder.watch.status()["window"] == 1


def test_a_calibration_from_before_drift_watch_turns_it_off_with_one_log_line() -> None:
    old = make_calibration()
    assert old.reference is None
    recorder = Recorder()
    with capture_logs() as logs:
        recorder.feed(old, np.full(100, 0.2))
    off = [e for e in logs if e["event"] == "drift_watch_off"]
    assert len(off) == 1 and "inspector calibrate" in off[0]["reason"]
    status = recorder.watch.status()
    assert status["state"] == "off" and "inspector calibrate" in status["reason"] and recorder.events == []


# ---- trend -----------------------------------------------------------------------------------------------


def test_trend_keeps_per_minute_counts_and_ok_score_quantiles_for_a_bounded_time() -> None:
    now = [10_000.0 * 60]
    trend = Trend(keep=5, clock=lambda: now[0])
    calibration = make_calibration(image_threshold=0.5)

    def verdict(t: float, score: float | None, reason: str | None = None) -> Verdict:
        return item(calibration, score, t=t, reason=reason).verdict

    start = now[0] - 180
    for i in range(100):
        trend.observe(verdict(start + 0.5 * i, 0.01 * (i % 40)))  # minute 1: 100 parts, scores 0..0.39
    trend.observe(verdict(start + 60, 0.7))  # minute 2: one NG
    trend.observe(verdict(start + 61, None, "engine_error: boom"))  # and a fail-safe
    trend.observe(verdict(start + 30, 0.1))  # late: counted in the open minute
    series = trend.series()
    first, second = series["buckets"]
    assert first["t"] == start and first["ok"] == 100 and first["ng"] == 0 and first["threshold"] == 0.5
    expected = np.quantile([0.01 * (i % 40) for i in range(100)], [0.5, 0.9, 0.99])
    assert [first["score"][q] for q in ("p50", "p90", "p99")] == pytest.approx(expected)
    assert second == {"t": start + 60, "sku": "a", "threshold": 0.5, "ok": 1, "ng": 2,
                      "fail_safe": {"engine_error": 1}, "score": {"p50": 0.1, "p90": 0.1, "p99": 0.1}}
    summary = series["summary"]
    assert summary["last_hour"] == {"ok": 101, "ng": 2, "fail_safe": 1, "ng_rate": round(2 / 103, 6)}
    assert summary["minute"] == first and summary["threshold"] == 0.5  # the last closed minute
    assert trend.summary() == summary
    for minute in range(3, 12):  # minutes beyond `keep` fall out, oldest first
        trend.observe(verdict(start + 60 * minute, 0.2))
    now[0] = start + 60 * 11
    assert [b["t"] for b in trend.series()["buckets"]] == [start + 60 * m for m in range(6, 12)]


def test_metrics_export_drift_statistics_events_score_quantiles_and_threshold() -> None:
    status = {"drift": {"state": "drifting", "events": 2, "statistics": {
        "brightness": {"value": -0.12, "bound": 0.04, "alarm": True},
        "score_p50": {"value": 0.05, "bound": 0.3, "alarm": False}}},
        "trend": {"minute": {"score": {"p50": 0.2, "p90": 0.3, "p99": 0.35}}, "threshold": 0.47}}
    text = StationMetrics(lambda: status).exposition().decode()
    assert metric(text, "inspector_drift", statistic="brightness") == -0.12
    assert metric(text, "inspector_drift_alarm", statistic="brightness") == 1
    assert metric(text, "inspector_drift_alarm", statistic="score_p50") == 0
    assert metric(text, "inspector_drift_events_total") == 2
    assert metric(text, "inspector_ok_score", quantile="0.5") == 0.2
    assert metric(text, "inspector_ok_score", quantile="0.99") == 0.35
    assert metric(text, "inspector_score_threshold") == 0.47


# ---- configuration and the synthetic camera ----------------------------------------------------------------


def test_the_synthetic_lamp_drifts_by_the_configured_gain_per_frame() -> None:
    def frames(drift: float) -> list[np.ndarray]:
        source = open_source(SyntheticCamera(width=64, height=64, frames=21, defect_rate=0.0, seed=2,
                                             brightness_drift_per_frame=drift))
        source.open()
        return [frame.image for frame in source.frames()]

    steady, dimming = frames(0.0), frames(-0.01)
    assert np.array_equal(steady[0], dimming[0])  # frame 1: gain 1
    assert np.array_equal(dimming[20], cv2.convertScaleAbs(steady[20], alpha=0.8))  # frame 21: 1 - 0.01 x 20


def test_drift_keys_are_checked_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "inspector.toml"
    path.write_text('active_sku = "a"\n[drift]\nwindow = 5\n[skus.a]\nmodel_dir = "a"\n')
    with pytest.raises(ConfigError, match=r"inspector.toml: drift.window: Input should be greater than or equal "
                                          r"to 20 \(got 5\)"):
        load_config(path)
    path.write_text('active_sku = "a"\n[drift]\nwindow = 50\nbrightness = 0.02\n[skus.a]\nmodel_dir = "a"\n')
    drift = load_config(path).drift
    assert drift.window == 50 and drift.brightness == 0.02 and drift.enabled


# ---- daemons -----------------------------------------------------------------------------------------------


def grey_parts(levels: list[float], seed: int = 0) -> list[np.ndarray]:
    """Noisy grey parts: the BrightnessEngine scores each one about its level / 255."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(level, 4.0, (64, 64, 3)), 0, 255).astype(np.uint8) for level in levels]


@pytest.mark.integration
def test_the_daemon_publishes_one_drift_event_shows_it_in_the_status_and_a_changeover_resets_it(
        tmp_path: Path, broker: LocalBroker) -> None:
    config = write_fast_config(tmp_path, broker.port, drift={"window": 20})
    engine = BrightnessEngine()  # what brightness_loader runs: the reference is its view of steady parts
    inputs = [resize_to_model(image, engine.image_size) for image in grey_parts([60.0] * 40, seed=1)]
    scores = image_scores(engine.infer(np.stack(inputs)), top_k=4)
    for sku in ("a", "b"):
        save_calibration(calibration_with_reference(scores, inputs, image_threshold=0.9),
                         tmp_path / sku / "calibration.json")
    levels = [60.0] * 60 + [60.0 + 1.5 * i for i in range(1, 2000)]  # steady, then a lamp getting brighter
    sub = Subscriber(broker.port, config.topic_root)
    daemon = Daemon(config, source=ListSource(grey_parts(levels), interval_s=0.01), sku_loader=brightness_loader())
    daemon.start()
    try:
        assert sub.wait_for(lambda: any(e["state"] == "raised" for e in sub.json("drift")), 60)
        raised = sub.json("drift")[0]
        assert raised["event"] == "drift" and raised["sku"] == "a" and raised["window"] == 20
        assert abs(raised["value"]) > raised["bound"] and raised["frame_id"] > 60
        assert sub.wait_for(lambda: any(s.get("drift", {}).get("state") == "drifting" for s in sub.json("status")))
        status = next(s for s in sub.json("status") if s.get("drift", {}).get("state") == "drifting")
        assert raised["statistic"] in status["drift"]["alarms"] and status["trend"]["last_hour"]["ok"] > 0
        assert daemon.handle_command({"cmd": "sku", "sku": "b"}, loading_reply=False)["state"] == "active"
        assert wait_until(lambda: (daemon.drift is not None and daemon.drift.status()["sku"] == "b"), 30)
        assert sub.wait_for(lambda: any(e.get("reason") == "reset" for e in sub.json("drift")), 30)
        resets = [e for e in sub.json("drift") if e.get("reason") == "reset"]
        assert {e["statistic"] for e in resets} == {e["statistic"] for e in sub.json("drift")
                                                    if e["sku"] == "a" and e["state"] == "raised"}
        assert all(e["state"] == "cleared" and e["sku"] == "a" for e in resets)
    finally:
        daemon.stop()
        sub.close()
    raised_per_statistic = {}
    for event in sub.json("drift"):
        if event["state"] == "raised" and event["sku"] == "a":
            raised_per_statistic[event["statistic"]] = raised_per_statistic.get(event["statistic"], 0) + 1
    assert raised_per_statistic and set(raised_per_statistic.values()) == {1}  # one event, not one per frame


def test_with_drift_disabled_the_daemon_runs_no_watch(tmp_path: Path) -> None:
    config = write_fast_config(tmp_path, 1883, drift={"enabled": False})
    daemon = Daemon(config, source=ListSource([]), sku_loader=brightness_loader())
    assert daemon.drift is None and daemon.status()["drift"] == {"state": "disabled"}


@pytest.fixture(scope="module")
def drift_sku(trained_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo SKU calibrated by `inspector calibrate` on the demo's good parts (with the reference)."""
    from inspector.cli import main
    from tests.fixtures_engines import copy_sku

    sku = copy_sku(trained_sku, tmp_path_factory.mktemp("drift") / "sku")
    good = trained_sku.parent / "data" / "brick" / "test" / "good"
    target = load_calibration(trained_sku / "calibration.json").target_false_reject_rate
    assert main(["calibrate", "--sku-dir", str(sku), "--good", str(good), "--frr", str(target), "--threads", "1"]) == 0
    reference = load_calibration(sku / "calibration.json").reference
    assert reference is not None and reference.image is not None
    return sku


def run_line(tmp_path: Path, broker: LocalBroker, sku: Path, drift: float, frames: int
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, bool], dict[str, Any]]:
    """A daemon on the demo SKU and a synthetic camera with this lighting drift: (verdicts in frame order, drift
    events, frame id -> drawn defect, final status)."""
    from inspector.demo import RecordingSource
    from tests.test_daemon_integration import write_config

    camera = {"type": "synthetic", "width": 128, "height": 128, "fps": 0.0, "frames": frames, "defect_rate": 0.3,
              "seed": 5, "brightness_drift_per_frame": drift}
    tmp_path.mkdir()
    path = write_config(tmp_path, sku, broker.port, camera, queue_depth=4096, frame_timeout_ms=600000)
    path.write_text(path.read_text() + "[drift]\nwindow = 100\n")
    config = load_config(path)
    sub = Subscriber(broker.port, config.topic_root)
    source = RecordingSource(open_source(config.camera))
    daemon = Daemon(config, source=source)
    daemon.start()
    try:
        assert daemon.wait_finished(900)
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= frames, 60)
    finally:
        daemon.stop()  # the drift thread takes the last parts before it ends
        sub.close()
    status = daemon.status()
    return sorted(sub.json("verdict"), key=lambda v: v["frame_id"]), sub.json("drift"), source.defect, status


def rolling_false_reject_rate(verdicts: list[dict[str, Any]], defect: dict[int, bool], window: int = 200
                              ) -> list[tuple[int, float]]:
    """(frame id, false-reject rate over the last `window` good parts) at each good part from the window-th on."""
    good = [v for v in verdicts if not defect[v["frame_id"]]]
    rejected = np.cumsum([0] + [not v["ok"] for v in good])
    return [(int(good[end - 1]["frame_id"]), float(rejected[end] - rejected[end - window]) / window)
            for end in range(window, len(good) + 1)]


@pytest.mark.integration
@pytest.mark.slow
def test_a_dimming_lamp_raises_the_alarm_before_false_rejects_rise_and_a_steady_line_raises_none(
        tmp_path: Path, broker: LocalBroker, drift_sku: Path) -> None:
    target = load_calibration(drift_sku / "calibration.json").target_false_reject_rate
    frames = 1000
    steady, events, defect, status = run_line(tmp_path / "steady", broker, drift_sku, 0.0, frames)
    assert len(steady) == frames and events == []
    assert status["drift"]["state"] == "ok" and status["drift"]["events"] == 0
    noise = max(rate for _, rate in rolling_false_reject_rate(steady, defect))  # the same parts under steady light
    print(f"\nsteady line: false-reject rate over 200 good parts at most {noise:.3f}, statistics "
          f"{({k: s['value'] for k, s in status['drift']['statistics'].items()})}")

    dimming, events, dimming_defect, status = run_line(tmp_path / "dimming", broker, drift_sku, -0.0001, frames)
    assert len(dimming) == frames and all(v["reason"] is None for v in dimming) and dimming_defect == defect
    rise = next((frame for frame, rate in rolling_false_reject_rate(dimming, defect) if rate > max(target, noise)),
                None)
    raised = [e for e in events if e["state"] == "raised"]
    print(f"dimming lamp: the false-reject rate passes {max(target, noise):.3f} at frame {rise}; alarms: "
          + ", ".join(f"{e['statistic']} at frame {e['frame_id']}" for e in raised))
    assert rise is not None, "the drift never raised the false-reject rate: the test shows nothing"
    assert raised and raised[0]["frame_id"] < rise
    assert status["drift"]["state"] == "drifting" and status["drift"]["events"] >= len(raised)


@pytest.fixture
def drifting_station(tmp_path: Path, broker: LocalBroker, random_calibrated_sku: Path) -> Iterator[Daemon]:
    path = write_station(
        tmp_path / "inspector.toml", port=broker.port, station_id="drift", active="brick",
        skus={"brick": {"model_dir": random_calibrated_sku}},
        camera={"type": "synthetic", "width": 64, "height": 64, "fps": 20.0, "seed": 4,
                "brightness_drift_per_frame": -0.004},
        archive={"enabled": False}, service={"watchdog": False}, web={"enabled": True, "port": 0},
        drift={"window": 20})
    daemon = Daemon(load_config(path))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
def test_the_station_page_shows_the_drift_banner_and_draws_the_score_trend(drifting_station: Daemon) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from inspector.web.browser import headless_chromium

    web = drifting_station.web
    assert web is not None
    assert wait_until(lambda: drifting_station.trend.series()["buckets"] != [], 30)
    with urllib.request.urlopen(f"{web.url}api/trend", timeout=10) as response:
        series = json.load(response)
    assert series["bucket_s"] == 60 and series["buckets"][-1]["ok"] + series["buckets"][-1]["ng"] > 0
    with headless_chromium() as driver:
        wait = WebDriverWait(driver, 60, poll_frequency=0.2)
        driver.get(web.url)

        def body(attribute: str) -> Any:
            return driver.find_element(By.TAG_NAME, "body").get_attribute(attribute)

        trend = driver.find_element(By.ID, "trend")
        wait.until(lambda _: int(trend.get_attribute("data-points") or 0) >= 1)
        points = driver.execute_script(  # threshold, p99 and median: a step of two points per minute at least
            "return [...document.querySelectorAll('#trend polyline')].map(p => p.points.numberOfItems)")
        assert len(points) == 3 and min(points) >= 2, points
        wait.until(lambda _: driver.find_element(By.ID, "ng-hour").text != "–")
        banner = driver.find_element(By.ID, "drift-banner")
        wait.until(lambda _: body("data-drift") == "drifting" and banner.is_displayed())
        assert "Drift on brick" in banner.text and "brightness -" in banner.text
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
