"""deploy/mosquitto/: a real mosquitto with the shipped config, users, ACL and test certificates."""

from __future__ import annotations

import os
import queue
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from inspector.broker import free_port, port_open

MOSQUITTO_DIR = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
ADD_USER = MOSQUITTO_DIR / "add-user.sh"
MAKE_CERTS = MOSQUITTO_DIR / "make-certs.sh"
STATIONS = ("station1", "station2")
PLC = "plc1"
TIMEOUT_S = 5.0
# How long a message that must not arrive is waited for, after its authorised control message arrived.
ABSENCE_S = 0.5

pytestmark = [
    pytest.mark.integration,
]


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Block until the broker accepts TCP connections on port; fail if it died."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "mosquitto exited during start-up"
        if port_open("127.0.0.1", port, 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not listen on {port}")


def add_user(broker_dir: Path, role: str, name: str, password_file: Path) -> None:
    """Create a broker user with deploy/mosquitto/add-user.sh."""
    subprocess.run(
        ["bash", str(ADD_USER), "--dir", str(broker_dir), "--role", role, name, "--password-file", str(password_file)],
        check=True,
        capture_output=True,
        timeout=30,
    )


class Peer:
    """A real paho-mqtt 2.x client that records its CONNACK, SUBACKs and received messages."""

    def __init__(self, port: int, user: str | None, password: str | None, tls_ca: Path | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:8]}", reconnect_on_failure=False
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.connacks: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[list[mqtt.ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(rcs)
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))

    def connect(self, host: str = "127.0.0.1", timeout_s: float = TIMEOUT_S) -> mqtt.ReasonCode | None:
        """Connect and return the broker's CONNACK reason, or None when no CONNACK came."""
        self.client.connect(host, self.port, keepalive=30)
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def subscribe(self, topic: str) -> mqtt.ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK reason."""
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=TIMEOUT_S)[0]

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK (the broker acknowledges even what its ACL drops)."""
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=TIMEOUT_S)

    def received(self, timeout_s: float = TIMEOUT_S) -> tuple[str, bytes] | None:
        """The next message received, or None after timeout_s."""
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Broker:
    """A running mosquitto with the shipped config: plain loopback port, TLS port, users and passwords."""

    plain_port: int
    tls_port: int
    ca: Path
    passwords: dict[str, str]

    def peer(self, user: str, *, password: str | None = None, tls: bool = False) -> Peer:
        """A connected client for user (the right password unless given); fails if refused."""
        port, ca = (self.tls_port, self.ca) if tls else (self.plain_port, None)
        client = Peer(port, user, password or self.passwords[user], ca)
        rc = client.connect("localhost" if tls else "127.0.0.1")
        assert rc is not None and not rc.is_failure, f"{user} refused: {rc}"
        return client


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Render deploy/mosquitto into a temp dir, start mosquitto on free loopback ports, stop it after."""
    base = tmp_path_factory.mktemp("broker")
    broker_dir = base / "mosquitto"
    broker_dir.mkdir()
    shutil.copy(MOSQUITTO_DIR / "acl", broker_dir / "acl")
    subprocess.run(["bash", str(MAKE_CERTS), str(broker_dir / "tls")], check=True, capture_output=True, timeout=60)
    passwords = {}
    for role, name in [("station", s) for s in STATIONS] + [("plc", PLC)]:
        add_user(broker_dir, role, name, base / f"{name}.password")
        passwords[name] = (base / f"{name}.password").read_text().strip()

    plain_port, tls_port = free_port(), free_port()
    config = (MOSQUITTO_DIR / "mosquitto.conf").read_text()
    config = config.replace("/etc/mosquitto/inspector", str(broker_dir))
    config = config.replace("listener 8883\n", f"listener {tls_port} 127.0.0.1\n")
    config = config.replace("listener 1883 127.0.0.1\n", f"listener {plain_port} 127.0.0.1\n")
    if os.geteuid() == 0:
        config += "user root\n"  # pytest's temp dirs are 0700: stay root instead of dropping to `mosquitto`
    (base / "mosquitto.conf").write_text(config)

    log = (base / "mosquitto.log").open("wb")
    process = subprocess.Popen(["mosquitto", "-c", str(base / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        wait_for_port(plain_port, process)
        wait_for_port(tls_port, process)
        yield Broker(plain_port, tls_port, broker_dir / "tls" / "ca.crt", passwords)
    finally:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_add_user_writes_the_shipped_acl_blocks(tmp_path: Path) -> None:
    """add-user.sh appends exactly the blocks shown in the shipped ACL template, once per user."""
    add_user(tmp_path, "station", "station1", tmp_path / "s.pw")
    add_user(tmp_path, "plc", PLC, tmp_path / "p.pw")
    add_user(tmp_path, "station", "station1", tmp_path / "s.pw")
    template = (MOSQUITTO_DIR / "acl").read_text()
    assert (tmp_path / "acl").read_text() == template[template.index("# station:") :]
    for path in (tmp_path / "acl", tmp_path / "passwd", tmp_path / "s.pw"):
        assert path.stat().st_mode & 0o077 == 0, path


def test_wrong_password_is_refused(broker: Broker) -> None:
    """A wrong password gets a failed CONNACK, never a session."""
    client = Peer(broker.plain_port, "station1", "not-the-password")
    rc = client.connect()
    client.close()
    assert rc is not None and rc.is_failure
    assert str(rc) in {"Not authorized", "Bad user name or password"}


def test_anonymous_is_refused(broker: Broker) -> None:
    """No credentials, no session (allow_anonymous false)."""
    client = Peer(broker.plain_port, None, None)
    rc = client.connect()
    client.close()
    assert rc is not None and rc.is_failure


def test_station_cannot_publish_for_another_station(broker: Broker) -> None:
    """station1's forged verdict for station2 is dropped; its own verdict reaches the PLC."""
    plc = broker.peer(PLC)
    station = broker.peer("station1")
    try:
        assert not plc.subscribe("inspector/#").is_failure
        station.publish("inspector/line1/station2/verdict", b"forged")
        station.publish("inspector/line1/station1/verdict", b"genuine")
        assert plc.received() == ("inspector/line1/station1/verdict", b"genuine")
        assert plc.received(ABSENCE_S) is None
    finally:
        plc.close()
        station.close()


