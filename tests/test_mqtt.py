"""Spool durability and the MQTT publisher against a real mosquitto: topics, LWT, outages, restarts, commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from foundation.errors import ConfigError
from inspector.config import MqttConfig
from inspector.mqtt import Publisher
from inspector.spool import Spool
from inspector.verdict import decode_mask_png, encode_mask_png
from tests.mosquitto import MosquittoProcess, free_port, start_mosquitto
from tests.small_fs import fill, small_fs
from tests.test_verdict import make_verdict
from tests.waiting import holds_for, wait_until

ROOT = "inspector/line1/station1"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- spool (no broker)


def drain(spool: Spool) -> list[tuple[int, list[tuple[str, bytes]]]]:
    """Take every unsent record."""
    records = []
    while (record := spool.take_next()) is not None:
        records.append(record)
    return records


def test_spool_round_trip_and_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    seqs = [
        spool.append([("a/verdict", f"v{i}".encode()), ("a/mask", bytes([0, 255, i]))], ng=i % 2 == 0) for i in range(5)
    ]
    assert seqs == [1, 2, 3, 4, 5] and spool.unacked() == 5
    records = drain(spool)
    assert [seq for seq, _ in records] == seqs
    assert records[2][1] == [("a/verdict", b"v2"), ("a/mask", bytes([0, 255, 2]))]
    for seq in seqs:
        spool.ack(seq)
    assert spool.unacked() == 0
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob("*.acks")), "acked segments are deleted"
    spool.close()


def test_spool_dir_is_exclusive(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    with pytest.raises(ConfigError, match=r"mqtt\.spool_dir = .* in use by another"):
        Spool(tmp_path, 1 << 20)
    spool.close()
    Spool(tmp_path, 1 << 20).close()


def test_spool_survives_restart_and_resends_unacked_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, segment_bytes=200)
    for i in range(10):
        spool.append([("t", f"{i:04d}".encode())], ng=False)
    taken = drain(spool)
    for seq in (1, 2, 3, 5):
        spool.ack(seq)
    assert len(taken) == 10
    spool.close()
    again = Spool(tmp_path, 1 << 20, segment_bytes=200)
    assert again.unacked() == 6
    assert [(seq, msgs[0][1]) for seq, msgs in drain(again)] == [
        (s, f"{s - 1:04d}".encode()) for s in (4, 6, 7, 8, 9, 10)
    ]
    assert again.append([("t", b"new")], ng=True) == 11
    again.close()


def test_spool_cuts_a_torn_last_record(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.append([("t", b"one")], ng=False)
    spool.close()
    (segment,) = tmp_path.glob("*.jsonl")
    with segment.open("ab") as f:
        f.write(b'{"seq":2,"ng":fal')  # power cut mid-write
    again = Spool(tmp_path, 1 << 20)
    assert [seq for seq, _ in drain(again)] == [1]
    assert again.append([("t", b"two")], ng=False) == 2
    again.close()
    third = Spool(tmp_path, 1 << 20)
    assert [msgs[0][1] for _, msgs in drain(third)] == [b"one", b"two"]


def test_spool_bound_drops_oldest_ok_before_ng_and_warns(tmp_path: Path) -> None:
    record_bytes = len(b'{"seq":10,"ng":false,"msgs":[["t","') + 4 * 100 // 3 + 4 + len(b'"]]}\n')
    spool = Spool(tmp_path, 10 * record_bytes)
    with capture_logs() as logs:
        for i in range(16):
            spool.append([("t", bytes(100))], ng=i in (0, 3, 7))
    kept = [seq for seq, _ in drain(spool)]
    assert {1, 4, 8} <= set(kept), "NG records are kept while OK ones can go"
    assert kept == sorted(kept) and len(kept) <= 10 and kept[-1] == 16
    assert spool.dropped_ok == 16 - len(kept) and spool.dropped_ng == 0
    assert spool.stats()["dropped_ok"] == spool.dropped_ok
    warnings = [e for e in logs if e["event"] == "spool_dropped"]
    assert len(warnings) == spool.dropped_ok and warnings[0]["log_level"] == "warning" and not warnings[0]["ng"]
    spool.close()


def test_spool_drops_ng_only_when_no_ok_is_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 300)
    for _ in range(10):
        spool.append([("t", bytes(60))], ng=True)
    assert spool.dropped_ng > 0 and spool.dropped_ok == 0
    assert [seq for seq, _ in drain(spool)][-1] == 10
    spool.close()


def test_spool_skips_a_damaged_line_and_a_repeated_seq_on_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    for i in range(3):
        spool.append([("t", f"r{i}".encode())], ng=False)
    spool.close()
    (segment,) = tmp_path.glob("*.jsonl")
    lines = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(lines[0] + b'{"seq":9,"ng":tr\n' + lines[1] + lines[2] + lines[2])
    with capture_logs() as logs:
        again = Spool(tmp_path, 1 << 20)
    assert [(seq, msgs[0][1]) for seq, msgs in drain(again)] == [(1, b"r0"), (2, b"r1"), (3, b"r2")]
    assert [e["detail"] for e in logs if e["event"] == "spool_torn_record"] == ["damaged line skipped"]
    assert again.append([("t", b"r3")], ng=False) == 4
    again.close()


def test_spool_ignores_a_torn_ack_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    for i in range(15):
        spool.append([("t", bytes([i]))], ng=False)
    drain(spool)
    spool.ack(13)
    spool.close()
    (acks,) = tmp_path.glob("*.acks")
    with acks.open("a") as f:
        f.write("1")  # "12\n" cut short by a crash must not acknowledge seq 1
    again = Spool(tmp_path, 1 << 20)
    assert [seq for seq, _ in drain(again)] == [s for s in range(1, 16) if s != 13]
    again.close()


def test_spool_on_a_full_disk_keeps_records_in_memory_in_order_and_spills_when_space_returns(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", 512) as fs:
        spool = Spool(fs / "spool", 64 << 20, reserve_bytes=64 << 10, segment_bytes=32 << 10)
        with capture_logs() as logs:
            for i in range(700):
                spool.append([("t", bytes(700))], ng=i % 7 == 0)
        assert spool.stats()["disk_full"] and spool.stats()["in_memory"] > 0 and spool.unacked() == 700
        assert [e["event"] for e in logs].count("spool_disk_full") == 1
        taken = drain(spool)
        assert [seq for seq, _ in taken] == list(range(1, 701))  # disk and memory records in one order
        with capture_logs() as logs:
            for seq, _ in taken[:400]:
                spool.ack(seq)  # delivered: whole segments go, space returns, memory records move to disk
            spool.append([("t", b"after")], ng=False)
        assert "spool_disk_ok" in [e["event"] for e in logs]
        assert spool.stats()["in_memory"] == 0 and not spool.stats()["disk_full"]
        spool.close()
        assert spool.unsaved == 0 and spool.dropped_ok == spool.dropped_ng == 0
        again = Spool(fs / "spool", 64 << 20, reserve_bytes=64 << 10)
        assert [seq for seq, _ in drain(again)] == list(range(401, 702))  # spilled records survive a restart
        again.close()


def test_spool_full_disk_and_memory_drop_whole_ok_segments_never_ng(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", 384) as fs:
        spool = Spool(fs / "spool", 64 << 20, reserve_bytes=64 << 10, segment_bytes=16 << 10,
                      memory_max_bytes=48 << 10)
        ng = {seq for seq in range(1, 1001) if seq % 5 == 0}
        with capture_logs() as logs:
            for seq in range(1, 1001):
                assert spool.append([("t", bytes(700))], ng=seq in ng) == seq
        kept = [seq for seq, _ in drain(spool)]
        assert ng <= set(kept) and kept == sorted(kept) and kept[-1] == 1000
        assert spool.dropped_ng == 0 and spool.dropped_ok == 1000 - len(kept) > 0
        assert any(e["event"] == "spool_dropped" and e.get("records", 1) > 1 for e in logs), "whole segments go"
        assert spool.free_bytes() >= 0
        spool.close()


def test_spool_close_on_a_full_disk_counts_what_only_memory_held(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", 256) as fs:
        spool = Spool(fs / "spool", 64 << 20, reserve_bytes=32 << 10)
        filler = fill(fs)
        for i in range(5):
            spool.append([("t", f"{i}".encode())], ng=i == 2)
        assert spool.stats()["in_memory"] == 5
        with capture_logs() as logs:
            spool.close()
        (event,) = [e for e in logs if e["event"] == "spool_unsaved"]
        assert event["records"] == 5 and event["ng"] == 1 and spool.unsaved == 5
        filler.unlink()


def test_spool_close_saves_ng_from_memory_before_ok_and_reports_what_is_on_disk(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", 384) as fs:
        spool = Spool(fs / "spool", 64 << 20, reserve_bytes=32 << 10, segment_bytes=16 << 10)
        while not spool.stats()["disk_full"]:
            spool.append([("t", bytes(700))], ng=False)
        ng = [spool.append([("t", bytes(700))], ng=True) for _ in range(3)]
        spool.append([("t", bytes(700))], ng=False)
        assert spool.stats()["in_memory"] == 5
        spool.close()
        assert spool.unsaved == 2 and spool.dropped_ok > 0 and spool.dropped_ng == 0
        on_disk = spool.unacked()
        again = Spool(fs / "spool", 64 << 20, reserve_bytes=32 << 10)
        kept = [seq for seq, _ in drain(again)]
        assert set(ng) <= set(kept) and len(kept) == on_disk, "the NG records went to disk; unacked() is the disk"
        assert again.lost_in_crash == 0, "a clean stop owes nothing at the next start"
        again.close()


JOURNAL_SCRIPT = """
import sys
from pathlib import Path
from inspector.spool import Spool
from tests.small_fs import fill
spool = Spool(Path(sys.argv[1]), 64 << 20, reserve_bytes=32 << 10)
for i in range(12):
    spool.note_acquired()
