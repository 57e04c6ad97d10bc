"""Verdicts to the line over MQTT (paho-mqtt 2, QoS 1 or 2), through the on-disk spool so none is ever lost.

Topics, under the root `{topic_prefix}/{line_id}/{station_id}`:

| topic        | payload                                                     | QoS | retained |
| ------------ | ----------------------------------------------------------- | --- | -------- |
| `/verdict`   | Verdict JSON (docs/verdict.schema.json)                     | qos | no       |
| `/reject`    | `{"frame_id", "run_id", "t_acquired", "reject": 1 or 0}`    | qos | no       |
| `/mask`      | PNG, 8-bit grey, 255 = defect (when the SKU publishes it)   | qos | no       |
| `/status`    | `{"state": "online"/"not_ready"/"offline", "ts", ...}`; LWT | 1   | yes      |
| `/cmd`       | subscribed: JSON object command, handled by on_command      | 1   | no       |
| `/cmd/reply` | JSON object reply (echoes the command's "id" if any)        | 1   | no       |
| `/drift`     | drift alarm raised or cleared (inspector/drift.py), JSON    | 1   | no       |

qos is `[mqtt] qos`: 1 by default, 2 for a station bridged to the plant broker (docs/plant.md).

Delivery: every verdict (with its reject and mask messages) is appended to the Spool before anything is
sent; one sender thread hands records to paho strictly in spool order, at most WINDOW records in flight,
and a record is acknowledged only when the broker acknowledged all its messages (PUBACK, or PUBCOMP at QoS 2).
After a broker outage paho re-sends what it held, then the backlog follows in order; after a daemon restart the
spool is re-sent from its oldest unacknowledged record. At QoS 1 (the default) that is at least once: consumers
de-duplicate by (run_id, frame_id), which every verdict and reject message carries. At QoS 2 (a station bridged
to the plant, docs/plant.md) the session is kept across reconnects and one message is in flight at a time, so a
broker outage delivers nothing twice; only the record being sent when the daemon itself dies may come again from
the spool after it.
A full spool disk does not stop delivery (see inspector/spool.py); a full disk with the broker down stops
acquisition (`not_ready()`, the pipeline's gate) until one of them takes the verdicts waiting in memory.

Threads: paho's network loop, the sender and the command thread each survive any exception their input can
cause (a bad command gets an error reply); `health()` names a thread that died anyway, and the daemon then
withholds the systemd watchdog so the service is restarted.

Commands: the command thread answers /cmd messages one at a time, so on_command must not block (a changeover
only queues its load, inspector/service.py); replies made later on other threads go through send_reply, in
order behind the commands before them. Replies are standard JSON: a command holding a non-finite number
(1e400, NaN, Infinity) is malformed (error reply, handler not called), and a reply holding one is not sent
but replaced by an error reply with the command's id.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from foundation.errors import ConfigError
from foundation.log import get_logger
from inspector.config import MqttConfig
from inspector.preflight import check_mqtt
from inspector.spool import Spool
from inspector.verdict import Verdict, reject_payload

log = get_logger(__name__)

WINDOW = 32  # spool records handed to paho and not yet acknowledged
MAX_COMMAND_BYTES = 64 << 10  # a larger /cmd payload is refused unread

CommandHandler = Callable[[dict[str, Any]], dict[str, Any]]


class Publisher:
    """Publishes verdicts and status for one station; receives commands; never blocks on the broker."""

    def __init__(
        self,
        cfg: MqttConfig,
        topic_root: str,
        *,
        on_command: CommandHandler | None = None,
        client_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.root = topic_root.rstrip("/")
        self._on_command = on_command
        self._spool = Spool(Path(cfg.spool_dir), int(cfg.spool_max_mb * 2**20))
        self._qos = cfg.qos
        self._cond = threading.Condition()
        # status documents are built and handed to paho under one lock: the last one sent is the newest
        self._status_lock = threading.Lock()
        self._acked_mids: deque[int] = deque()
        self._mid_seq: dict[int, int] = {}
        self._seq_remaining: dict[int, int] = {}
        self._connected = False
        self._ready = False  # connected and paho has re-sent what it held: new records may follow
        self._online_mid: int | None = None
        self._started = False
        self._stopping = False
        self.unspooled = 0  # verdicts the spool could not take, sent live without a copy
        self._status: dict[str, Any] = {}
        # /cmd payloads, replies queued by send_reply, and None to end the command thread
        self._commands: queue.SimpleQueue[bytes | dict[str, Any] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-sender", daemon=True)
        self._commander = threading.Thread(target=self._command_loop, name="mqtt-commands", daemon=True)
        cid = client_id or cfg.client_id or f"{self.root.replace('/', '-')}-{os.getpid()}"
        # QoS 2 is exactly once only in a session that outlives a reconnect: in a clean one paho re-publishes a
        # message whose PUBREL the broker has already taken (a duplicate); in a kept one it re-sends the PUBREL
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311,
                                   clean_session=cfg.qos < 2)
        try:
            self._setup_client()
        except BaseException:
            self._spool.close()
            raise

    def _setup_client(self) -> None:
        """Credentials, TLS, LWT, back-off and callbacks, all before the first connect."""
        cfg, client = self.cfg, self._client
        for problem in check_mqtt(cfg):
            raise ConfigError(str(problem))
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password())
        if cfg.tls_ca or cfg.tls_cert:
            client.tls_set(
                ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                keyfile=str(cfg.tls_key) if cfg.tls_key else None,
            )
        lwt = {"state": "offline", "reason": "connection_lost"}  # sent by the broker, so no time stamp of ours
        client.will_set(f"{self.root}/status", json.dumps(lwt), qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        # At QoS 2 a broker holds at most its receive maximum of messages awaiting PUBREL (mosquitto's
        # max_inflight_messages) and over MQTT 3.1.1 silently drops the rest: one at a time fits any broker, in order
        client.max_inflight_messages_set(1 if cfg.qos == 2 else WINDOW * 3 + 10)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        """True while a broker session is up."""
        return self._connected

    def start(self) -> None:
        """Connect in the background (retrying with back-off) and start sending the spool backlog."""
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self._client.loop_start()
        self._sender.start()
        self._commander.start()
        self._started = True
        log.info("mqtt_started", host=self.cfg.host, port=self.cfg.port, root=self.root, backlog=self.pending())

    def publish_verdict(self, verdict: Verdict, mask_png: bytes | None = None) -> None:
        """Spool the verdict, its reject signal and the optional mask PNG durably, then queue them to send."""
        messages = [
            (f"{self.root}/verdict", verdict.model_dump_json().encode()),
            (f"{self.root}/reject", reject_payload(verdict)),
        ]
        if mask_png is not None:
            messages.append((f"{self.root}/mask", mask_png))
        try:
            self._spool.append(messages, ng=not verdict.ok)
        except Exception:
            self.unspooled += 1
            self._spool.note_unspooled()
            log.exception("spool_append_failed", frame_id=verdict.frame_id, detail="sent live, without a spool copy")
            for topic, payload in messages:
                self._client.publish(topic, payload, qos=self._qos)
            return
        with self._cond:
            self._cond.notify_all()

    def not_ready(self) -> str | None:
        """Why the station must not take another frame (None when it may): verdicts wait in memory that
        neither the spool's disk nor the broker can take, so a further one could be lost unaccounted."""
        if self._connected or not self._spool.holding():
            return None
        return (f"spool disk full ({self._spool.disk_full}) and broker unreachable: verdicts can be neither "
                "stored nor sent")

    def acquired(self) -> None:
        """A frame was acquired: the spool's journal owes its verdict until it is stored or delivered."""
        self._spool.note_acquired()

    def publish_status(self, status: dict[str, Any]) -> None:
        """Retain `status` (active SKU, engine, fps, ...) on /status now, and re-send it on every reconnect."""
        with self._status_lock:
            self._status = dict(status)
            if self._connected:
                self._client.publish(f"{self.root}/status", self._status_payload("online"), qos=1, retain=True)

    def reply(self, payload: dict[str, Any]) -> None:
        """Publish a command reply on /cmd/reply (not spooled: the requester is online by definition); a NaN or
        infinite value raises ValueError rather than go out as JSON no parser reads."""
        self._client.publish(f"{self.root}/cmd/reply", json.dumps(payload, default=str, allow_nan=False), qos=1)

    def publish_event(self, leaf: str, payload: dict[str, Any]) -> None:
        """Publish a station event (a drift alarm) on <root>/<leaf>, QoS 1, not spooled: paho holds it while the
        broker is away, and the retained status carries the current state anyway."""
        self._client.publish(f"{self.root}/{leaf}", json.dumps(payload, default=str, allow_nan=False), qos=1)

    def send_reply(self, payload: dict[str, Any]) -> None:
        """Queue a reply made on another thread (a changeover's final one) for the command thread: it goes out
        after the replies of the commands before it, so never ahead of its own command's "loading" reply."""
        self._commands.put(payload)

    def pending(self) -> int:
        """Spooled records not yet acknowledged by the broker."""
        return self._spool.unacked()

    def spool_stats(self) -> dict[str, Any]:
        """The spool's counters (pending, in memory, disk full, dropped, unsaved) plus verdicts sent unspooled."""
        return self._spool.stats() | {"unspooled": self.unspooled}

    def health(self) -> str | None:
        """None while the sender and command threads run (or before start / while stopping), else what died."""
        if not self._started or self._stopping:
            return None
        dead = [t.name for t in (self._sender, self._commander) if not t.is_alive()]
        return f"thread {', '.join(dead)} died" if dead else None

    def stop(self, timeout_s: float = 5.0, final_status: dict[str, Any] | None = None) -> None:
        """Flush what the broker accepts, retain "offline" (with `final_status`), disconnect, all within timeout_s;
        the rest stays spooled."""
        deadline = time.monotonic() + timeout_s
        flush_until = deadline - min(1.0, 0.25 * timeout_s)  # keeps time for the offline status and the disconnect
        with self._cond:
            self._cond.wait_for(
                lambda: self.pending() == 0 or not self._connected, timeout=max(0.0, flush_until - time.monotonic())
            )
            self._stopping = True
            self._cond.notify_all()
        if self._sender.is_alive():
            self._sender.join(timeout=max(0.05, flush_until - time.monotonic()))
        self._commands.put(None)
        with self._status_lock:
            if final_status is not None:
                self._status = dict(final_status)
            info = (self._client.publish(f"{self.root}/status", self._status_payload("offline", reason="stopped"),
                                         qos=1, retain=True) if self._connected else None)
        if info is not None:
            try:
                info.wait_for_publish(timeout=max(0.05, deadline - time.monotonic() - 0.2))
            except (RuntimeError, ValueError) as exc:
                log.warning("mqtt_offline_status_unsent", error=str(exc))
        self._client.disconnect()
        # paho's loop_stop joins its network thread without a timeout; a frozen broker must not hold the stop
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-loop-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.05, deadline - time.monotonic()))
        self._retire_acked()
        self._spool.close()
        log.info("mqtt_stopped", unsent=self.pending(), **self.spool_stats())

    def _status_payload(self, state: str, **extra: Any) -> bytes:
        """Status JSON: the caller's last status plus state, time, spool counters and `extra`."""
        shown = "not_ready" if state == "online" and self._status.get("not_ready") else state
        body = {**self._status, "state": shown, "broker_connected": state == "online", "ts": time.time(),
                "spool": self.spool_stats(), **extra}
        return json.dumps(body, default=str).encode()

    def _handle_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        """Subscribe to /cmd and retain "online" on every (re)connect; wake the sender."""
        try:
            self._on_connected(client, reason)
        except Exception:  # an exception here would end paho's network thread
            log.exception("mqtt_connect_handler_failed")

    def _on_connected(self, client: mqtt.Client, reason: Any) -> None:
        """_handle_connect's work."""
        if reason.is_failure:
            log.error("mqtt_connect_refused", reason=str(reason), host=self.cfg.host, port=self.cfg.port)
            return
        with self._cond:
            self._connected = True
        client.subscribe(f"{self.root}/cmd", qos=1)
        # paho re-sends the messages it held only after this callback returns; the sender waits for the
        # PUBACK of this status (read after that re-send) so that no new record overtakes an old one
        with self._status_lock:  # a publish_status racing this connect is either sent after it or read by it
            self._online_mid = client.publish(f"{self.root}/status", self._status_payload("online"), qos=1,
                                              retain=True).mid
        log.info("mqtt_connected", host=self.cfg.host, port=self.cfg.port, backlog=self.pending())

    def _handle_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        """Note the loss; paho reconnects with back-off and re-sends the messages it holds."""
        with self._cond:
            was = self._connected
            self._connected = self._ready = False
            self._cond.notify_all()
        if was and not self._stopping:
            log.warning("mqtt_disconnected", reason=str(reason), backlog=self.pending())

    def _handle_publish(self, _c: mqtt.Client, _ud: Any, mid: int, _reason: Any, _props: Any) -> None:
        """PUBACK: hand the mid to the sender thread (paho holds its own lock here; never block on ours)."""
        with self._cond:
            if mid == self._online_mid and self._connected:
                self._ready, self._online_mid = True, None  # mids wrap at 65535: never match a later one
            else:
                self._acked_mids.append(mid)
            self._cond.notify_all()

    def _handle_message(self, _c: mqtt.Client, _ud: Any, message: mqtt.MQTTMessage) -> None:
        """Queue a /cmd message for the command thread, keeping paho's network loop free."""
        if message.topic == f"{self.root}/cmd":
            self._commands.put(message.payload)

    def _send_loop(self) -> None:
        """Sender thread: run _send_some until stop(); an error (disk, spool) is logged and retried, never fatal."""
        while True:
            try:
                with self._cond:
                    self._cond.wait_for(self._sender_has_work, timeout=1.0)
                    if self._stopping:
                        return
                self._send_some()
            except Exception:
                log.exception("mqtt_sender_error", backlog=self.pending())
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, timeout=1.0)

    def _send_some(self) -> None:
        """Hand spool records to paho in order while ready and the window allows; retire acked ones."""
        self._retire_acked()
        while self._ready and len(self._seq_remaining) < WINDOW:
            record = self._spool.take_next()
            if record is None:
                break
            seq, messages = record
            self._seq_remaining[seq] = len(messages)
            for topic, payload in messages:
                self._mid_seq[self._client.publish(topic, payload, qos=self._qos).mid] = seq
        self._retire_acked()

    def _sender_has_work(self) -> bool:
        """Wake-up condition of the sender thread."""
        can_send = self._ready and len(self._seq_remaining) < WINDOW and self._spool.has_unsent()
        return self._stopping or bool(self._acked_mids) or can_send

    def _retire_acked(self) -> None:
        """Acknowledge in the spool every record whose messages were all PUBACKed."""
        retired = False
        while self._acked_mids:
            seq = self._mid_seq.pop(self._acked_mids.popleft(), None)
            if seq is None:
                continue
            self._seq_remaining[seq] -= 1
            if self._seq_remaining[seq] == 0:
                del self._seq_remaining[seq]
                self._spool.ack(seq)
                retired = True
        if retired:
            with self._cond:
                self._cond.notify_all()

    def _command_loop(self) -> None:
        """Command thread: answer every /cmd message and send the replies queued by send_reply, in arrival order;
        nothing a message holds can end the loop."""
        while (item := self._commands.get()) is not None:
            self._send_reply(item if isinstance(item, dict) else self._run_command(item))

    def _send_reply(self, reply: dict[str, Any]) -> None:
        """Publish one reply; one that cannot be encoded (a NaN in it) or sent becomes an error reply with its id."""
        try:
            self.reply(reply)
        except Exception as exc:
            log.exception("mqtt_command_error", reply=repr(reply)[:200])
            with contextlib.suppress(Exception):
                self.reply({k: reply[k] for k in ("id", "cmd") if k in reply}
                           | {"ok": False, "error": f"reply not sent: {type(exc).__name__}: {exc}"[:300]})

    def _run_command(self, payload: bytes) -> dict[str, Any]:
        """Parse one /cmd payload and call on_command; every failure becomes an error reply (never raises)."""
        if len(payload) > MAX_COMMAND_BYTES:
            log.warning("mqtt_command_malformed", error="too large", bytes=len(payload))
            return {"ok": False, "error": f"command too large ({len(payload)} bytes; at most {MAX_COMMAND_BYTES})"}
        try:
            command = parse_command(payload)
        except ValueError as exc:
            error = str(exc)[:200]
            log.warning("mqtt_command_malformed", error=error, payload=payload[:200])
            return {"ok": False, "error": f"malformed command: {error}"}
        return run_command(command, self._on_command)


