"""`inspector run`: the daemon's lifecycle around the pipeline: systemd notify, signals, commands, status.

Lifecycle: load config -> pre-flight checks (inspector/preflight.py: fatal problems stop here, the rest are
logged) -> load the active SKU (engine + calibration, warmed up) -> start the MQTT publisher -> open the
camera (a GenTL camera that is not there yet is waited for in the background: status `camera_state:
waiting`) -> start the pipeline -> READY=1. SIGTERM/SIGINT: STOPPING=1, stop acquisition, drain (every
frame already acquired gets its verdict, published or spooled), flush to the broker, retain the final
status, all within service.drain_timeout_s. SIGHUP: reload the active SKU's calibration.json. A finite
source (folder, video without loop, synthetic with frames > 0) ends the run once its last verdict is out.

Each start has a `run_id` (in every verdict, reject and status): frame ids restart at 1, (run_id, frame_id)
does not.

Watchdog: a timer sends WATCHDOG=1 every WatchdogSec/2 while the daemon is healthy: the pipeline's threads
are alive and the inference and publish threads have come round within `stuck_after_s` (idle, paused and
waiting-for-trigger are healthy; an engine call that hangs is not), and the publisher's sender and command
threads and the status, changeover and drift threads are alive. Otherwise the pings stop and systemd restarts
the service.

Every published verdict also feeds the score/yield trend (inspector/trend.py: the status's `trend`, the page's
chart) and the drift watch (inspector/drift.py): a drift alarm raised or cleared is published on <root>/drift
and shows in the status's `drift` field.

Commands on <topic root>/cmd (JSON object; an optional "id" is echoed in the reply):
    {"cmd": "sku", "sku": "NAME"}  or  {"sku": "NAME"}   SKU changeover: reply {"ok": true, "state":
                                                         "loading"} at once; the new engine loads and warms
                                                         on the changeover thread while the old one inspects;
                                                         then one final reply: {"ok": true, "state":
                                                         "active"} once swapped, ok=false + error, or
                                                         {"ok": false, "state": "superseded", "superseded_by":
                                                         NAME} when a later changeover replaced it (requests
                                                         coalesce: the last SKU requested wins)
    {"cmd": "pause"} / {"cmd": "resume"}                 stop / continue pulling frames
    {"cmd": "reload"}                                    re-read the active SKU's thresholds (as SIGHUP)
    {"cmd": "status"}                                    reply with the status document
    {"cmd": "review", "part": PART, "label": LABEL}      record an operator's review of an archived part
     (+ "defect_type", "operator")                       (inspector/reviews.py): {"ok": true, "review": {...}}
    {"cmd": "versions"} (+ "sku": NAME)                  the SKU's versions in the store, the active and the
                                                         running one (inspector/activation.py)
    {"cmd": "activate", "sku": NAME, "version": ID}      pre-flight, swap the store's link, reload the SKU if it
    {"cmd": "rollback", "sku": NAME}                     inspects (link swapped back if that fails); optional
     (+ "operator", "reason" for the history)            "operator" and "reason"; replies as a changeover's, with
                                                         "version" and "from"; state "ready" when another SKU
                                                         inspects (inspector/activation.py)
    {"cmd": "teach", "sku": NAME}                        teach the SKU's active version its parts reviewed good
                                                         (inspector/skuupdate.py, in a child process at nice 19):
                                                         reply "teaching" at once, then a final reply "done" with
                                                         the new version (added, not activated) or "failed"; the
                                                         status's `teach` says where it stands
Anything else (non-JSON, non-object, unknown cmd) gets {"ok": false, "error": "..."} on <root>/cmd/reply;
the loop keeps running. Every command is answered at once, never queued behind a changeover that loads. The
station page's controls (inspector/web, [web] in inspector.toml) send the same commands through the same
handler and get the same replies (a changeover's final one, which the page waits for).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import sdnotify

from calibration.thresholds import Calibration, load_calibration
from engines.runtime import create_engine
from engines.runtime.base import close_engine
from foundation.errors import ConfigError, DataError, InspectorError
from foundation.log import bind_context, configure_logging, get_logger
from inspector import preflight
from inspector.acquisition import Source, open_source
from inspector.activation import Activations, pinned
from inspector.archive import Archive
from inspector.config import InspectorConfig, load_config, resolve_sku
from inspector.decider import Decider
from inspector.drift import DriftEvent, DriftWatch
from inspector.mqtt import Publisher
from inspector.pipeline import ActiveSku, Pipeline, Published
from inspector.reviews import ReviewError, ReviewStore, parse_review
from inspector.skuupdate import Teaching
from inspector.spool import LOSS_CAUSES
from inspector.trend import Trend
from inspector.verdict import new_run_id
from inspector.web import StationWeb
from tdad.manifest import read_manifest

log = get_logger(__name__)

STATUS_INTERVAL_S = 5.0


def load_thresholds(config: InspectorConfig, name: str) -> Calibration:
    """The SKU's calibration; a missing model_dir or calibration file is an operator error that names the fix."""
    for problem in preflight.check_sku(config, name, engine_files=False):
        raise DataError(str(problem))
    return load_calibration(resolve_sku(config, name).calibration_path())