for i in range(4):
    spool.append([("t", bytes(700))], ng=i == 1)
fill(Path(sys.argv[1]).parent)
for i in range(5):
    spool.append([("t", bytes(700))], ng=i == 3)
assert spool.stats()["in_memory"] == 5
print("owed", flush=True)
sys.stdin.read()
"""


def test_a_killed_process_leaves_what_it_owed_countable_at_the_next_start(tmp_path: Path) -> None:
    # 12 frames acquired: 4 verdicts on disk, 5 only in memory (disk full), 3 never judged; then SIGKILL
    with small_fs(tmp_path / "fs", 256) as fs:
        proc = subprocess.Popen([sys.executable, "-c", JOURNAL_SCRIPT, str(fs / "spool")], cwd=REPO,
                                env=os.environ | {"PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert any(line.strip() == b"owed" for line in iter(proc.stdout.readline, b"")), "the script died"
        finally:
            proc.kill()
            proc.wait()
        (fs / "filler").unlink()
        with capture_logs() as logs:
            spool = Spool(fs / "spool", 64 << 20, reserve_bytes=32 << 10)
        (event,) = [e for e in logs if e["event"] == "verdicts_lost_in_crash"]
        assert (event["lost"], event["acquired"], event["accounted"]) == (8, 12, 4)
        assert spool.stats()["lost_in_crash"] == 8 and spool.unacked() == 4
        spool.close()
        again = Spool(fs / "spool", 64 << 20, reserve_bytes=32 << 10)
        assert again.lost_in_crash == 0, "counted once, by the start after the crash"
        again.close()


# ---------------------------------------------------------------- real broker


class Subscriber:
    """A paho client recording every message of `inspector/#` (QoS 1 unless given) with its topic, qos and retain
    flag; tls_client = (certificate, key) authenticates it with a client certificate."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        persistent: bool = False,
        tls_ca: Path | None = None,
        auth: tuple[str, str] | None = None,
        qos: int = 1,
        tls_client: tuple[Path, Path] | None = None,
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sub-{os.getpid()}-{id(self)}",
            clean_session=not persistent,
        )
        self.subscribed = threading.Event()  # set once the broker acknowledged the subscription
        self.client.on_connect = lambda c, *_: c.subscribe("inspector/#", qos=qos)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        if tls_ca is not None:
            certfile, keyfile = (str(tls_client[0]), str(tls_client[1])) if tls_client else (None, None)
            self.client.tls_set(ca_certs=str(tls_ca), certfile=certfile, keyfile=keyfile)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def on(self, suffix: str) -> list[mqtt.MQTTMessage]:
        """Messages received on ROOT/suffix so far."""
        with self._lock:
            return [m for m in self.messages if m.topic == f"{ROOT}/{suffix}"]

    def frame_ids(self) -> list[int]:
        """frame_id of every verdict received, in arrival order."""
        return [json.loads(m.payload)["frame_id"] for m in self.on("verdict")]

    def wait(self, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
        """Until predicate() holds; an assertion listing what arrived when it does not within timeout_s."""
        assert wait_until(predicate, timeout_s), f"timed out; got {[(m.topic, m.payload[:80]) for m in self.messages]}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_seen(ids: list[int]) -> list[int]:
    """Arrival order with at-least-once duplicates removed."""
    seen: dict[int, None] = {}
    for i in ids:
        seen.setdefault(i)
    return list(seen)


def mqtt_cfg(port: int, spool: Path, **kw: Any) -> MqttConfig:
    """Broker settings for the tests: fast reconnects, spool under tmp_path."""
    return MqttConfig(port=port, spool_dir=spool, reconnect_min_s=0.1, reconnect_max_s=0.5, **kw)


def test_world_readable_tls_key_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "station.crt", tmp_path / "station.key"
    cert.write_text("cert")
    key.write_text("key")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mqtt\.tls_key: secret file .* is world-readable"):
        Publisher(mqtt_cfg(free_port(), tmp_path / "spool", tls_cert=cert, tls_key=key), ROOT)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    process = start_mosquitto(tmp_path)
    yield process
    process.stop()


@pytest.fixture
def subscriber(broker: MosquittoProcess) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port)
    sub.wait(sub.subscribed.is_set, 5)
    yield sub
    sub.close()