def test_station_cannot_forge_commands(broker: Broker) -> None:
    """A cmd published by a station user is dropped; the PLC's cmd and the station's reply get through."""
    target = broker.peer("station2")
    forger = broker.peer("station1")
    plc = broker.peer(PLC)
    try:
        assert not target.subscribe("inspector/line1/station2/cmd").is_failure
        assert not plc.subscribe("inspector/line1/station2/cmd/reply").is_failure
        forger.publish("inspector/line1/station2/cmd", b'{"sku": "forged"}')
        plc.publish("inspector/line1/station2/cmd", b'{"sku": "part-b"}')
        assert target.received() == ("inspector/line1/station2/cmd", b'{"sku": "part-b"}')
        assert target.received(ABSENCE_S) is None
        target.publish("inspector/line1/station2/cmd/reply", b'{"ok": true}')
        assert plc.received() == ("inspector/line1/station2/cmd/reply", b'{"ok": true}')
    finally:
        for client in (target, forger, plc):
            client.close()


def test_station_cannot_read_other_stations(broker: Broker) -> None:
    """A station reads only its own cmd: another station's commands and verdicts never reach it."""
    snoop = broker.peer("station1")
    plc = broker.peer(PLC)
    try:
        snoop.subscribe("inspector/#")
        plc.publish("inspector/line1/station2/cmd", b'{"sku": "secret"}')
        plc.publish("inspector/line1/station1/cmd", b'{"sku": "mine"}')
        assert snoop.received() == ("inspector/line1/station1/cmd", b'{"sku": "mine"}')
        assert snoop.received(ABSENCE_S) is None
    finally:
        snoop.close()
        plc.close()


def test_plc_cannot_publish_verdicts(broker: Broker) -> None:
    """The PLC reads results but cannot inject one."""
    plc = broker.peer(PLC)
    station = broker.peer("station1")
    try:
        assert not plc.subscribe("inspector/+/+/verdict").is_failure
        plc.publish("inspector/line1/station1/verdict", b"forged")
        station.publish("inspector/line1/station1/verdict", b"genuine")
        assert plc.received() == ("inspector/line1/station1/verdict", b"genuine")
        assert plc.received(ABSENCE_S) is None
    finally:
        plc.close()
        station.close()


def test_tls_listener_with_the_test_ca(broker: Broker) -> None:
    """Stations and PLCs connect over TLS with the CA from make-certs.sh, and traffic flows."""
    plc = broker.peer(PLC, tls=True)
    station = broker.peer("station1", tls=True)
    try:
        assert not plc.subscribe("inspector/+/+/status").is_failure
        station.publish("inspector/line1/station1/status", b'{"online": true}')
        assert plc.received() == ("inspector/line1/station1/status", b'{"online": true}')
    finally:
        plc.close()
        station.close()


def test_tls_port_refuses_plaintext(broker: Broker) -> None:
    """Plain MQTT on the TLS port never gets a CONNACK."""
    client = Peer(broker.tls_port, "station1", broker.passwords["station1"])
    rc = client.connect(timeout_s=2.0)
    client.close()
    assert rc is None


def test_tls_rejects_an_unknown_ca(broker: Broker, tmp_path: Path) -> None:
    """A client trusting another CA refuses the broker's certificate."""
    subprocess.run(["bash", str(MAKE_CERTS), str(tmp_path)], check=True, capture_output=True, timeout=60)
    client = Peer(broker.tls_port, "station1", broker.passwords["station1"], tmp_path / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("localhost")
