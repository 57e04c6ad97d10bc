"""Exactly once to the plant: the station's Publisher at QoS 2, the edge box's mosquitto bridged to a plant mosquitto
with the bridge deploy/install.sh renders (TLS, certificates from make-certs.sh), and links that drop mid-stream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inspector.broker import LocalBroker
from inspector.mqtt import Publisher
from inspector.verdict import encode_mask_png
from tests.mosquitto import start_mosquitto
from tests.test_deploy import run_install
from tests.test_mqtt import ROOT, Subscriber, mqtt_cfg
from tests.test_verdict import make_verdict
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MOSQUITTO_DIR = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
MAKE_CERTS = MOSQUITTO_DIR / "make-certs.sh"
# The shipped mosquitto.conf's queue and flow settings the edge box's broker runs with (its listeners, users and
# ACL are tests/test_broker_acl.py's subject; here the broker is anonymous on a free port).
TUNING = ("max_queued_messages", "max_queued_bytes", "autosave_interval", "persistent_client_expiration",
          "max_inflight_messages")
BRIDGE_ID = "inspector-bridge-line1-station1"  # the bridge's client id on the plant broker and its certificate's CN
READER = "plant-reader"
PUBCOMP = 7  # MQTT control packet type: the last packet of a QoS 2 exchange, broker to publisher
TIMEOUT_S = 120.0  # generous: a busy 2-core machine only makes the waits longer
# The plant broker's ACL, as docs/plant.md asks for: each station's bridge may publish only its own topics and read
# only its own commands; the plant's consumer reads everything and sends commands.
PLANT_ACL = f"""user {BRIDGE_ID}
topic write {ROOT}/verdict
topic write {ROOT}/reject
topic write {ROOT}/mask
topic write {ROOT}/status
topic write {ROOT}/cmd/reply
topic read {ROOT}/cmd