@pytest.mark.integration
def test_topics_qos_retain_and_status(broker: MosquittoProcess, subscriber: Subscriber, tmp_path: Path) -> None:
    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool"), ROOT)
    publisher.start()
    subscriber.wait(lambda: publisher.connected)
    publisher.publish_status({"sku": "brick", "engine": "onnxruntime", "fps": 9.5})
    mask = encode_mask_png(np.eye(8, dtype=bool))
    publisher.publish_verdict(make_verdict(frame_id=1, ok=False), mask_png=mask)
    publisher.publish_verdict(make_verdict(frame_id=2, ok=True))
    subscriber.wait(lambda: len(subscriber.on("verdict")) == 2 and len(subscriber.on("reject")) == 2)
    subscriber.wait(lambda: publisher.pending() == 0)
    verdicts = subscriber.on("verdict")
    assert [json.loads(m.payload)["frame_id"] for m in verdicts] == [1, 2]
    assert json.loads(verdicts[0].payload)["ok"] is False and json.loads(verdicts[0].payload)["regions"]
    assert [(r["frame_id"], r["reject"]) for r in map(json.loads, (m.payload for m in subscriber.on("reject")))] == [
        (1, 1), (2, 0)]
    (mask_message,) = subscriber.on("mask")
    assert decode_mask_png(mask_message.payload).sum() == 8
    for message in verdicts + subscriber.on("reject") + [mask_message]:
        assert message.qos == 1 and not message.retain
    status = [json.loads(m.payload) for m in subscriber.on("status")]
    assert status[0]["state"] == "online" and status[-1]["sku"] == "brick" and status[-1]["spool"]["dropped_ok"] == 0
    publisher.stop(timeout_s=5)
    subscriber.wait(lambda: json.loads(subscriber.on("status")[-1].payload)["state"] == "offline")
    assert not publisher.connected

    late = Subscriber(broker.port)
    late.wait(lambda: bool(late.on("status")))
    (retained,) = late.on("status")
    assert retained.retain and json.loads(retained.payload)["state"] == "offline"
    assert json.loads(retained.payload)["reason"] == "stopped" and json.loads(retained.payload)["sku"] == "brick"
    late.close()


