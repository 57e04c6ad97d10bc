"""Service lifecycle against a real mosquitto and a real sd_notify socket: READY/WATCHDOG/STOPPING, status,
commands (pause/resume, changeover, malformed, unknown SKU), threshold reload and operator errors.

The engine is the small BrightnessEngine of test_pipeline (our Engine protocol), so these tests run in
seconds; the trained-model paths are covered by test_daemon_integration.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from calibration.thresholds import save_calibration
from foundation.errors import DataError
from inspector.broker import LocalBroker
from inspector.config import InspectorConfig, load_config
from inspector.decider import Decider
from inspector.mqtt import WINDOW
from inspector.pipeline import ActiveSku
from inspector.service import Daemon, load_sku, load_thresholds
from tests.stations import write_station
from tests.test_decider import make_calibration
from tests.test_pipeline import BrightnessEngine, ListSource, part
from tests.waiting import holds_for, wait_until

pytestmark = pytest.mark.integration


class Subscriber:
    """A paho client that records every message under topic_root/# (payload bytes, arrival order).

    persistent=True: a QoS 1 session the broker keeps (and fills) while this client is disconnected.
    """

    def __init__(self, port: int, topic_root: str, persistent: bool = False) -> None:
        self.root = topic_root
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topic_root}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscriber did not subscribe"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    def json(self, leaf: str) -> list[dict[str, Any]]:
        """Decoded JSON payloads received on topic_root/leaf."""
        with self._cond:
            return [json.loads(p) for t, p in self.messages if t == f"{self.root}/{leaf}"]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
        """Wait until predicate() holds (re-checked on every message)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.2))
        return True

    def send(self, payload: bytes | str) -> None:
        """Publish a raw command on topic_root/cmd."""
        self.client.publish(f"{self.root}/cmd", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, read by a thread like systemd."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sdn"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self._received: list[str] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self._received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def drain(self) -> list[str]:
        """Notifications received since the last drain()."""
        time.sleep(0.15)
        taken, self._received[:] = list(self._received), []
        return taken

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    yield sock
    sock.close()


def write_config(tmp_path: Path, port: int, skus: dict[str, dict[str, Any]] | None = None,
                 **tables: dict[str, Any]) -> InspectorConfig:
    """A config of SKUs a and b (calibrated) and nocal (a model_dir without calibration) on the local broker, plus
    `skus` and `tables` (tests/stations.py)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
        save_calibration(make_calibration(), tmp_path / name / "calibration.json")
    (tmp_path / "nocal").mkdir(exist_ok=True)
    known = {"a": {"model_dir": "a"}, "b": {"model_dir": "b"}, "nocal": {"model_dir": "nocal"}}
    return load_config(write_station(
        tmp_path / "inspector.toml", port=port, line_id="L1", station_id="S1", active="a", skus=known | (skus or {}),
        archive={"dir": "archive"} | tables.pop("archive", {}),
        service={"frame_timeout_ms": 5000} | tables.pop("service", {}), **tables))


def brightness_loader(engines: dict[str, BrightnessEngine] | None = None
                      ) -> Callable[[InspectorConfig, str], ActiveSku]:
    """A sku_loader with the real calibration file but a BrightnessEngine (optionally one per SKU)."""

    def load(config: InspectorConfig, name: str) -> ActiveSku:
        calibration = load_thresholds(config, name)
        engine = (engines or {}).get(name) or BrightnessEngine()
        return ActiveSku(name, engine, Decider(calibration, top_k=4), config.skus[name].roi)

    return load


def test_lifecycle_ready_watchdog_status_commands_changeover_and_stop(
        tmp_path: Path, broker: LocalBroker, notify: NotifySocket) -> None:
    config = write_config(tmp_path, broker.port)
    sub = Subscriber(broker.port, config.topic_root)
    source = ListSource([part(defect_xywh=(5, 5, 10, 10)) if i % 5 == 0 else part() for i in range(1, 2001)],
                        interval_s=0.02)
    daemon = Daemon(config, source=source, sku_loader=brightness_loader())
    daemon.start()
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 5)
        assert sub.wait_for(lambda: any(s.get("sku") == "a" for s in sub.json("status")))
        status = sub.json("status")[-1]
        assert status["state"] == "online" and status["camera_connected"] and status["engine"]["backend"] == "test"

        sub.send(b"{not json")
        sub.send(json.dumps({"cmd": "reboot", "id": 1}))
        sub.send(json.dumps({"sku": "nope", "id": 2}))
        sub.send(json.dumps({"cmd": "pause", "id": 3}))
        assert sub.wait_for(lambda: len(sub.json("cmd/reply")) >= 4)
        malformed, unknown, bad_sku, paused = sub.json("cmd/reply")[:4]
        assert not malformed["ok"] and "malformed" in malformed["error"]
        assert not unknown["ok"] and unknown["id"] == 1 and "unknown command" in unknown["error"]
        assert not bad_sku["ok"] and bad_sku["id"] == 2 and "unknown SKU 'nope'" in bad_sku["error"]
        assert paused == {"id": 3, "cmd": "pause", "ok": True, "paused": True}
        held = source.produced  # paused: at most the frame already being acquired still comes
        assert holds_for(lambda: source.produced <= held + 1, 0.8)

        sub.send(json.dumps({"cmd": "resume", "id": 4}))
        sub.send(json.dumps({"cmd": "sku", "sku": "b", "id": 5}))
        assert sub.wait_for(lambda: any(r.get("state") == "active" for r in sub.json("cmd/reply")))
        replies = [r for r in sub.json("cmd/reply") if r.get("id") == 5]
        assert [r["state"] for r in replies] == ["loading", "active"] and all(r["ok"] for r in replies)
        assert any(s.get("loading_sku") == "b" for s in sub.json("status"))
        assert sub.wait_for(lambda: sub.json("verdict")[-1]["sku"] == "b")
        sub.send(json.dumps({"sku": "nocal", "id": 6}))
        assert sub.wait_for(lambda: any(r.get("id") == 6 and not r["ok"] for r in sub.json("cmd/reply")))
        failed = next(r for r in sub.json("cmd/reply") if r.get("id") == 6 and not r["ok"])
        assert "inspector calibrate --sku nocal" in failed["error"]
        assert daemon.pipeline is not None and daemon.pipeline.sku.name == "b"
    finally:
        assert daemon.stop()
        sub.wait_for(lambda: sub.json("status")[-1]["state"] == "offline", 5)
    verdicts = sub.json("verdict")
    ids = [v["frame_id"] for v in verdicts]
    assert ids == list(range(1, source.produced + 1))  # one verdict per acquired frame, in order
    assert {v["run_id"] for v in verdicts} == {daemon.run_id}
    final = sub.json("status")[-1]
    assert final["state"] == "offline" and final["run_state"] == "stopped" and final["broker_connected"] is False
    assert final["run_id"] == daemon.run_id and final["stats"]["frames"] == len(ids)
    notes = notify.drain()
    assert any("READY=1" in n for n in notes) and any("STOPPING=1" in n for n in notes)
    assert sum(n == "WATCHDOG=1" for n in notes) >= 3
    assert any(n.startswith("STATUS=") for n in notes)
    sub.close()


def test_watchdog_is_withheld_while_the_engine_hangs(tmp_path: Path, broker: LocalBroker,
                                                     notify: NotifySocket) -> None:
    config = write_config(tmp_path, broker.port)
    gate = threading.Event()
    daemon = Daemon(config, source=ListSource([part()] * 3), sku_loader=brightness_loader({"a": BrightnessEngine(
        gate=gate)}))
    daemon.stuck_after_s = 0.5
    daemon.start()
    time.sleep(1.5)
    notify.drain()
    time.sleep(1.0)
    assert "WATCHDOG=1" not in notify.drain()
    gate.set()
    assert daemon.wait_finished(5)
    time.sleep(0.6)
    assert "WATCHDOG=1" in notify.drain()  # a finished (idle) pipeline is healthy again
    daemon.stop()


def test_sighup_and_reload_command_pick_up_new_thresholds_and_keep_old_on_a_bad_file(
        tmp_path: Path, broker: LocalBroker) -> None:
    config = write_config(tmp_path, broker.port)
    daemon = Daemon(config, source=ListSource([]), sku_loader=brightness_loader())
    daemon.start()
    try:
        assert daemon.pipeline is not None
        save_calibration(make_calibration(image_threshold=0.9), tmp_path / "a" / "calibration.json")
        daemon.reload_thresholds()
        assert daemon.pipeline.sku.decider.calibration.image_threshold == 0.9
        save_calibration(make_calibration(image_threshold=0.8), tmp_path / "a" / "calibration.json")
        reply = daemon.handle_command({"cmd": "reload", "id": 4})  # the /cmd (and station page) way
        assert reply["ok"] and reply["id"] == 4 and reply["image_threshold"] == 0.8
        (tmp_path / "a" / "calibration.json").write_text("{broken")
        daemon.reload_thresholds()
        reply = daemon.handle_command({"cmd": "reload"})
        assert not reply["ok"] and reply["error"].startswith("thresholds kept")
        assert daemon.pipeline.sku.decider.calibration.image_threshold == 0.8
    finally:
        daemon.stop()


def test_missing_calibration_and_model_dir_name_their_own_fixes(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1883, skus={"gone": {"model_dir": "gone"}})
    with pytest.raises(DataError, match=r"inspector calibrate --sku nocal"):
        load_sku(config, "nocal")
    with pytest.raises(DataError, match=r"skus\.gone\.model_dir = .*gone does not exist; train the SKU") as info:
        load_thresholds(config, "gone")
    assert "calibrate" not in str(info.value)


def test_hostile_commands_get_error_replies_and_pause_still_works(tmp_path: Path, broker: LocalBroker,
                                                                  notify: NotifySocket) -> None:
    config = write_config(tmp_path, broker.port)
    sub = Subscriber(broker.port, config.topic_root)
    daemon = Daemon(config, source=ListSource([part()] * 3000, interval_s=0.02), sku_loader=brightness_loader())
    daemon.start()
    hostile = [
        b"[" * 1000 + b"]" * 1000,  # RecursionError inside json.loads
        b'{"cmd": ' + b"[" * 800 + b"]" * 800 + b"}",  # parses; a nested "cmd" must not reach repr() or the log
        b'{"id": ' + b"[" * 800 + b"]" * 800 + b', "cmd": "status"}',  # an "id" that cannot be echoed safely
        json.dumps({"cmd": "status", "pad": "x" * (1 << 20)}).encode(),  # 1 MiB
        b"\xff\xfe not utf-8",
    ]
    try:
        for payload in hostile:
            sub.send(payload)
        sub.send(json.dumps({"cmd": "pause", "id": "after"}))
        assert sub.wait_for(lambda: any(r.get("id") == "after" for r in sub.json("cmd/reply")))
        *errors, paused = sub.json("cmd/reply")
        assert len(errors) == len(hostile) and not any(r["ok"] for r in errors)
        assert "malformed" in errors[0]["error"] and "must be a string" in errors[1]["error"]
        assert '"id"' in errors[2]["error"] and "too large" in errors[3]["error"]
        assert paused == {"id": "after", "cmd": "pause", "ok": True, "paused": True}
        assert daemon.health() is None
        notify.drain()
        assert sub.wait_for(lambda: "WATCHDOG=1" in notify.drain(), 5)
    finally:
        daemon.stop()
        sub.close()


def test_changeovers_coalesce_and_never_hold_up_a_pause(tmp_path: Path, broker: LocalBroker) -> None:
    """31 alternating changeovers while the first load hangs: the pause sent after them is answered within a
    second, the last SKU requested wins (loaded once), and every request gets exactly one final reply."""
    config = write_config(tmp_path, broker.port)
    loader, gate, loads = brightness_loader(), threading.Event(), []

    def slow_load(config: InspectorConfig, name: str) -> ActiveSku:
        loads.append(name)
        if name == "b":
            gate.wait(60)  # an engine that takes long to build and warm up
        return loader(config, name)

    sub = Subscriber(broker.port, config.topic_root)
    daemon = Daemon(config, source=ListSource([part()] * 3000, interval_s=0.02), sku_loader=slow_load)
    daemon.start()
    requested = ["b", "a"] * 15 + ["b"]
    try:
        for i, sku in enumerate(requested, 1):
            sub.send(json.dumps({"sku": sku, "id": i}))
        sent = time.monotonic()
        sub.send(json.dumps({"cmd": "pause", "id": "pause"}))
        answered = sub.wait_for(lambda: any(r.get("id") == "pause" for r in sub.json("cmd/reply")),
                                1.0 - (time.monotonic() - sent))
        assert answered, "the pause waited behind the changeovers"
        assert daemon.running.paused and loads == ["a", "b"]  # the start's load, then the first changeover's
        gate.set()

        def finals() -> list[dict[str, Any]]:
            return [r for r in sub.json("cmd/reply") if r.get("id") != "pause" and r.get("state") != "loading"]

        assert sub.wait_for(lambda: {r["id"] for r in finals()} == set(range(1, len(requested) + 1)))
        assert holds_for(lambda: len(finals()) == len(requested), 0.5)
    finally:
        gate.set()
        daemon.stop()
        sub.close()
    by_id = {r["id"]: r for r in finals()}
    assert daemon.running.sku.name == "b" and loads == ["a", "b"]
    assert by_id[len(requested)] == {"id": len(requested), "cmd": "sku", "ok": True, "sku": "b", "state": "active",
                                     "load_s": by_id[len(requested)]["load_s"]}
    for i, sku in enumerate(requested[:-1], 1):  # every "a" finds a active; every "b" is replaced by the next "a"
        expected = (("a", True, "active") if sku == "a" else ("b", False, "superseded"))
        assert (by_id[i]["sku"], by_id[i]["ok"], by_id[i]["state"]) == expected, by_id[i]
        assert sku == "a" or by_id[i]["superseded_by"] == "a"


def test_a_changeover_dropped_after_its_load_closes_the_engine_it_loaded(tmp_path: Path, broker: LocalBroker) -> None:
    """b is requested, then a (which inspects) while b loads: b's loaded engine is never swapped in and is closed."""
    config = write_config(tmp_path, broker.port)
    engine_b, gate, loads = BrightnessEngine(), threading.Event(), []
    loader = brightness_loader({"b": engine_b})

    def slow_load(config: InspectorConfig, name: str) -> ActiveSku:
        loads.append(name)
        if name == "b":
            gate.wait(60)
        return loader(config, name)

    daemon = Daemon(config, source=ListSource([part()] * 3000, interval_s=0.02), sku_loader=slow_load)
    daemon.start()
    try:
        assert daemon.change_sku("b", {}, wait=False)["state"] == "loading"
        assert wait_until(lambda: loads == ["a", "b"])  # b's load is under way
        assert daemon.change_sku("a", {}, wait=False)["state"] == "active"
        gate.set()
        assert wait_until(lambda: engine_b.closed)
        assert daemon.running.sku.name == "a" and engine_b.batches == []
    finally:
        gate.set()
        daemon.stop()


class Fatal(BaseException):
    """What no handler may swallow (SystemExit's kind): it ends the thread it is raised on."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_changeover_thread_withholds_the_watchdog(tmp_path: Path, broker: LocalBroker,
                                                      notify: NotifySocket) -> None:
    config = write_config(tmp_path, broker.port)
    loader = brightness_loader()

    def load(config: InspectorConfig, name: str) -> ActiveSku:
        if name == "b":
            raise Fatal("the changeover thread dies here")
        return loader(config, name)

    sub = Subscriber(broker.port, config.topic_root)
    daemon = Daemon(config, source=ListSource([part()] * 3000, interval_s=0.02), sku_loader=load)
    daemon.start()
    try:
        assert sub.wait_for(lambda: "WATCHDOG=1" in notify.drain(), 5)
        with capture_logs() as logs:
            sub.send(json.dumps({"sku": "b"}))
            assert sub.wait_for(lambda: any(e["event"] == "watchdog_withheld" for e in logs), 10)
        assert "changeover died" in str(daemon.health())
        notify.drain()
        time.sleep(1.0)  # five watchdog periods (WATCHDOG_USEC = 0.2 s): none may be pinged
        assert "WATCHDOG=1" not in notify.drain()
    finally:
        daemon.stop()
        sub.close()


def test_stop_with_a_frozen_broker_keeps_to_drain_timeout(tmp_path: Path, broker: LocalBroker) -> None:
    config = write_config(tmp_path, broker.port)
    config.service.drain_timeout_s = 3.0
    sub = Subscriber(broker.port, config.topic_root)
    daemon = Daemon(config, source=ListSource([part()] * 5000, interval_s=0.005), sku_loader=brightness_loader())
    daemon.start()
    assert broker.proc is not None
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 5)
        os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker hangs: TCP stays up, no PUBACK comes back
        publisher = daemon.publisher
        assert publisher is not None
        assert sub.wait_for(lambda: publisher.pending() > 2 * WINDOW, 20)
        t0 = time.monotonic()
        assert daemon.stop()
        elapsed = time.monotonic() - t0
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
        sub.close()
    assert elapsed <= config.service.drain_timeout_s, elapsed
    assert publisher.pending() > 0  # what the broker did not take stays spooled for the next start


def test_rejects_deduplicate_across_a_restart_by_run_id(tmp_path: Path, broker: LocalBroker) -> None:
    config = write_config(tmp_path, broker.port)
    images = [part(defect_xywh=(5, 5, 10, 10)) if i % 3 == 0 else part() for i in range(1, 41)]
    broker.stop()
    first = Daemon(config, source=ListSource(images), sku_loader=brightness_loader())
    first.start()
    assert first.wait_finished(30)
    first.stop()  # broker down: all 40 verdicts stay spooled
    broker.start()
    sub = Subscriber(broker.port, config.topic_root)
    second = Daemon(config, source=ListSource(images, interval_s=0.01), sku_loader=brightness_loader())
    second.start()
    try:
        assert second.wait_finished(30)
        assert sub.wait_for(lambda: len({(r["run_id"], r["frame_id"]) for r in sub.json("reject")}) >= 80)
    finally:
        second.stop()
        sub.close()
    rejects, verdicts = sub.json("reject"), sub.json("verdict")
    assert first.run_id != second.run_id and {r["run_id"] for r in rejects} == {first.run_id, second.run_id}
    assert len({r["frame_id"] for r in rejects}) == 40, "frame ids alone collide across the restart"
    by_key = {(r["run_id"], r["frame_id"]): r for r in rejects}
    assert len(by_key) == 80
    ok = {(v["run_id"], v["frame_id"]): v["ok"] for v in verdicts}
    assert all(r["reject"] == (0 if ok[key] else 1) and r["t_acquired"] > 0 for key, r in by_key.items())