user {READER}
topic read inspector/#
topic write inspector/+/+/cmd
"""


class Relay:
    """A TCP relay to a broker on loopback: cut() drops every connection through it and refuses new ones until
    restore() (a link down, both brokers up); with watch_pubcomp (plain MQTT only) an armed relay swallows the
    broker's first PUBCOMP and drops the link: the broker has released that message, the publisher never heard."""

    def __init__(self, target_port: int, watch_pubcomp: bool = False) -> None:
        self.target_port = target_port
        self.watch_pubcomp = watch_pubcomp
        self.armed = threading.Event()
        self.cut_done = threading.Event()
        self._blocked = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        """Relay every connection until close(); refuse (accept and close) while cut."""
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._blocked.is_set():
                client.close()
                continue
            try:
                broker = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(broker, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy bytes one way until either side closes."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._close(source, sink)

    def _pump_down(self, broker: socket.socket, client: socket.socket) -> None:
        """Broker to client: bytes as they come, or whole packets when a PUBCOMP may have to be held back."""
        if not self.watch_pubcomp:
            self._pump(broker, client)
            return
        buffer = b""
        try:
            while data := broker.recv(65536):
                buffer += data
                while (size := packet_size(buffer)) is not None:
                    packet, buffer = buffer[:size], buffer[size:]
                    if packet[0] >> 4 == PUBCOMP and self.armed.is_set():
                        self.armed.clear()
                        self.cut_done.set()
                        raise OSError("link cut before the PUBCOMP")
                    client.sendall(packet)
        except OSError:
            pass
        self._close(broker, client)

    def _close(self, *sockets: socket.socket) -> None:
        """Close both ends of a relayed connection."""
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        """The link goes down: open connections are dropped, new ones refused."""
        self._blocked.set()
        with self._lock:
            open_now, self._open = self._open, []
        self._close(*open_now)
        self.cut_done.set()

    def restore(self) -> None:
        """The link comes back."""
        self.cut_done.clear()
        self._blocked.clear()

    def close(self) -> None:
        """Stop relaying."""
        self._listener.close()
        self.cut()


def packet_size(buffer: bytes) -> int | None:
    """Length of the first whole MQTT packet in buffer (fixed header + remaining length), None until it is whole."""
    remaining, shift = 0, 0
    for i, byte in enumerate(buffer[1:5], start=1):
        remaining |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            size = 1 + i + remaining
            return size if len(buffer) >= size else None
    return None


def verdict_keys(subscriber: Subscriber) -> list[tuple[str, int]]:
    """(run_id, frame_id) of every verdict the subscriber received, in arrival order."""
    return [(body["run_id"], body["frame_id"]) for body in (json.loads(m.payload) for m in subscriber.on("verdict"))]


def delivery(subscriber: Subscriber, published: int) -> str:
    """What went wrong, in one line: verdicts missing, repeated and out of order among frames 1..published."""
    ids = [frame_id for _, frame_id in verdict_keys(subscriber)]
    missing = sorted(set(range(1, published + 1)) - set(ids))
    late = [b for a, b in itertools.pairwise(ids) if b <= a]
    return (f"{len(ids)} verdicts for {published} frames; missing {missing[:20]}{'...' if len(missing) > 20 else ''}; "
            f"repeated {len(ids) - len(set(ids))}; out of order at {late[:10]}")


def test_qos2_publisher_delivers_once_when_the_link_drops_before_pubcomp(tmp_path: Path) -> None:
    """The link drops after the broker released a verdict but before the publisher got PUBCOMP: the kept session
    finishes the exchange (PUBREL again) instead of publishing the verdict a second time."""
    broker = start_mosquitto(tmp_path)
    relay = Relay(broker.port, watch_pubcomp=True)
    sub = Subscriber(broker.port)
    publisher = Publisher(mqtt_cfg(relay.port, tmp_path / "spool", qos=2), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        publisher.start()
        sub.wait(lambda: bool(sub.on("status")))
        relay.armed.set()
        publisher.publish_verdict(make_verdict(frame_id=1, ok=True))
        sub.wait(relay.cut_done.is_set)
        for frame_id in range(2, 6):
            publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=True))
        sub.wait(lambda: publisher.pending() == 0 and len(sub.on("reject")) >= 5)
        assert sub.frame_ids() == [1, 2, 3, 4, 5]
        assert [json.loads(m.payload)["frame_id"] for m in sub.on("reject")] == [1, 2, 3, 4, 5]
    finally:
        publisher.stop(timeout_s=5)
        sub.close()
        relay.close()
        broker.stop()


def test_qos2_publisher_stays_within_the_brokers_receive_maximum(tmp_path: Path) -> None:
    """A burst of verdicts at QoS 2 to the edge box's mosquitto, which takes one message awaiting PUBREL from a
    client (the shipped max_inflight_messages): none is dropped (over MQTT 3.1.1 the broker's "quota exceeded"
    reaches no one), all arrive in order."""
    broker = start_mosquitto(tmp_path, extra_conf=shipped_tuning())
    sub = Subscriber(broker.port)
    publisher = Publisher(mqtt_cfg(broker.port, tmp_path / "spool", qos=2), ROOT)
    try:
        sub.wait(sub.subscribed.is_set)
        publisher.start()
        for frame_id in range(1, 201):
            publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=True))
        assert wait_until(lambda: publisher.pending() == 0, TIMEOUT_S)
        assert wait_until(lambda: len(sub.on("reject")) >= 200, 10), delivery(sub, 200)
        assert sub.frame_ids() == list(range(1, 201))
    finally:
        publisher.stop(timeout_s=5)
        sub.close()
        broker.stop()


@pytest.fixture
def plant_pki(tmp_path: Path) -> Path:
    """A plant CA of its own with the plant broker's certificate and client certificates for the bridge and reader."""
    pki = tmp_path / "plant-pki"
    subprocess.run(["bash", str(MAKE_CERTS), str(pki), "--client", BRIDGE_ID, "--client", READER], check=True,
                   capture_output=True, timeout=120)
    return pki