PUBLISHER_SCRIPT = """
import sys, time
from pathlib import Path
from inspector.config import MqttConfig
from foundation.errors import ConfigError
from inspector.mqtt import Publisher
cfg = MqttConfig(port=int(sys.argv[1]), spool_dir=Path(sys.argv[2]), keepalive_s=5)
publisher = Publisher(cfg, sys.argv[3])
publisher.start()
publisher.publish_status({"sku": "brick"})
time.sleep(120)
"""


@pytest.mark.integration
def test_lwt_offline_when_the_process_is_killed(
    broker: MosquittoProcess, subscriber: Subscriber, tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER_SCRIPT, str(broker.port), str(tmp_path / "spool"), ROOT], cwd=REPO
    )
    try:
        subscriber.wait(lambda: any(json.loads(m.payload).get("sku") == "brick" for m in subscriber.on("status")), 30)
        assert json.loads(subscriber.on("status")[-1].payload)["state"] == "online"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    subscriber.wait(lambda: json.loads(subscriber.on("status")[-1].payload)["state"] == "offline", 10)
    late = Subscriber(broker.port)
    late.wait(lambda: bool(late.on("status")))
    assert late.on("status")[0].retain
    assert json.loads(late.on("status")[0].payload) == {"state": "offline", "reason": "connection_lost"}
    late.close()