def parse_command(payload: bytes) -> dict[str, Any]:
    """A command payload as a standard JSON object (finite numbers only: an echoed 1e400 or NaN id would make the
    reply unreadable) with a scalar "id" if any; ValueError says what is wrong with it."""
    try:
        command = json.loads(payload, parse_float=_finite_float, parse_constant=_not_json)
    except RecursionError:  # deep nesting
        raise ValueError("nested too deeply") from None
    if not isinstance(command, dict):
        raise ValueError("a command must be a JSON object")
    if not isinstance(command.get("id"), str | int | float | None):
        raise ValueError('"id" must be a string or a number')
    return command


def _finite_float(text: str) -> float:
    """json.loads' parse_float for commands: a number beyond float range (1e400) is refused, not made infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range; numbers must be finite")
    return value


def _not_json(name: str) -> float:
    """json.loads' parse_constant for commands: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON; numbers must be finite")


def run_command(command: dict[str, Any], handler: CommandHandler | None) -> dict[str, Any]:
    """Call the command handler; the reply echoes the command's "id" and an exception becomes an error reply.

    The one path for commands from the /cmd topic and from the station page's controls (inspector/web).
    """
    try:
        if handler is None:
            raise ValueError("this publisher takes no commands")
        result = dict(handler(command))
    except Exception as exc:
        log.warning("mqtt_command_failed", command=repr(command)[:200], error=f"{type(exc).__name__}: {exc}"[:300])
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    if "id" in command:
        result.setdefault("id", command["id"])
    return result