def load_sku(config: InspectorConfig, name: str) -> ActiveSku:
    """Create, load and warm up the engine of SKU `name` with its calibration: ready to swap in."""
    for problem in preflight.check_sku(config, name):
        raise DataError(str(problem))
    sku_cfg = resolve_sku(config, name)
    calibration = load_calibration(sku_cfg.calibration_path())
    manifest = read_manifest(sku_cfg.model_dir)
    top_k = calibration.score_top_k or manifest.score.top_k
    engine = create_engine(config.engine, sku_cfg.model_dir, schedule_override=sku_cfg.schedule_override() or None)
    try:
        if sku_cfg.input_size is not None and sku_cfg.input_size != engine.image_size:
            raise ConfigError(f"skus.{name}.input_size = {sku_cfg.input_size} but the model in {sku_cfg.model_dir} "
                              f"takes {engine.image_size} px; fix input_size or retrain")
        engine.warmup()
    except BaseException:
        close_engine(engine)  # refused after it loaded: free what it holds on the GPU
        raise
    decider = Decider(calibration, top_k=top_k, publish_mask=sku_cfg.publish_mask)
    return ActiveSku(name=name, engine=engine, decider=decider, roi=sku_cfg.roi, resize=manifest.preprocess.resize,
                     tiling=manifest.tiling)


def watchdog_interval_s(default_s: float = 5.0) -> float:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), the recommended ping period."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    return int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else default_s


@dataclass(frozen=True, eq=False)
class _Changeover:
    """One changeover request: the SKU, the id/cmd part of its reply, and where its one final reply goes."""

    name: str
    reply: dict[str, Any]
    deliver: Callable[[dict[str, Any]], None]
    version: str | None = None  # a store version to load (an activation's reload); None: what model_dir names