@pytest.mark.integration
@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    store = tmp_path / "broker-db"
    store.mkdir()
    broker = start_mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {store}/\n")
    sub = Subscriber(broker.port, client_id="line-plc", persistent=True)
    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool"), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        publisher.start()
        total = 120
        for frame_id in range(1, total + 1):
            publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=frame_id % 5 != 0))
            time.sleep(0.05 if 40 <= frame_id < 80 else 0.005)  # a 2 s outage while the line keeps running
            if frame_id == 40:
                broker.stop()
            if frame_id == 80:
                assert not publisher.connected and publisher.pending() >= 40
                broker.start()
        sub.wait(lambda: set(sub.frame_ids()) >= set(range(1, total + 1)), 30)
        assert first_seen(sub.frame_ids()) == list(range(1, total + 1))
        sub.wait(lambda: publisher.pending() == 0)
        assert publisher.connected
    finally:
        publisher.stop(timeout_s=2)
        sub.close()
        broker.stop()


@pytest.mark.integration
def test_unsent_spool_is_delivered_by_the_next_publisher(tmp_path: Path) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    first = Publisher(mqtt_cfg(port, spool), ROOT)
    first.start()  # no broker yet: must not block
    for frame_id in range(1, 6):
        first.publish_verdict(make_verdict(frame_id=frame_id, ok=frame_id != 3))
    first.stop(timeout_s=0.5)
    assert first.pending() == 5

    broker = start_mosquitto(tmp_path, port=port)
    sub = Subscriber(port)
    second = Publisher(mqtt_cfg(port, spool), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        assert second.pending() == 5
        second.start()
        second.publish_verdict(make_verdict(frame_id=6, ok=True))
        sub.wait(lambda: len(sub.frame_ids()) >= 6)
        assert sub.frame_ids() == [1, 2, 3, 4, 5, 6]
        sub.wait(lambda: second.pending() == 0)
    finally:
        second.stop(timeout_s=2)
        sub.close()
        broker.stop()
    assert not list(spool.glob("*.jsonl"))


CRASHING_SCRIPT = """
import sys, time
from pathlib import Path
from inspector.config import MqttConfig
from inspector.mqtt import Publisher
from tests.test_verdict import make_verdict
publisher = Publisher(MqttConfig(port=int(sys.argv[1]), spool_dir=Path(sys.argv[2])), sys.argv[3])
publisher.start()
for frame_id in range(1, 41):
    publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=frame_id % 7 != 0))
print("spooled", flush=True)
time.sleep(120)
"""


@pytest.mark.integration
def test_spool_survives_a_killed_daemon(tmp_path: Path) -> None:
    port, spool = free_port(), tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SCRIPT, str(port), str(spool), ROOT], cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, b"")
        assert any(line.strip() == b"spooled" for line in lines), "the publisher process died before spooling"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    broker = start_mosquitto(tmp_path, port=port)
    sub = Subscriber(port)
    publisher = Publisher(mqtt_cfg(port, spool), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        publisher.start()
        sub.wait(lambda: len(sub.frame_ids()) >= 40)
        assert sub.frame_ids() == list(range(1, 41))
        assert [json.loads(m.payload)["reject"] for m in sub.on("reject")][6] == 1
    finally:
        publisher.stop(timeout_s=2)
        sub.close()
        broker.stop()


def subscribed_broker_gone_down(tmp_path: Path) -> tuple[MosquittoProcess, Subscriber]:
    """A persistent broker and a persistent-session subscriber (subscribed, so it outlives the outage), then the
    broker stopped: what the publisher sends after `broker.start()` reaches the subscriber, none of it raced."""
    store = tmp_path / "broker-db"
    store.mkdir()
    broker = start_mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {store}/\n")
    sub = Subscriber(broker.port, client_id="line-plc", persistent=True)
    sub.wait(sub.subscribed.is_set)
    broker.stop()
    return broker, sub


@pytest.mark.integration
def test_full_spool_drops_ok_keeps_ng_and_reports_it(tmp_path: Path) -> None:
    broker, sub = subscribed_broker_gone_down(tmp_path)
    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool", spool_max_mb=0.01), ROOT)
    publisher.start()
    try:
        with capture_logs() as logs:
            for frame_id in range(1, 61):
                publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=frame_id % 10 != 0))
        assert any(e["event"] == "spool_dropped" for e in logs)
        broker.start()
        sub.wait(lambda: publisher.pending() == 0, 20)
        sub.wait(lambda: {10, 20, 30, 40, 50, 60} <= set(sub.frame_ids()))
        ids = sub.frame_ids()
        assert len(ids) < 60 and ids == sorted(ids)
        publisher.publish_status({"sku": "brick"})
        sub.wait(lambda: bool(sub.on("status")) and json.loads(sub.on("status")[-1].payload).get("sku") == "brick")
        counters = json.loads(sub.on("status")[-1].payload)["spool"]
        assert counters["dropped_ok"] == 60 - len(ids) and counters["dropped_ng"] == 0
    finally:
        publisher.stop(timeout_s=2)
        sub.close()
        broker.stop()