def plant_broker(workdir: Path, pki: Path) -> LocalBroker:
    """The plant's mosquitto (not started): TLS with client certificates as identities, the ACL above, persistent."""
    acl = workdir / "acl"
    workdir.mkdir(parents=True)
    acl.write_text(PLANT_ACL)
    tls = (f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\nrequire_certificate true\n"
           f"use_identity_as_username true\nacl_file {acl}\n")
    return LocalBroker(workdir, persistent=True, extra_conf=tls)


def shipped_tuning() -> str:
    """The TUNING lines of deploy/mosquitto/mosquitto.conf."""
    lines = (MOSQUITTO_DIR / "mosquitto.conf").read_text().splitlines()
    chosen = [line for line in lines if line.split(" ", 1)[0] in TUNING]
    assert len(chosen) == len(TUNING), chosen
    return "\n".join(chosen) + "\n"


def rendered_bridge(tmp_path: Path, plant_port: int, pki: Path) -> str:
    """The bridge install.sh renders for station1 (commands in too), its /etc paths moved under the staged root.

    The one change: restart_timeout 1 instead of 5..30 s of jitter, so the test does not wait for a back-off.
    """
    root = tmp_path / "root"
    run_install(root, "--station", "station1", "--no-venv", "--plant-broker", f"127.0.0.1:{plant_port}",
                "--plant-ca", str(pki / "ca.crt"), "--plant-cert", str(pki / f"{BRIDGE_ID}.crt"),
                "--plant-key", str(pki / f"{BRIDGE_ID}.key"), "--plant-cmd")
    text = (root / "etc" / "mosquitto" / "conf.d" / "inspector-bridge-station1.conf").read_text()
    assert "restart_timeout 5 30\n" in text
    return text.replace("/etc/mosquitto/", f"{root}/etc/mosquitto/").replace("restart_timeout 5 30\n",
                                                                            "restart_timeout 1\n")


class Stream:
    """Publishes verdicts 1, 2, ... as the daemon does (NG ones with a mask) on a thread until stopped."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.count = 0
        self._mask = encode_mask_png(np.eye(16, dtype=bool))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verdict-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.publish_next()

    def publish_next(self) -> None:
        """Publish the next frame's verdict (every fifth is NG, with its mask)."""
        frame_id = self.count + 1
        ok = frame_id % 5 != 0
        self.publisher.publish_verdict(make_verdict(frame_id=frame_id, ok=ok), mask_png=None if ok else self._mask)
        self.count = frame_id

    def stop(self) -> None:
        """Stop after the verdict being published."""
        self._stop.set()
        self._thread.join(TIMEOUT_S)


@pytest.fixture
def plant(tmp_path: Path, plant_pki: Path) -> Iterator[LocalBroker]:
    """The plant broker, started on a free port and stopped after the test."""
    broker = plant_broker(tmp_path / "plant", plant_pki).start()
    yield broker
    broker.stop()