class Daemon:
    """One station: source -> pipeline -> publisher, with commands, status, watchdog and clean shutdown."""

    def __init__(self, config: InspectorConfig, *, source: Source | None = None,
                 sku_loader: Callable[[InspectorConfig, str], ActiveSku] = load_sku) -> None:
        self.config = config
        self.sku_loader = sku_loader
        self.topic_root = config.topic_root
        self.notifier = sdnotify.SystemdNotifier()
        if self.notifier.socket is not None:
            self.notifier.socket.setblocking(False)  # a slow reader must never stall the daemon
        self.source = source if source is not None else open_source(config.camera)
        self.run_id = new_run_id()
        self.stuck_after_s = max(10.0, 5.0 * config.service.frame_timeout_ms / 1000.0)
        self.publisher: Publisher | None = None
        self.pipeline: Pipeline | None = None
        self.archive: Archive | None = None
        self.reviews: ReviewStore | None = None
        self.defect_types = {name: sku.defect_types for name, sku in config.skus.items()}  # for reviews
        self.web: StationWeb | None = None
        self.trend = Trend()
        self.drift = DriftWatch(config.drift, on_event=self._on_drift) if config.drift.enabled else None
        self._loading: str | None = None  # the SKU the changeover thread is loading
        self._wanted: _Changeover | None = None  # the newest changeover not answered yet: the last request wins
        self._activating: str | None = None  # the SKU an activate/rollback command works on (inspector/activation.py)
        self.activations = Activations(config, self)
        self.teaching = Teaching(config)
        self._changeovers = threading.Condition()
        self._halt = threading.Event()
        self._timers: list[threading.Thread] = []
        self.state = "starting"

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the active SKU, open camera and broker connection, start the pipeline, then READY=1."""
        cfg = self.config
        if cfg.web.enabled:  # first: a bad token file or a taken port fails before the slow SKU load
            self.web = StationWeb(cfg.web, self, skus=sorted(cfg.skus), defect_types=self.defect_types)
        self._notify(f"STATUS=loading SKU {cfg.active_sku}")
        bind_context(run_id=self.run_id)
        active = self._load_sku(cfg.active_sku)
        bind_context(line=cfg.line.line_id, station=cfg.line.station_id, sku=cfg.active_sku)
        if cfg.archive.enabled:
            self.archive = Archive(cfg.archive.dir, max_mb=cfg.archive.max_mb,
                                   ok_sample_rate=cfg.archive.ok_sample_rate).start()
            self.reviews = ReviewStore(cfg.archive.dir)
        self.publisher = Publisher(cfg.mqtt, self.topic_root, on_command=self.handle_command)
        self.publisher.start()
        self.source.open()
        self.pipeline = Pipeline(self.source, active, self.publisher.publish_verdict, cfg.service, line=cfg.line,
                                 batch=cfg.engine.batch, archive=self.archive, run_id=self.run_id,
                                 on_published=self._observe,
                                 gate=self.publisher, on_hold=self._on_hold)
        self.pipeline.start()
        if self.web is not None:
            self.web.start()
        self.state = "running"
        workers: list[tuple[Callable[[], None], str]] = [
            (self._status_loop, "status"), (self._watchdog_loop, "watchdog"), (self._changeover_loop, "changeover")]
        if self.drift is not None:
            workers.append((functools.partial(self.drift.run, self._halt), "drift"))
        for target, name in workers:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._timers.append(thread)
        self.publish_status()
        self._notify("READY=1")
        log.info("daemon_ready", sku=active.name, run_id=self.run_id, engine=active.engine.describe(),
                 camera=self.source.describe())

    def stop(self) -> bool:
        """STOPPING=1, stop acquisition, drain in-flight frames to verdicts, flush/spool, retain the final status
        and disconnect, all within service.drain_timeout_s."""
        drain_s = self.config.service.drain_timeout_s
        deadline = time.monotonic() + drain_s
        publisher_s = min(1.0, 0.25 * drain_s)  # kept for the final status and the disconnect

        def left(reserve: float = 0.0) -> float:
            return max(0.05, deadline - reserve - time.monotonic())

        self.state = "stopping"
        self._end_changeovers()
        self.teaching.stop()
        self._notify("STOPPING=1\nSTATUS=draining")
        if self.web is not None:
            self.web.stop()
        drained = True
        if self.pipeline is not None:
            drained = self.pipeline.stop(left(publisher_s))
        self._halt.set()
        for thread in self._timers:
            thread.join(min(1.0, left(publisher_s)))
        if self.archive is not None:
            self.archive.stop(min(2.0, left(publisher_s)))
        stats = self.pipeline.stats.snapshot() if self.pipeline is not None else {}
        self.state = "stopped"
        spool: dict[str, Any] = {}
        if self.publisher is not None:
            self.publisher.stop(left(min(0.5, 0.1 * drain_s)), final_status=self.status())
            spool = self.publisher.spool_stats()
        try:
            self.source.close()
        except Exception as exc:
            log.warning("source_close_failed", error=str(exc))
        losses = {f"spool_{cause}": spool.get(cause, 0) for cause in LOSS_CAUSES}
        log.info("daemon_stopped", drained=drained, spooled=spool.get("pending", 0), run_id=self.run_id, **losses,
                 **stats)
        return drained

    @property
    def running(self) -> Pipeline:
        """The pipeline of a started daemon."""
        if self.pipeline is None:
            raise RuntimeError("Daemon.start() has not run")
        return self.pipeline

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        """True once a finite source's last verdict has been published."""
        return self.pipeline is not None and self.pipeline.wait(timeout_s)

    # ---- commands --------------------------------------------------------------------------------------------

    def handle_command(self, command: Any, *, loading_reply: bool = True, client: str = "mqtt") -> dict[str, Any]:
        """Dispatch one command (schema in the module docstring); never raises.

        Only a changeover takes long, and it is queued (change_sku): every command is answered at once.
        loading_reply: a changeover is answered "loading" now and finally on /cmd/reply later; the station page,
        which shows the loading SKU from the status, passes False and gets the final reply.
        client: who sent it, recorded with a review ("mqtt", or the station page's "web <address>").
        """
        if not isinstance(command, dict):
            return {"ok": False, "error": f"command must be a JSON object, got {type(command).__name__}"}
        reply: dict[str, Any] = {"id": command["id"]} if "id" in command else {}
        name = command.get("cmd", "sku" if "sku" in command else None)
        if not isinstance(name, str | None):
            return reply | {"ok": False, "error": '"cmd" must be a string: sku, pause, resume, reload, status, '
                                                  'review, versions, activate, rollback or teach'}
        reply["cmd"] = name
        if self.pipeline is None:
            return reply | {"ok": False, "error": "the daemon is still starting; retry in a few seconds"}
        try:
            if name == "sku":
                return reply | self.change_sku(command.get("sku"), reply, wait=not loading_reply)
            if name in ("pause", "resume"):
                return reply | self.set_paused(name == "pause")
            if name == "reload":
                return reply | self.reload_thresholds()
            if name == "status":
                return reply | {"ok": True, "status": self.status()}
            if name == "review":
                return reply | self.review(command, client)
            if name == "versions":
                return reply | self.activations.versions(command)
            if name in ("activate", "rollback"):
                deliver = (lambda result: self._send_final_reply(reply | result)) if loading_reply else None
                return reply | self.activations.start(name, command, client, deliver)
            if name == "teach":
                return reply | self.teaching.start(command, client, self._taught(reply))
            return reply | {"ok": False, "error": f"unknown command {name!r}; use sku, pause, resume, reload, status, "
                                                  "review, versions, activate, rollback or teach"}
        except Exception as exc:
            log.exception("command_failed", cmd=name)
            return reply | {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _taught(self, reply: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        """What a finished teaching does: the final reply on /cmd/reply and the status (with `teach`) published."""
        def deliver(result: dict[str, Any]) -> None:
            self._send_final_reply(reply | result)
            self.publish_status()
        return deliver

    def set_paused(self, paused: bool) -> dict[str, Any]:
        """Pause or resume acquisition."""
        pipeline = self.running
        if paused:
            pipeline.pause()
        else:
            pipeline.resume()
        log.info("paused" if paused else "resumed")
        self.publish_status()
        return {"ok": True, "paused": paused}

    def review(self, command: dict[str, Any], client: str) -> dict[str, Any]:
        """Record an operator's review of an archived part (inspector/reviews.py) on the calling thread (the command
        thread, or the station page's threadpool), never the pipeline's."""
        if self.reviews is None:
            return {"ok": False, "error": "reviews need the archive: set archive.enabled = true in inspector.toml"}
        try:
            review = self.reviews.add(parse_review(command, self.defect_types), client=client)
        except ReviewError as exc:
            return {"ok": False, "error": str(exc)}
        log.info("part_reviewed", part=review.part, label=review.label, defect_type=review.defect_type,
                 client=client, operator=review.operator)
        return {"ok": True, "review": review.model_dump(mode="json")}

    def change_sku(self, name: Any, reply: dict[str, Any], *, wait: bool) -> dict[str, Any]:
        """Hand a changeover to the changeover thread, which loads and warms the SKU while the old one inspects.

        Requests coalesce: the last SKU requested wins, and the request it replaces (waiting or loading) gets its
        final reply at once, state "superseded". Every request gets exactly one final reply: state "active" once
        the SKU inspects, "superseded", or ok false with the fix. wait=False (the /cmd topic) returns the interim
        "loading" reply and sends the final one (`reply` plus the result) with Publisher.send_reply; wait=True
        (the station page) returns the final reply. While an activation (inspector/activation.py) works on a SKU,
        a request for it is refused, or, when it inspects and the activation reloads it, answered "active" at once
        leaving that reload be.
        """
        pipeline = self.running
        if not isinstance(name, str) or not name:
            return {"ok": False, "error": 'sku changeover needs {"sku": "NAME"}'}
        try:
            resolve_sku(self.config, name)
        except ConfigError as exc:
            return {"ok": False, "sku": name, "error": str(exc)}
        final: Future[dict[str, Any]] = Future()
        request = _Changeover(name, reply, final.set_result if wait else self._send_final_reply)
        with self._changeovers:
            if self.state in ("stopping", "stopped"):
                return {"ok": False, "sku": name, "error": "the daemon is stopping"}
            already = name == pipeline.sku.name
            if already and self._wanted is not None and self._wanted.name == name:
                # an activation reloads the SKU inspecting: that reload stays wanted, and the SKU inspects meanwhile
                return {"ok": True, "sku": name, "state": "active", "load_s": 0.0}
            if not already and name == self._activating:
                return {"ok": False, "sku": name, "error": f"SKU {name!r} is being activated (a new version); retry "
                                                           "once that is answered"}
            superseded, self._wanted = self._wanted, None if already else request
            self._changeovers.notify_all()
        if superseded is not None:
            log.info("changeover_superseded", sku=superseded.name, by=name)
            superseded.deliver(superseded.reply | {
                "ok": False, "sku": superseded.name, "state": "superseded", "superseded_by": name,
                "error": f"superseded by the changeover to {name!r} requested after it"})
        if already:
            return {"ok": True, "sku": name, "state": "active", "load_s": 0.0}
        return final.result() if wait else {"ok": True, "sku": name, "state": "loading"}

    def running_sku(self) -> ActiveSku:
        """The SKU inspecting (a changeover waiting for the next batch included)."""
        return self.running.sku

    def claim_activation(self, name: str) -> str | None:
        """Mark an activation of SKU `name` under way, unless one is or a changeover is in progress (then why, one
        line); changeovers to `name` are refused until release_activation, so none loads it half-way through."""
        with self._changeovers:
            if self._activating is not None:
                return f"an activation of SKU {self._activating!r} is under way; retry once it is answered"
            busy = self._changeover_in_progress()
            if busy is not None:
                return f"a changeover to SKU {busy!r} is in progress; retry once it is answered"
            self._activating = name
        return None

    def release_activation(self) -> None:
        """The activation claimed is answered: changeovers to its SKU are taken again."""
        with self._changeovers:
            self._activating = None

    def reload_version(self, name: str, version: str) -> dict[str, Any]:
        """An activation's reload: when SKU `name` inspects, load `version` of it on the changeover thread (the old
        engine inspects meanwhile) and return the final reply, as a changeover's; {"ok": true, "state": "ready"}
        when another SKU inspects (the version loads at the next changeover to it); ok false when a changeover to
        another SKU is in progress (a reload never cancels one) or the daemon stops."""
        final: Future[dict[str, Any]] = Future()
        request = _Changeover(name, {}, final.set_result, version)
        with self._changeovers:
            if self.state in ("stopping", "stopped"):
                return {"ok": False, "sku": name, "error": "the daemon is stopping"}
            if self.running.sku.name != name:
                return {"ok": True, "sku": name, "state": "ready"}
            busy = self._changeover_in_progress()
            if busy is not None:
                return {"ok": False, "sku": name, "error": f"a changeover to SKU {busy!r} came in meanwhile"}
            self._wanted = request
            self._changeovers.notify_all()
        return final.result()

    def _changeover_in_progress(self) -> str | None:
        """The SKU a changeover loads or waits to load, None when none does (called holding self._changeovers)."""
        return self._loading or (self._wanted.name if self._wanted is not None else None)

    def _load_sku(self, name: str, version: str | None = None) -> ActiveSku:
        """Load SKU `name` pinned to one version (inspector/activation.py: `version`, else the one its model_dir
        names now), marked with that version and hash for the status and /metrics."""
        config, identity = pinned(self.config, name, version)
        return replace(self.sku_loader(config, name), version=identity.version, content_hash=identity.hash)

    def _send_final_reply(self, reply: dict[str, Any]) -> None:
        """A /cmd changeover's final reply, queued behind the replies the command thread is sending."""
        if self.publisher is not None:
            self.publisher.send_reply(reply)

    def _changeover_loop(self) -> None:
        """Changeover thread: load the newest requested SKU, one at a time, until the daemon stops."""
        while True:
            with self._changeovers:
                self._changeovers.wait_for(lambda: self._wanted is not None or self.state in ("stopping", "stopped"))
                request = self._wanted
                if request is None:
                    return
                self._loading = request.name
            self._load(request)

    def _load(self, request: _Changeover) -> None:
        """Load and warm request's SKU, then swap it in and answer, unless a newer request superseded it
        meanwhile (the loaded SKU is then dropped; a newer request for the same SKU takes it instead)."""
        t0 = time.monotonic()
        self.publish_status()
        active: ActiveSku | None = None
        try:
            active = self._load_sku(request.name, request.version)
            result = {"ok": True, "sku": request.name, "state": "active", "load_s": round(time.monotonic() - t0, 2)}
        except Exception as exc:
            message = str(exc) if isinstance(exc, InspectorError) else f"{type(exc).__name__}: {exc}"
            result = {"ok": False, "sku": request.name, "error": message}
        with self._changeovers:
            self._loading = None
            wanted = self._wanted
            if wanted is not None and (wanted is request or (active is not None and wanted.name == request.name)):
                self._wanted = None
                if active is not None:
                    self.running.swap_sku(active)
            else:
                wanted = None
        if wanted is None:
            log.info("changeover_dropped", sku=request.name, detail="superseded while it loaded")
            if active is not None:
                close_engine(active.engine)
        elif active is None:
            log.error("changeover_failed", sku=request.name, error=result["error"])
        else:
            bind_context(sku=request.name)
            log.info("changeover_done", sku=request.name, load_s=result["load_s"])
            self._notify(f"STATUS=inspecting SKU {request.name}")
        self.publish_status()
        if wanted is not None:
            wanted.deliver(wanted.reply | result)

    def _end_changeovers(self) -> None:
        """At stop: answer the changeover not done yet and let the changeover thread end (a load in progress
        finishes in the background and is dropped)."""
        with self._changeovers:
            wanted, self._wanted = self._wanted, None
            self._changeovers.notify_all()
        if wanted is not None:
            wanted.deliver(wanted.reply | {"ok": False, "sku": wanted.name, "error": "the daemon is stopping"})

    def reload_thresholds(self) -> dict[str, Any]:
        """SIGHUP or {"cmd": "reload"}: re-read the active SKU's calibration.json; a bad file keeps the old ones."""
        pipeline = self.running
        active = pipeline.sku
        try:
            calibration = load_thresholds(pinned(self.config, active.name, active.version or None)[0], active.name)
        except Exception as exc:
            log.error("thresholds_reload_failed", sku=active.name, error=str(exc))
            return {"ok": False, "sku": active.name, "error": f"thresholds kept: {exc}"}
        active.decider.calibration = calibration
        log.info("thresholds_reloaded", sku=active.name, image_threshold=calibration.image_threshold,
                 pixel_threshold=calibration.pixel_threshold)
        return {"ok": True, "sku": active.name, "image_threshold": calibration.image_threshold,
                "pixel_threshold": calibration.pixel_threshold}

    # ---- status and watchdog ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The retained status document: state, SKU, engine, camera, counters, fps, latency, spool."""
        pipeline = self.pipeline
        camera = _safe(self.source.describe)
        connected = bool(camera.get("connected", False))
        doc: dict[str, Any] = {
            "run_state": self.state, "run_id": self.run_id, "line": self.config.line.line_id,
            "station": self.config.line.station_id, "camera": camera, "camera_connected": connected,
            "camera_state": camera.get("state") or ("connected" if connected else "disconnected"),
        }
        if pipeline is not None:
            active = pipeline.sku
            doc |= {"sku": active.name, "sku_version": active.version, "sku_hash": active.content_hash,
                    "paused": pipeline.paused, "not_ready": pipeline.not_ready,
                    "loading_sku": self._loading,
                    "queued": pipeline.queued(),
                    "engine": _safe(active.engine.describe), "stats": pipeline.stats.snapshot()}
        if self.archive is not None:
            doc["archive"] = self.archive.stats()
        doc |= {"drift": self.drift.status() if self.drift is not None else {"state": "disabled"},
                "trend": self.trend.summary(), "teach": self.teaching.state()}
        if self.publisher is not None:
            doc |= {"broker_connected": bool(self.publisher.connected), "spool_pending": self.publisher.pending(),
                    "spool": self.publisher.spool_stats()}
        return doc

    def publish_status(self) -> None:
        """Publish the retained status document (and a systemd STATUS= line)."""
        if self.publisher is None:
            return
        doc = self.status()
        try:
            self.publisher.publish_status(doc)
        except Exception as exc:
            log.warning("status_publish_failed", error=str(exc))
        stats = doc.get("stats", {})
        camera = "" if doc["camera_connected"] else f" camera={doc['camera_state']}"
        self._notify(f"STATUS={self.state} sku={doc.get('sku')} frames={stats.get('frames')} "
                     f"ng={stats.get('ng')} fps={stats.get('fps')}{camera}")

    def _observe(self, item: Published) -> None:
        """The pipeline's on_published hook (publish thread): the trend counts the verdict, the drift watch and the
        station page keep a reference to it; nothing here waits."""
        self.trend.observe(item.verdict)
        if self.drift is not None:
            self.drift.observe(item)
        if self.web is not None:
            self.web.observe(item)

    def _on_drift(self, event: DriftEvent) -> None:
        """A drift alarm raised or cleared (drift thread): on <root>/drift, and at once in the retained status."""
        if self.publisher is not None:
            self.publisher.publish_event("drift", event)
        self.publish_status()

    def _on_hold(self, reason: str | None) -> None:
        """Acquisition started or stopped holding (the spool policy): say so at once on every channel."""
        self.publish_status()
        if reason is not None:
            self._notify(f"STATUS=not_ready: {reason}")

    def _status_loop(self) -> None:
        """Status thread: publish the status document every STATUS_INTERVAL_S; an error is logged, never fatal."""
        while not self._halt.wait(STATUS_INTERVAL_S):
            try:
                self.publish_status()
            except Exception:
                log.exception("status_failed")

    def health(self) -> str | None:
        """None while every worker thread runs and comes round; else what is wrong."""
        if not self.running.healthy(self.stuck_after_s):
            return f"a pipeline thread died or is stuck for more than {self.stuck_after_s}s"
        problem = self.publisher.health() if self.publisher is not None else None
        dead = [t.name for t in self._timers if t.name != "watchdog" and not t.is_alive()]
        return problem or (f"thread {', '.join(dead)} died" if dead else None)

    def _watchdog_loop(self) -> None:
        """WATCHDOG=1 while the daemon is healthy; withheld (each new problem logged once) otherwise."""
        if not self.config.service.watchdog:
            return
        interval = watchdog_interval_s()
        withheld: str | None = None
        while not self._halt.wait(interval):
            problem = self.health()
            if problem is None:
                self._notify("WATCHDOG=1")
            elif problem != withheld:
                log.error("watchdog_withheld", detail=problem)
            withheld = problem

    def _notify(self, state: str) -> None:
        self.notifier.notify(state)


def _safe(describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A describe() result for the status document; an exception becomes {"error": ...}."""
    try:
        return dict(describe())
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`inspector run` takes only --config (common to all subcommands)."""
    parser.set_defaults(log_json=None)
    parser.add_argument("--log-json", dest="log_json", action="store_true",
                        help="JSON log lines even on a terminal (default: JSON unless stderr is a TTY)")


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT (or a finite source ends); SIGHUP reloads thresholds."""
    config = load_config(args.config)
    configure_logging(config.log_level, json=getattr(args, "log_json", None) or None)
    wake = threading.Event()
    requests: set[str] = set()

    def on_signal(signum: int, _frame: object) -> None:
        requests.add("reload" if signum == signal.SIGHUP else "stop")
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    problems = preflight.check(config, skus=[config.active_sku])
    for problem in problems:
        if not problem.fatal:
            log.warning("preflight_warning", key=problem.key, problem=problem.message)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        more = f" (and {len(fatal) - 1} more; run inspector config check)" if len(fatal) > 1 else ""
        raise ConfigError(f"{fatal[0]}{more}")
    daemon = Daemon(config)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()
        raise
    assert daemon.pipeline is not None
    while "stop" not in requests and not daemon.pipeline.finished.is_set():
        wake.wait(0.5)
        wake.clear()
        if "reload" in requests:
            requests.discard("reload")
            daemon.reload_thresholds()
    if "stop" in requests:
        log.info("signal_stop")
    drained = daemon.stop()
    # a camera that failed (rather than ran out of frames) exits non-zero so systemd restarts the service
    return 0 if drained and daemon.running.source_error is None else 1