@pytest.mark.integration
def test_spool_filling_its_filesystem_with_the_broker_down_loses_no_ng_verdict(tmp_path: Path) -> None:
    broker, sub = subscribed_broker_gone_down(tmp_path)
    total, ng = 3000, {f for f in range(1, 3001) if f % 10 == 0}
    with small_fs(tmp_path / "fs", 768) as fs:
        publisher = Publisher(mqtt_cfg(broker.port, fs / "spool", spool_max_mb=1.0), ROOT)
        try:
            publisher.start()
            with capture_logs() as logs:
                for frame_id in range(1, total + 1):
                    publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=frame_id not in ng))
            events = {e["event"] for e in logs}
            assert {"spool_disk_full", "spool_dropped"} <= events and "spool_append_failed" not in events
            stats = publisher.spool_stats()
            assert stats["disk_full"] and stats["in_memory"] > 0 and stats["dropped_ng"] == 0
            broker.start()
            sub.wait(lambda: publisher.pending() == 0, 60)
            sub.wait(lambda: set(sub.frame_ids()) >= ng, 30)
            ids = first_seen(sub.frame_ids())
            stats = publisher.spool_stats()
            assert ids == sorted(ids) and stats["dropped_ng"] == 0
            assert len(ids) + stats["dropped_ok"] == total, "every frame is either delivered or counted as dropped"
            assert not stats["disk_full"] and stats["in_memory"] == 0
            publisher.publish_status({"sku": "brick"})
            sub.wait(lambda: json.loads(sub.on("status")[-1].payload).get("sku") == "brick")
            assert json.loads(sub.on("status")[-1].payload)["spool"]["dropped_ok"] == stats["dropped_ok"]
        finally:
            publisher.stop(timeout_s=2)
            sub.close()
            broker.stop()
        assert not list((fs / "spool").glob("*.jsonl"))


@pytest.mark.integration
def wait_commands_subscribed(subscriber: Subscriber) -> None:
    """Wait for the publisher's "online" status: it subscribes to /cmd just before publishing it on the same
    connection, so once it arrives a command published now reaches the publisher (`connected` alone is set before
    the subscription is sent)."""
    subscriber.wait(lambda: any(json.loads(m.payload).get("state") == "online" for m in subscriber.on("status")))


def test_commands_malformed_json_gets_error_reply_and_publisher_keeps_working(
    broker: MosquittoProcess, subscriber: Subscriber, tmp_path: Path
) -> None:
    received: list[dict[str, Any]] = []

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        received.append(command)
        if command.get("cmd") == "explode":
            raise RuntimeError("boom")
        return {"ok": True, "sku": command.get("sku")}

    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool"), ROOT, on_command=handle)
    publisher.start()
    wait_commands_subscribed(subscriber)
    for payload in (b"{not json", b"[1, 2]", b'{"id": 7, "cmd": "explode"}', b'{"id": 8, "cmd": "sku", "sku": "b"}'):
        subscriber.client.publish(f"{ROOT}/cmd", payload, qos=1)
    subscriber.wait(lambda: len(subscriber.on("cmd/reply")) == 4)
    replies = [json.loads(m.payload) for m in subscriber.on("cmd/reply")]
    assert replies[0]["ok"] is False and "malformed" in replies[0]["error"]
    assert replies[1]["ok"] is False and "JSON object" in replies[1]["error"]
    assert replies[2] == {"ok": False, "error": "RuntimeError: boom", "id": 7}
    assert replies[3] == {"ok": True, "sku": "b", "id": 8}
    assert [c["id"] for c in received] == [7, 8]
    publisher.publish_verdict(make_verdict(frame_id=1))
    subscriber.wait(lambda: subscriber.frame_ids() == [1])
    publisher.stop(timeout_s=2)


