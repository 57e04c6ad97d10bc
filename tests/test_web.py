"""The station page's server against a real daemon: routes, the event stream, /metrics, and every security rule
(token, origin, size, content type, command shape, archive paths, Host) with real HTTP on a free port.

The daemon is the one of test_service (real mosquitto, real Pipeline, the small BrightnessEngine), so these
run in seconds; tests/test_web_browser.py drives the page in chromium against ONNX Runtime engines.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from foundation.errors import ConfigError
from inspector.broker import LocalBroker, start_local_broker
from inspector.config import WebConfig, load_config, masked_dump
from inspector.pipeline import Published
from inspector.service import Daemon
from inspector.verdict import Verdict, regions_from_mask
from inspector.web import StationWeb
from inspector.web.live import render_overlay
from inspector.web.metrics import StationMetrics
from inspector.web.server import MAX_BODY, TOKEN_FAILURES, TOKEN_WINDOW_S
from tests.test_pipeline import ListSource, part
from tests.test_service import Subscriber, brightness_loader, write_config
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-the-tests-0123456789"


class Station:
    """A started daemon with its page, a broker and an MQTT subscriber; `http` talks to the page."""

    def __init__(self, daemon: Daemon, broker: LocalBroker, sub: Subscriber) -> None:
        self.daemon = daemon
        self.broker = broker
        self.sub = sub
        assert daemon.web is not None
        self.host, self.port = "127.0.0.1", daemon.web.port

    def http(self, method: str, path: str, body: bytes | str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request (the path is sent as given, '..' included)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, _, body = self.http("GET", path)
        assert status == 200, body
        return json.loads(body)

    def command(self, command: dict[str, Any] | bytes, **headers: str) -> tuple[int, dict[str, Any]]:
        """POST a control with the right token and JSON type unless headers override them."""
        sent = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        sent |= {k.replace("_", "-"): v for k, v in headers.items()}
        sent = {k: v for k, v in sent.items() if v != ""}
        body = command if isinstance(command, bytes) else json.dumps(command).encode()
        status, _, raw = self.http("POST", "/api/cmd", body, sent)
        return status, json.loads(raw)

    def untouched(self) -> bool:
        """The pipeline is as the fixture left it: running SKU a, not paused."""
        pipeline = self.daemon.running
        return not pipeline.paused and pipeline.sku.name == "a"


def token_file(folder: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = folder / "web.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    tmp_path = tmp_path_factory.mktemp("web")
    broker = start_local_broker(tmp_path / "broker")
    config = write_config(tmp_path, broker.port,
                          web={"enabled": True, "port": 0, "token_file": token_file(tmp_path), "live_fps": 20})
    images = [part(defect_xywh=(5, 5, 12, 12)) if i % 4 == 0 else part() for i in range(1, 20001)]
    daemon = Daemon(config, source=ListSource(images, interval_s=0.02), sku_loader=brightness_loader())
    sub = Subscriber(broker.port, config.topic_root)
    daemon.start()
    try:
        yield Station(daemon, broker, sub)
    finally:
        daemon.stop()
        sub.close()
        broker.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition, or None."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if found == labels:
                return float(match.group(3))
    return None


def test_page_and_its_files_are_served_with_security_headers(station: Station) -> None:
    status, headers, body = station.http("GET", "/")
    assert status == 200 and b'id="badge"' in body
    assert "script-src" not in headers["content-security-policy"]  # default-src 'self': no inline script
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css"):
        assert station.http("GET", asset)[0] == 200
    info = station.get_json("/api/info")
    assert info == {"line": "L1", "station": "S1", "skus": ["a", "b", "nocal"], "controls": True, "live_fps": 20.0}


def test_metrics_count_verdicts_and_show_the_station_state(station: Station) -> None:
    assert wait_until(lambda: (station.daemon.running.stats.snapshot()["ng"] or 0) >= 2)
    status, headers, body = station.http("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert (metric(text, "inspector_verdicts_total", result="ng", sku="a") or 0) >= 2
    assert (metric(text, "inspector_verdicts_total", result="ok", sku="a") or 0) >= 2
    assert metric(text, "inspector_fail_safe_verdicts_total", reason="deadline_missed") == 0
    assert (metric(text, "inspector_camera_to_verdict_seconds_count") or 0) >= 4
    assert (metric(text, "inspector_engine_seconds_count") or 0) >= 4
    assert metric(text, "inspector_active_sku", sku="a") == 1
    assert metric(text, "inspector_engine_info", backend="test", precision="") == 1
    assert metric(text, "inspector_broker_connected") == 1 and metric(text, "inspector_camera_connected") == 1
    assert metric(text, "inspector_queue_depth") is not None and metric(text, "inspector_spool_backlog") is not None
    assert (metric(text, "inspector_frames_acquired_total") or 0) >= 4
    assert metric(text, "inspector_not_ready") == 0
    assert all(metric(text, "inspector_verdicts_lost_total", cause=c) == 0
               for c in ("dropped_ok", "dropped_ng", "unsaved", "lost_in_crash"))


def test_metrics_show_a_held_station_and_every_counted_loss() -> None:
    spool = {"dropped_ok": 3, "dropped_ng": 1, "unsaved": 2, "lost_in_crash": 5}
    text = StationMetrics(lambda: {"not_ready": "spool disk full and broker unreachable", "spool": spool}
                          ).exposition().decode()
    assert metric(text, "inspector_not_ready") == 1
    assert {c: metric(text, "inspector_verdicts_lost_total", cause=c) for c in spool} == spool


def read_events(station: Station, wanted: set[str], timeout_s: float = 20.0) -> dict[str, dict[str, Any]]:
    """Open the SSE stream and return the first event of each wanted kind."""
    conn = http.client.HTTPConnection(station.host, station.port, timeout=timeout_s)
    conn.request("GET", "/api/events")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    events: dict[str, dict[str, Any]] = {}
    kind = None
    try:
        while not wanted <= events.keys():
            line = response.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind is not None:
                events.setdefault(kind, json.loads(line[6:]))
    finally:
        conn.close()
    return events


def test_event_stream_sends_state_and_the_live_frame_with_its_overlay(station: Station) -> None:
    events = read_events(station, {"state", "frame"})
    state, frame = events["state"], events["frame"]
    assert state["status"]["sku"] == "a" and state["skus"]["a"]["frames"] >= 1 and state["pages"] >= 1
    assert {"frame_id", "ok", "score", "threshold", "latency_ms"} <= frame["verdict"].keys()
    prefix = "data:image/jpeg;base64,"
    assert frame["image"].startswith(prefix)
    jpeg = cv2.imdecode(np.frombuffer(base64.b64decode(frame["image"][len(prefix):]), np.uint8), cv2.IMREAD_COLOR)
    assert jpeg.shape[:2] == (frame["height"], frame["width"]) and min(jpeg.shape[:2]) >= 480


REFUSED = [
    ("missing token", {"cmd": "pause"}, {"authorization": ""}, 401, "missing control token"),
    ("wrong token", {"cmd": "pause"}, {"authorization": "Bearer not-the-token"}, 403, "wrong control token"),
    ("basic auth", {"cmd": "pause"}, {"authorization": f"Basic {TOKEN}"}, 401, "missing control token"),
    ("foreign origin", {"cmd": "pause"}, {"origin": "http://evil.example"}, 403, "origin http://evil.example"),
    ("form post", {"cmd": "pause"}, {"content_type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("huge body", b'{"cmd": "pause", "pad": "' + b"x" * (MAX_BODY + 10) + b'"}', {}, 413, "over 4096 bytes"),
    ("not json", b"{pause", {}, 400, "malformed command"),
    ("not an object", b"[1, 2]", {}, 400, "malformed command"),
    ("infinite id", b'{"cmd": "pause", "id": 1e400}', {}, 400, "malformed command: number 1e400 is out of range"),
    ("NaN id", b'{"cmd": "pause", "id": NaN}', {}, 400, "malformed command: NaN is not JSON"),
    ("unknown command", {"cmd": "reboot"}, {}, 400, "unknown command 'reboot'"),
    ("status is not a control", {"cmd": "status"}, {}, 400, "unknown command 'status'"),
    ("unknown SKU", {"cmd": "sku", "sku": "nope"}, {}, 400, "unknown SKU 'nope'"),
    ("SKU missing", {"cmd": "sku"}, {}, 400, 'a changeover needs "sku": configured SKUs are a, b, nocal'),
]


@pytest.mark.parametrize(("command", "headers", "status", "error"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_bad_controls_get_a_clear_4xx_and_never_reach_the_pipeline(
        station: Station, command: Any, headers: dict[str, str], status: int, error: str) -> None:
    got, reply = station.command(command, **headers)
    assert (got, reply["ok"]) == (status, False)
    assert error in reply["error"] and "Traceback" not in reply["error"]
    assert station.untouched()


def test_get_on_the_control_route_is_not_allowed(station: Station) -> None:
    assert station.http("GET", "/api/cmd")[0] == 405
    assert station.untouched()


def test_controls_run_the_mqtt_command_path_with_the_same_replies(station: Station) -> None:
    try:
        web_status, web_reply = station.command({"cmd": "pause", "id": 7}, origin=f"http://127.0.0.1:{station.port}")
        assert (web_status, web_reply) == (200, {"id": 7, "cmd": "pause", "ok": True, "paused": True})
        assert station.daemon.running.paused
        station.sub.send(json.dumps({"cmd": "resume", "id": 8}))
        assert station.sub.wait_for(lambda: any(r.get("id") == 8 for r in station.sub.json("cmd/reply")))
        mqtt_reply = next(r for r in station.sub.json("cmd/reply") if r.get("id") == 8)
        web_status, web_reply = station.command({"cmd": "resume", "id": 8})
        assert (web_status, web_reply) == (200, mqtt_reply) == (200, {"id": 8, "cmd": "resume", "ok": True,
                                                                      "paused": False})

        status, reply = station.command({"cmd": "reload"})
        assert status == 200 and reply["ok"] and reply["sku"] == "a" and reply["image_threshold"] > 0

        status, reply = station.command({"cmd": "sku", "sku": "nocal"})  # configured, but never calibrated
        assert status == 409 and not reply["ok"] and "inspector calibrate --sku nocal" in reply["error"]

        status, reply = station.command({"cmd": "sku", "sku": "b"})
        assert status == 200 and reply["ok"] and reply["state"] == "active"
        assert station.get_json("/api/status")["status"]["sku"] == "b"
        # the page waits for the final reply: no interim "loading" reply goes to the PLCs on /cmd/reply
        assert [r.get("state") for r in station.sub.json("cmd/reply")] == [None]
    finally:
        station.command({"cmd": "sku", "sku": "a"})
        station.command({"cmd": "resume"})
    assert wait_until(station.untouched)


def test_ng_strip_lists_archived_parts_and_archive_urls_stay_inside_the_archive(station: Station) -> None:
    assert wait_until(lambda: bool(station.get_json("/api/ng")["parts"]))
    newest = station.get_json("/api/ng")["parts"][0]
    assert not newest["verdict"]["ok"]
    for key, kind in (("json", "application/json"), ("image", "image/png"), ("heat", "image/png")):
        status, headers, _ = station.http("GET", "/" + newest[key])
        assert status == 200 and headers["content-type"] == kind
    day = "/".join(newest["json"].split("/")[1:-1])  # archive/<sku>/<day>/<file>
    for path in ("/archive/../inspector.toml", "/archive/%2e%2e/inspector.toml",
                 f"/archive/{day}/../../../inspector.toml", "/archive/..%2f..%2finspector.toml"):
        status, _, body = station.http("GET", path)
        assert status in (400, 404), (path, status)
        assert b"active_sku" not in body and b"Traceback" not in body
    assert station.http("GET", "/archive/../inspector.toml")[0] == 400
    assert station.http("GET", f"/archive/{day}/missing.png")[0] == 404
    assert station.http("GET", "/archive//etc/passwd")[0] in (400, 404)


def test_malformed_paths_get_a_4xx_and_never_a_traceback_in_the_log(
        station: Station, caplog: pytest.LogCaptureFixture) -> None:
    long = "a" * 5000  # longer than any file name or path the filesystem takes
    paths = ["/archive/x%00.png", "/archive/a/%00/b.json", f"/archive/{long}.png", f"/archive/{long}/x.json",
             "/archive/%ff.png", "/static/x%00.js", f"/static/{long}.js", "/%00", "/api/status%00"]
    with caplog.at_level(logging.WARNING), capture_logs() as events:
        for path in paths:
            status, _, body = station.http("GET", path)
            assert 400 <= status < 500 and b"Traceback" not in body, (path[:40], status)
    assert not [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not [e for e in events if "exc_info" in e or e["log_level"] in ("error", "critical")]


class Clock:
    """A monotonic clock that only the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def control(port: int, token: str, command: dict[str, Any], client: str = "127.0.0.1"
            ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST a control from the loopback address `client` (the whole of 127.0.0.0/8 reaches a 127.0.0.1 listener)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(client, 0))
    try:
        conn.request("POST", "/api/cmd", body=json.dumps(command).encode(),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
    finally:
        conn.close()


def test_wrong_tokens_lock_out_one_client_for_its_window_and_are_logged_once(station: Station, tmp_path: Path) -> None:
    clock = Clock()
    cfg = WebConfig(enabled=True, port=0, token_file=token_file(tmp_path), live_fps=20)
    web = StationWeb(cfg, station.daemon, skus=["a"], clock=clock).start()
    wrong = "not-the-token-0123456789"
    try:
        with capture_logs() as events:
            answers = [control(web.port, "" if i == 0 else wrong, {"cmd": "pause"}) for i in range(200)]
            assert [a[0] for a in answers] == [401] + [403] * (TOKEN_FAILURES - 1) + [429] * (200 - TOKEN_FAILURES)
            status, headers, reply = control(web.port, TOKEN, {"cmd": "pause"})  # the right token, still locked out
            assert (status, headers["retry-after"]) == (429, str(int(TOKEN_WINDOW_S)))
            assert "retry in 10 s" in reply["error"] and station.untouched()
            status, _, reply = control(web.port, TOKEN, {"cmd": "reload"}, client="127.0.0.2")  # another client
            assert status == 200 and reply["ok"]
            assert not [e for e in events if e["event"] in ("web_command_refused", "web_token_failures")]
            clock.now += TOKEN_WINDOW_S
            assert wait_until(lambda: any(e["event"] == "web_token_failures" for e in events))
            status, _, reply = control(web.port, TOKEN, {"cmd": "reload"})
            assert status == 200 and reply["ok"]
        summaries = [e for e in events if e["event"] == "web_token_failures"]
        assert [(e["client"], e["failures"], e["locked_out"]) for e in summaries] == [("127.0.0.1", 5, 196)]
        assert not [e for e in events if e["event"] == "web_command_refused"]
    finally:
        web.stop()
    assert station.untouched()


def test_a_loopback_page_answers_only_to_loopback_host_names(station: Station) -> None:
    """DNS rebinding: a page of another site resolved to 127.0.0.1 sends its own Host and is refused."""
    assert station.http("GET", "/api/status", headers={"Host": "evil.example"})[0] == 400
    assert station.http("GET", "/api/status", headers={"Host": f"localhost:{station.port}"})[0] == 200


def test_without_a_token_file_the_controls_are_off(station: Station) -> None:
    web = StationWeb(WebConfig(enabled=True, port=0), station.daemon, skus=["a"]).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=30)
        conn.request("POST", "/api/cmd", body=b'{"cmd": "pause"}',
                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        response = conn.getresponse()
        reply = json.loads(response.read())
        conn.close()
        assert response.status == 403 and "set web.token_file" in reply["error"]
    finally:
        web.stop()
    assert station.untouched()


def test_a_taken_port_is_one_config_error_naming_the_key(station: Station) -> None:
    with pytest.raises(ConfigError, match=r"web: cannot listen on 127.0.0.1:\d+ .*set web.port"):
        StationWeb(WebConfig(enabled=True, port=station.port), station.daemon, skus=["a"])


def test_web_config_rules(tmp_path: Path) -> None:
    assert WebConfig().host == "127.0.0.1" and not WebConfig().enabled and not WebConfig().open_view
    with pytest.raises(ValueError, match="open_view = true"):
        WebConfig(host="0.0.0.0")
    assert WebConfig(host="0.0.0.0", open_view=True).host == "0.0.0.0"
    assert WebConfig(host="::1").host == "::1" and WebConfig(host="localhost").host == "localhost"
    assert WebConfig(token_file=token_file(tmp_path)).read_token() == TOKEN
    with pytest.raises(ConfigError, match="world-readable"):
        WebConfig(token_file=token_file(tmp_path, mode=0o644)).read_token()
    with pytest.raises(ConfigError, match="at least 16"):
        WebConfig(token_file=token_file(tmp_path, token="short")).read_token()
    with pytest.raises(ConfigError, match="not found"):
        WebConfig(token_file=tmp_path / "absent").read_token()


def test_config_file_web_section_errors_name_the_key_and_hide_the_token(tmp_path: Path) -> None:
    base = '\nactive_sku = "a"\n[skus.a]\nmodel_dir = "a"\n'
    path = tmp_path / "inspector.toml"
    path.write_text(base + '[web]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match=r"inspector.toml: web: .*open_view = true"):
        load_config(path)
    path.write_text(base + f'[web]\nenabled = true\ntoken_file = "{token_file(tmp_path)}"\n')
    assert TOKEN not in repr(masked_dump(load_config(path)))


def test_live_overlay_draws_heat_map_mask_outline_and_defect_boxes() -> None:
    image = np.full((100, 100, 3), 90, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 0.9  # a defect in the model's 32 px map of the ROI (20, 20, 64, 64)
    regions = regions_from_mask(heat, 0.5, 1, scale_xy=(2.0, 2.0), offset_xy=(20, 20))
    verdict = Verdict(frame_id=1, run_id="r", t_acquired=0.0, sku="a", ok=False, score=0.9, threshold=0.5,
                      regions=regions, engine="test", line="l", station="s")
    rendered = render_overlay(Published(verdict, image, heat, (20, 20, 64, 64), 0.5))
    assert rendered is not None
    jpeg, (width, height) = rendered
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert (width, height) == (480, 480) == bgr.shape[1::-1]  # small frames are scaled up to MIN_SIDE
    scale = 4.8
    box = regions[0]
    left, top, right = round(box.x * scale), round(box.y * scale), round((box.x + box.w) * scale)
    b, g, r = (int(c) for c in bgr[top + 30, left - 5])  # the red box, just outside the region
    assert r > 150 and g < 100 and b < 100, (b, g, r)
    for edge in (left, right):  # the white mask outline, on the region's edges
        assert (bgr[top + 30, edge - 3:edge + 3] > 200).all(axis=1).any()
    assert bgr[5, 5].tolist() == pytest.approx([90, 90, 90], abs=12)  # outside the ROI: the frame untouched
    assert render_overlay(Published(verdict, None, heat, None, 0.5)) is None


@pytest.mark.parametrize("dashboard_file", ["inspector-station.json", "inspector-plant.json"])
def test_grafana_dashboard_queries_only_metrics_the_station_exports(dashboard_file: str) -> None:
    """Every metric a dashboard's panels and template variables query is one the daemon's /metrics exports."""
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana" / dashboard_file).read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"]]
    used = {name for query in queries for name in re.findall(r"inspector_[a-z_]+", query)}
    metrics = StationMetrics(lambda: {"stats": {"acquired": 1}, "queued": 0, "spool_pending": 0, "paused": False,
                                      "camera_connected": True, "broker_connected": True, "sku": "a",
                                      "engine": {"backend": "onnxruntime", "precision": "fp32"},
                                      "drift": {"events": 0, "statistics": {
                                          "brightness": {"value": 0.01, "bound": 0.04, "alarm": False}}},
                                      "trend": {"minute": {"score": {"p50": 0.2, "p90": 0.3, "p99": 0.4}},
                                                "threshold": 0.5}})
    metrics.observe(Verdict(frame_id=1, run_id="r", t_acquired=0.0, sku="a", ok=False,
                            latency_ms={"infer": 5.0, "total": 9.0},
                            engine="onnxruntime", line="l", station="s", reason="deadline_missed"))
    exported = {line.split("{")[0].split(" ")[0] for line in metrics.exposition().decode().splitlines()
                if line and not line.startswith("#")}
    assert used and used <= exported, used - exported