def test_every_verdict_reaches_the_plant_once_and_in_order_across_a_link_outage(
    tmp_path: Path, plant_pki: Path, plant: LocalBroker
) -> None:
    """Verdicts stream from the Publisher through the edge box's broker and the rendered bridge to the plant; the
    link to the plant drops mid-stream and comes back; the plant's consumer gets each (run_id, frame_id) once, in
    order, and a command sent at the plant reaches the station and its reply comes back."""
    reader = Subscriber(plant.port, client_id=READER, persistent=True, tls_ca=plant_pki / "ca.crt", qos=2,
                        tls_client=(plant_pki / f"{READER}.crt", plant_pki / f"{READER}.key"))
    link = Relay(plant.port)
    station = LocalBroker(tmp_path / "station", persistent=True,
                          extra_conf=shipped_tuning() + rendered_bridge(tmp_path, link.port, plant_pki)).start()
    commands: list[dict[str, object]] = []
    publisher = Publisher(mqtt_cfg(station.port, tmp_path / "spool", qos=2), ROOT,
                          on_command=lambda command: (commands.append(command), {"ok": True})[1])
    stream: Stream | None = None
    try:
        reader.wait(reader.subscribed.is_set, TIMEOUT_S)
        publisher.start()
        stream = Stream(publisher)
        assert wait_until(lambda: len(reader.on("verdict")) >= 50, TIMEOUT_S), delivery(reader, stream.count)

        link.cut()  # mid-stream: verdicts in flight on the bridge, more queued on the edge box
        at_outage = stream.count
        assert wait_until(lambda: stream.count >= at_outage + 150, TIMEOUT_S)
        stream.stop()
        assert wait_until(lambda: publisher.pending() == 0, TIMEOUT_S), "the edge box's broker took every verdict"
        link.restore()
        for _ in range(50):  # live verdicts behind the backlog
            stream.publish_next()

        run_id = make_verdict().run_id
        counts = {"verdict": stream.count, "reject": stream.count, "mask": stream.count // 5}
        assert wait_until(lambda: all(len(reader.on(topic)) >= n for topic, n in counts.items()), TIMEOUT_S), (
            delivery(reader, stream.count))
        assert verdict_keys(reader) == [(run_id, frame_id) for frame_id in range(1, stream.count + 1)], delivery(
            reader, stream.count)
        rejects = [json.loads(m.payload)["frame_id"] for m in reader.on("reject")]
        assert rejects == list(range(1, stream.count + 1))
        assert len(reader.on("mask")) == stream.count // 5

        reader.client.publish(f"{ROOT}/cmd", json.dumps({"cmd": "status", "id": "plant-1"}), qos=2)
        assert wait_until(lambda: bool(reader.on("cmd/reply")), TIMEOUT_S)
        assert [json.loads(m.payload) for m in reader.on("cmd/reply")] == [{"ok": True, "id": "plant-1"}]
        assert commands == [{"cmd": "status", "id": "plant-1"}]
    finally:
        if stream is not None:
            stream.stop()
        publisher.stop(timeout_s=5)
        reader.close()
        station.stop()
        link.close()


def test_an_unknown_plant_ca_keeps_the_bridge_down(tmp_path: Path, plant_pki: Path, plant: LocalBroker) -> None:
    """TLS is verified: a bridge that trusts another CA never hands a verdict to the plant broker."""
    other = tmp_path / "other-pki"
    subprocess.run(["bash", str(MAKE_CERTS), str(other)], check=True, capture_output=True, timeout=120)
    bridge = rendered_bridge(tmp_path, plant.port, plant_pki)
    staged_ca = next(line.split()[1] for line in bridge.splitlines() if line.startswith("bridge_cafile "))
    Path(staged_ca).write_bytes((other / "ca.crt").read_bytes())
    reader = Subscriber(plant.port, client_id=READER, tls_ca=plant_pki / "ca.crt", qos=2,
                        tls_client=(plant_pki / f"{READER}.crt", plant_pki / f"{READER}.key"))
    station = LocalBroker(tmp_path / "station", persistent=True, extra_conf=shipped_tuning() + bridge).start()
    local = Subscriber(station.port)
    publisher = Publisher(mqtt_cfg(station.port, tmp_path / "spool", qos=2), ROOT)
    try:
        reader.wait(reader.subscribed.is_set, TIMEOUT_S)
        publisher.start()
        publisher.publish_verdict(make_verdict(frame_id=1, ok=True))
        local.wait(lambda: local.frame_ids() == [1], TIMEOUT_S)
        assert wait_until(lambda: "certificate verify failed" in station.log_path.read_text(), TIMEOUT_S)
        assert reader.on("verdict") == []
    finally:
        publisher.stop(timeout_s=5)
        local.close()
        reader.close()
        station.stop()