def strict_json(payload: bytes) -> Any:
    """Decode as standard JSON: NaN, Infinity and -Infinity (which json.loads accepts) fail the test."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in {payload[:200]!r} is not JSON")

    return json.loads(payload, parse_constant=refuse)


@pytest.mark.integration
def test_non_finite_numbers_never_run_a_command_or_leave_in_a_reply(
    broker: MosquittoProcess, subscriber: Subscriber, tmp_path: Path
) -> None:
    received: list[dict[str, Any]] = []

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        received.append(command)
        return {"ok": True, "score": float("nan")} if command["cmd"] == "score" else {"ok": True, "paused": True}

    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool"), ROOT, on_command=handle)
    publisher.start()
    wait_commands_subscribed(subscriber)
    bad = (b'{"cmd": "pause", "id": 1e400}', b'{"cmd": "pause", "id": NaN}', b'{"cmd": "pause", "id": -Infinity}',
           b'{"cmd": "pause", "id": 1, "pad": [Infinity]}')
    for payload in (*bad, b'{"cmd": "score", "id": 2}', b'{"cmd": "pause", "id": 3}'):
        subscriber.client.publish(f"{ROOT}/cmd", payload, qos=1)
    subscriber.wait(lambda: len(subscriber.on("cmd/reply")) == len(bad) + 2)
    *malformed, score, paused = [strict_json(m.payload) for m in subscriber.on("cmd/reply")]
    assert [c["id"] for c in received] == [2, 3], "a command with a non-finite number reached the handler"
    assert all(r.keys() == {"ok", "error"} and "malformed command" in r["error"] for r in malformed), malformed
    assert "1e400 is out of range" in malformed[0]["error"] and "NaN is not JSON" in malformed[1]["error"]
    assert score["id"] == 2 and not score["ok"] and "reply not sent: ValueError" in score["error"]
    assert paused == {"ok": True, "paused": True, "id": 3}
    publisher.stop(timeout_s=2)


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (IP SAN, so hostname checks pass)."""
    directory.mkdir()
    ca_key, ca, key, csr, crt, ext = (
        directory / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "ext")
    )
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test-ca"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            crt,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    ):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return ca, crt, key


@pytest.mark.integration
def test_tls_and_password_from_config(tmp_path: Path) -> None:
    ca, crt, key = make_tls_files(tmp_path / "tls")
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "station1", "s3cret"], check=True)
    passwd.chmod(0o644)
    conf = f"cafile {ca}\ncertfile {crt}\nkeyfile {key}\npassword_file {passwd}\nallow_anonymous false\n"
    broker = start_mosquitto(tmp_path, extra_conf=conf)
    good, bad = tmp_path / "good.pw", tmp_path / "bad.pw"
    good.write_text("s3cret\n")
    bad.write_text("wrong\n")
    good.chmod(0o600)
    bad.chmod(0o600)
    sub = Subscriber(broker.port, tls_ca=ca, auth=("station1", "s3cret"))
    ok_pub = Publisher(mqtt_cfg(broker.port, tmp_path / "s1", tls_ca=ca, username="station1", password_file=good), ROOT)
    bad_pub = Publisher(mqtt_cfg(broker.port, tmp_path / "s2", tls_ca=ca, username="station1", password_file=bad), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        ok_pub.start()
        bad_pub.start()
        ok_pub.publish_verdict(make_verdict(frame_id=11))
        bad_pub.publish_verdict(make_verdict(frame_id=12))
        sub.wait(lambda: sub.frame_ids() == [11])
        sub.wait(lambda: ok_pub.pending() == 0)
        assert holds_for(lambda: sub.frame_ids() == [11], 0.5)
        assert not bad_pub.connected and bad_pub.pending() == 1
    finally:
        ok_pub.stop(timeout_s=2)
        bad_pub.stop(timeout_s=0.5)
        sub.close()
        broker.stop()


def test_missing_tls_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.tls_ca = .*missing\.crt does not exist"):
        Publisher(mqtt_cfg(1883, tmp_path / "spool", tls_ca=tmp_path / "missing.crt"), ROOT)
