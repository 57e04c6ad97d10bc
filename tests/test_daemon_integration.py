"""The daemon end to end: real mosquitto, real ONNX Runtime engines, real subprocess and signals, viky.cti.

Each test checks the one promise the line relies on: every acquired frame gets exactly one verdict, even
across a broker outage, a SIGTERM with the broker down (spooled, delivered by the next run), a spool disk
that fills up, a camera that boots after the daemon, and bad input. Consumers de-duplicate by
(run_id, frame_id), as they must with at-least-once delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import genicam
import numpy as np
import pytest
from structlog.testing import capture_logs

from inspector.acquisition import open_source
from inspector.broker import LocalBroker, start_local_broker
from inspector.config import load_config
from inspector.demo import RecordingSource, add_arguments, demo_config, run_demo, summarize
from inspector.pipeline import CORRUPT_FRAME, WRONG_SIZE
from inspector.service import Daemon
from inspector.spool import Spool
from tdad.training.sample_data import draw_defect, render_part
from tests.fixtures_data import damaged_copies
from tests.small_fs import fill, small_fs
from tests.stations import write_station
from tests.test_service import Subscriber
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VIKY = Path(genicam.__file__).parent / "viky.cti"


@pytest.fixture
def trained(trained_sku: Path) -> Path:
    return trained_sku


@pytest.fixture
def random_sku(random_calibrated_sku: Path) -> Path:
    return random_calibrated_sku


def write_config(tmp_path: Path, sku_dir: Path, port: int, camera: dict[str, Any], **service: Any) -> Path:
    """An inspector.toml for one SKU on the local broker, with the given [camera] table (tests/stations.py)."""
    return write_station(
        tmp_path / "inspector.toml", port=port, station_id=f"s{port}", active="brick",
        skus={"brick": {"model_dir": sku_dir}}, camera=camera,
        mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        engine={"backend": "onnxruntime", "batch": 4}, archive={"dir": "archive"},
        service={"queue_depth": 512, "drain_timeout_s": 30} | service)


def unique_by_frame(verdicts: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    """At-least-once de-duplication: one verdict per (frame_id, run_id)."""
    return {(v["frame_id"], v["run_id"]): v for v in verdicts}


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = start_local_broker(tmp_path / "broker", persistent=True)
    yield b
    b.stop()


def persistent_subscriber(broker: LocalBroker, root: str) -> Subscriber:
    """A QoS 1 subscriber with a persistent session, so messages wait for it across broker restarts."""
    return Subscriber(broker.port, root, persistent=True)


def test_200_synthetic_parts_one_verdict_each_in_order_and_defects_caught(
        tmp_path: Path, broker: LocalBroker, trained: Path) -> None:
    camera = {"type": "synthetic", "width": 128, "height": 128, "fps": 0.0, "frames": 200, "defect_rate": 0.3,
              "seed": 7}
    config = load_config(write_config(tmp_path, trained, broker.port, camera))
    sub = persistent_subscriber(broker, config.topic_root)
    source = RecordingSource(open_source(config.camera))
    daemon = Daemon(config, source=source)
    daemon.start()
    try:
        assert daemon.wait_finished(600)
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 200, 60)
    finally:
        daemon.stop()
    verdicts = sub.json("verdict")
    assert [v["frame_id"] for v in verdicts] == list(range(1, 201))
    assert len(sub.json("reject")) == 200
    summary = summarize({v["frame_id"]: v for v in verdicts}, source.defect)
    print("\n" + json.dumps(summary, indent=2))
    assert summary["fail-safe"] == 0
    # The tiny model is imperfect (demo run: 53/57 caught, 0/143 falsely rejected): allow some misses.
    assert summary["caught (NG)"] >= 0.8 * summary["defective parts"]
    assert summary["falsely rejected"] <= 0.05 * summary["good parts"]


def test_broker_outage_mid_run_loses_no_verdict(tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    camera = {"type": "synthetic", "width": 64, "height": 64, "fps": 15.0, "frames": 90, "seed": 3}
    config = load_config(write_config(tmp_path, random_sku, broker.port, camera))
    sub = persistent_subscriber(broker, config.topic_root)
    daemon = Daemon(config)
    daemon.start()
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 10, 60)
        stats, publisher = daemon.running.stats, daemon.publisher
        assert publisher is not None
        acquired = stats.snapshot()["acquired"]
        broker.stop()
        # an outage long enough that verdicts pile up in the spool (the camera runs at 15 fps)
        assert wait_until(lambda: not publisher.connected and stats.snapshot()["acquired"] >= acquired + 15, 60)
        broker.start()
        assert daemon.wait_finished(120)
        assert sub.wait_for(lambda: len(unique_by_frame(sub.json("verdict"))) >= 90, 60)
    finally:
        daemon.stop()
    unique = unique_by_frame(sub.json("verdict"))
    assert sorted(fid for fid, _ in unique) == list(range(1, 91))
    assert daemon.pipeline is not None and daemon.pipeline.stats.snapshot()["acquired"] == 90


def final_event(stderr: str, event: str) -> dict[str, Any]:
    """The last log line with the given event name, JSON or console key=value (scalar fields only)."""
    for line in reversed(re.sub(r"\x1b\[[0-9;]*m", "", stderr).splitlines()):
        if line.startswith("{") and json.loads(line).get("event") == event:
            return json.loads(line)
        if f" {event} " in line:
            return {k: json.loads(v.lower()) if re.fullmatch(r"-?[\d.]+|True|False", v) else v
                    for k, v in re.findall(r"(\w+)=(\S+)", line)}
    raise AssertionError(f"no {event} event in the daemon log:\n{stderr[-3000:]}")


def start_daemon(config_path: Path) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(config_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_drains_every_acquired_frame_and_restart_delivers_the_spool(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    camera = {"type": "synthetic", "width": 64, "height": 64, "fps": 10.0, "frames": 0, "seed": 5}
    config_path = write_config(tmp_path, random_sku, broker.port, camera)
    config = load_config(config_path)
    sub = persistent_subscriber(broker, config.topic_root)
    first = start_daemon(config_path)
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 5, 120), "daemon published nothing"
        first.send_signal(signal.SIGHUP)  # reload thresholds; the run goes on
        seen = len(sub.json("verdict"))
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= seen + 3, 60)  # the main loop woke and reloaded
        broker.stop()  # verdicts from now on can only be spooled
        time.sleep(2.0)
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    assert final_event(stdout + stderr, "thresholds_reloaded")["sku"] == "brick"
    stopped = final_event(stdout + stderr, "daemon_stopped")
    acquired = stopped["acquired"]
    assert stopped["frames"] == acquired and stopped["drained"] and stopped["spooled"] > 0
    t_restart = time.time()

    broker.start()
    second = start_daemon(config_path)
    try:
        def first_run() -> dict[tuple[int, str], dict[str, Any]]:
            return {k: v for k, v in unique_by_frame(sub.json("verdict")).items() if v["t_acquired"] < t_restart}

        assert sub.wait_for(lambda: len(first_run()) >= acquired, 120), (len(first_run()), acquired)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=60)
    assert sorted(fid for fid, _ in first_run()) == list(range(1, acquired + 1))


def test_viky_gentl_camera_frames_are_inspected(tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    camera = {"type": "gentl", "cti": VIKY, "serial": "0", "timeout_s": 1.0, "reconnect_min_s": 0.05,
              "reconnect_max_s": 0.4}
    config = load_config(write_config(tmp_path, random_sku, broker.port, camera, queue_depth=4))
    sub = persistent_subscriber(broker, config.topic_root)
    daemon = Daemon(config)
    daemon.start()
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 8, 120)
    finally:
        daemon.stop()
    assert daemon.pipeline is not None
    acquired = daemon.pipeline.stats.snapshot()["acquired"]
    assert sub.wait_for(lambda: len(unique_by_frame(sub.json("verdict"))) >= acquired, 30)
    verdicts = sub.json("verdict")
    assert sorted(v["frame_id"] for v in unique_by_frame(verdicts).values()) == list(range(1, acquired + 1))
    assert any(v["score"] is not None for v in verdicts)
    assert sub.json("status")[-1]["camera"]["type"] == "gentl"


def test_corrupt_and_wrong_size_frames_get_fail_safe_verdicts_and_the_loop_goes_on(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        part = render_part("brick", 96, rng)
        if i == 4:
            part, _ = draw_defect(part, rng)
        cv2.imwrite(str(frames / f"{i:02d}.png"), cv2.cvtColor(part, cv2.COLOR_RGB2BGR))
    (frames / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cv2.imwrite(str(frames / "03.png"), np.zeros((50, 70, 3), np.uint8))
    part = cv2.cvtColor(render_part("brick", 96, rng), cv2.COLOR_RGB2BGR)
    jpeg, png = (cv2.imencode(ext, part)[1].tobytes() for ext in (".jpg", ".png"))
    (frames / "06.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # OpenCV decodes it, grey-filled, with a warning
    damaged = sorted(damaged_copies(jpeg, png).items())  # OpenCV decodes the JPEGs, with a warning, too
    for i, (name, (data, _)) in enumerate(damaged, start=7):
        (frames / f"{i:02d}_{name}").write_bytes(data)
    camera = {"type": "folder", "path": frames, "pattern": "*.*"}
    config = load_config(write_config(tmp_path, random_sku, broker.port, camera))
    sub = persistent_subscriber(broker, config.topic_root)
    daemon = Daemon(config)
    daemon.start()
    try:
        assert daemon.wait_finished(120)
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 11, 30)
        sub.send(b"[1, 2")
        sub.send(json.dumps({"sku": "unknown-sku", "id": 9}))
        assert sub.wait_for(lambda: len(sub.json("cmd/reply")) >= 2, 30)
    finally:
        daemon.stop()
    verdicts = sub.json("verdict")
    assert [v["frame_id"] for v in verdicts] == list(range(1, 12))
    reasons = [v["reason"] for v in verdicts]
    assert reasons[2].startswith(CORRUPT_FRAME) and "02.png" in reasons[2] and not verdicts[2]["ok"]
    assert reasons[6].startswith(CORRUPT_FRAME) and "06.jpg" in reasons[6] and "truncated" in reasons[6]
    assert not verdicts[6]["ok"]
    for i, (name, (_, said)) in enumerate(damaged, start=7):  # the fail-safe, neither OK nor a model NG
        assert reasons[i].startswith(CORRUPT_FRAME) and name in reasons[i] and said in reasons[i], reasons[i]
        assert not verdicts[i]["ok"] and verdicts[i]["score"] is None
    assert reasons[3].startswith(WRONG_SIZE) and not verdicts[3]["ok"]
    assert reasons[0] is None and reasons[1] is None and reasons[4] is None and reasons[5] is None
    malformed, unknown = sub.json("cmd/reply")
    assert not malformed["ok"] and not unknown["ok"] and "unknown SKU" in unknown["error"]
    archived = list((tmp_path / "archive" / "brick").rglob("*.json"))
    assert len(archived) == sum(not v["ok"] for v in verdicts)


def test_demo_config_and_run_start_their_own_broker_when_none_answers(tmp_path: Path, trained: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--frames", "20", "--fps", "20", "--quiet", "--threads", "1", "--web-port", "0"])
    args.config = write_config(tmp_path, trained, 1, {"type": "synthetic"})  # port 1: nothing listens there
    config = demo_config(args, trained, tmp_path / "demo")
    assert config.mqtt.port == 1 and config.camera.frames == 20
    summary = run_demo(config, tmp_path / "demo", quiet=True)
    assert summary["frames acquired"] == summary["verdicts received"] == 20 and summary["fail-safe"] == 0
    assert summary["latency p50 (ms)"] is not None and summary["throughput (fps)"] > 0


class DaemonLog:
    """The JSON log lines (stderr) of a daemon subprocess, read by a thread so a test can wait for an event."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._stream = proc.stderr
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._stream is not None
        for line in self._stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every logged event called `name`, in order."""
        with self._cond:
            events = [json.loads(line) for line in self.lines if line.startswith("{")]
        return [e for e in events if e.get("event") == name]

    def wait_for(self, name: str, timeout_s: float) -> bool:
        """Wait until an event called `name` has been logged."""
        with self._cond:
            return self._cond.wait_for(lambda: any(f'"event": "{name}"' in line for line in self.lines), timeout_s)

    def close(self) -> str:
        """All of stderr, once the process has ended."""
        self._reader.join(10)
        return "".join(self.lines)


def run_daemon(config_path: Path) -> tuple[subprocess.Popen[str], DaemonLog]:
    """`inspector run` as a subprocess (JSON logs), with its log followed live."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(config_path)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, DaemonLog(proc)


def sigterm(proc: subprocess.Popen[str], log: DaemonLog) -> tuple[int, str]:
    """SIGTERM the daemon; its exit status and its whole log."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, log.close()


def test_a_spool_disk_that_fills_with_the_broker_down_loses_nothing_and_stops_cleanly(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    camera = {"type": "synthetic", "width": 64, "height": 64, "fps": 40.0, "frames": 0, "defect_rate": 0.3, "seed": 11}
    with small_fs(tmp_path / "fs", 640) as fs:
        config_path = write_config(tmp_path, random_sku, broker.port, camera)
        # the set-up: a spool cap far beyond what its filesystem holds
        config_path.write_text(config_path.read_text().replace(
            'spool_dir = "spool"', f'spool_dir = "{fs / "spool"}"\nspool_max_mb = 256'))
        config = load_config(config_path)
        sub = persistent_subscriber(broker, config.topic_root)
        broker.stop()
        first, log = run_daemon(config_path)
        try:
            assert log.wait_for("spool_disk_full", 120), "".join(log.lines)[-3000:]
            broker.start()
            assert log.wait_for("spool_disk_ok", 120), "".join(log.lines)[-3000:]  # delivery freed the disk
            assert sub.wait_for(lambda: any(s.get("spool", {}).get("in_memory") == 0 and s["spool"]["pending"] < 50
                                            for s in sub.json("status")[1:]), 60)
        finally:
            rc, stderr = sigterm(first, log)
        assert rc == 0, stderr[-3000:]
        assert json.loads(stderr.strip().splitlines()[-1])["event"] == "daemon_stopped"
        stopped = final_event(stderr, "daemon_stopped")
        run1, acquired = stopped["run_id"], stopped["acquired"]
        assert stopped["frames"] == acquired and stopped["drained"] and stopped["spooled"] == 0
        assert stopped["spool_unsaved"] == 0 and stopped["spool_dropped_ng"] == stopped["spool_dropped_ok"] == 0

        def run_verdicts(run_id: str) -> list[dict[str, Any]]:
            return [v for v in sub.json("verdict") if v["run_id"] == run_id]

        assert sub.wait_for(lambda: len({v["frame_id"] for v in run_verdicts(run1)}) >= acquired, 60)
        assert sorted({v["frame_id"] for v in run_verdicts(run1)}) == list(range(1, acquired + 1))

        filler = fill(fs)  # restart on a disk that is still full: new verdicts go out live from memory
        second, log = run_daemon(config_path)
        try:
            assert log.wait_for("spool_disk_full", 120), "".join(log.lines)[-3000:]
            assert sub.wait_for(lambda: len([v for v in sub.json("verdict") if v["run_id"] != run1]) >= 20, 60)
        finally:
            rc, stderr = sigterm(second, log)
        filler.unlink()
    assert rc == 0, stderr[-3000:]
    stopped = final_event(stderr, "daemon_stopped")
    assert stopped["spool_unsaved"] == 0 and stopped["spooled"] == 0
    assert sub.wait_for(lambda: len({v["frame_id"] for v in run_verdicts(stopped["run_id"])}) >= stopped["acquired"])
    assert len(run_verdicts(run1)) == acquired, "the second run re-sent none of the first run's verdicts"


def full_disk_station(tmp_path: Path, fs: Path, broker: LocalBroker, sku: Path) -> tuple[Path, Subscriber]:
    """A 40 fps station whose spool (cap far beyond its filesystem) fills its tiny disk, with the broker down."""
    camera = {"type": "synthetic", "width": 64, "height": 64, "fps": 40.0, "frames": 0, "defect_rate": 0.3, "seed": 13}
    config_path = write_config(tmp_path, sku, broker.port, camera, queue_depth=8)
    config_path.write_text(config_path.read_text().replace(
        'spool_dir = "spool"', f'spool_dir = "{fs / "spool"}"\nspool_max_mb = 256'))
    sub = persistent_subscriber(broker, load_config(config_path).topic_root)
    broker.stop()
    return config_path, sub


def run_verdict_ids(sub: Subscriber, run_id: str) -> set[int]:
    """The frame ids of one run's verdicts received so far (de-duplicated)."""
    return {v["frame_id"] for v in sub.json("verdict") if v["run_id"] == run_id}


def test_a_full_spool_disk_with_the_broker_down_stops_acquisition_and_a_stop_counts_every_frame(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    with small_fs(tmp_path / "fs", 640) as fs:
        config_path, sub = full_disk_station(tmp_path, fs, broker, random_sku)
        proc, log = run_daemon(config_path)
        try:
            assert log.wait_for("not_ready", 120), "".join(log.lines)[-3000:]
        finally:
            rc, stderr = sigterm(proc, log)
        assert rc == 0, stderr[-3000:]
        stopped = final_event(stderr, "daemon_stopped")
        lost = stopped["spool_unsaved"] + stopped["spool_dropped_ok"] + stopped["spool_dropped_ng"]
        assert stopped["frames"] == stopped["acquired"] == stopped["spooled"] + lost, "every frame on disk or counted"
        assert stopped["spool_unsaved"] <= 8 + 4 + 2, "held at the first verdict it could not store: no backlog"
        assert stopped["spool_dropped_ng"] == 0
        assert "verdicts_unaccounted" not in stderr
        on_disk = Spool(fs / "spool", 256 << 20)
        assert on_disk.unacked() == stopped["spooled"] and on_disk.lost_in_crash == 0, "what daemon_stopped said"
        on_disk.close()

        broker.start()  # the next run delivers exactly what the stop said was on disk
        second, log = run_daemon(config_path)
        try:
            assert sub.wait_for(lambda: len(run_verdict_ids(sub, stopped["run_id"])) >= stopped["spooled"], 60)
        finally:
            sigterm(second, log)
    assert len(run_verdict_ids(sub, stopped["run_id"])) == stopped["spooled"]


def test_a_daemon_killed_with_verdicts_only_in_memory_has_them_counted_at_the_next_start(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    with small_fs(tmp_path / "fs", 640) as fs:
        config_path, sub = full_disk_station(tmp_path, fs, broker, random_sku)
        proc, log = run_daemon(config_path)
        try:
            assert log.wait_for("not_ready", 120), "".join(log.lines)[-3000:]
        finally:
            proc.kill()
            proc.wait(30)
        run1 = log.events("daemon_ready")[0]["run_id"]
        log.close()
        broker.start()
        second, log = run_daemon(config_path)
        try:
            assert log.wait_for("verdicts_lost_in_crash", 60), "".join(log.lines)[-3000:]
            (crash,) = log.events("verdicts_lost_in_crash")
            assert sub.wait_for(lambda: len(run_verdict_ids(sub, run1)) >= crash["accounted"], 60)
            assert sub.wait_for(lambda: any(s.get("spool", {}).get("lost_in_crash") == crash["lost"]
                                            for s in sub.json("status")), 30), "the loss is on the status topic"
        finally:
            rc, stderr = sigterm(second, log)
    assert rc == 0, stderr[-3000:]
    delivered = run_verdict_ids(sub, run1)
    assert crash["lost"] > 0 and len(delivered) == crash["accounted"]
    assert len(delivered) + crash["lost"] == crash["acquired"] and max(delivered) <= crash["acquired"], \
        "every frame the killed run acquired is delivered or counted lost"


def test_a_camera_that_appears_after_start_is_used_without_a_restart(
        tmp_path: Path, broker: LocalBroker, random_sku: Path) -> None:
    cti = tmp_path / "vendor" / "viky.cti"  # the producer is installed (or the camera boots) only later
    camera = {"type": "gentl", "cti": cti, "serial": "0", "timeout_s": 1.0, "reconnect_min_s": 0.2,
              "reconnect_max_s": 1.0}
    config = load_config(write_config(tmp_path, random_sku, broker.port, camera, queue_depth=4))
    sub = persistent_subscriber(broker, config.topic_root)
    daemon = Daemon(config)
    with capture_logs() as logs:
        daemon.start()  # READY although the camera is not there

        def waits() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "camera_waiting"]

        try:
            assert sub.wait_for(lambda: any(s.get("camera_state") == "waiting" for s in sub.json("status")), 30)
            # back-off 0.2, 0.4, 0.8, 1, 1, 1 s: more than 4 s, past the 3 s in which the old daemon gave up
            assert sub.wait_for(lambda: len(waits()) >= 7, 30)
            cti.parent.mkdir()
            shutil.copy(VIKY, cti)
            assert sub.wait_for(lambda: len(sub.json("verdict")) >= 5, 60)
            assert sub.wait_for(lambda: sub.json("status")[-1].get("camera_state") == "connected", 30)
        finally:
            daemon.stop()
    assert [e["retry_in_s"] for e in waits()][:6] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert "viky.cti does not exist" in waits()[0]["error"]
    assert daemon.source.describe()["reconnects"] == 0 and daemon.pipeline is not None
    assert daemon.pipeline.source_error is None


def test_a_tiled_sku_localises_a_defect_in_a_far_tile_of_a_large_frame_in_frame_coordinates(
        tmp_path: Path, trained: Path) -> None:
    from calibration.thresholds import load_calibration, save_calibration
    from inspector.pipeline import Pipeline
    from inspector.service import load_sku
    from tdad.manifest import TilingRecord, maps_fingerprint, read_manifest, write_manifest
    from tests.fixtures_engines import copy_sku
    from tests.test_pipeline import ListSource

    sku_dir = copy_sku(trained, tmp_path / "tiled")  # the demo model (64 px, trained on 128 px parts) at scale 0.5
    write_manifest(sku_dir, read_manifest(sku_dir).model_copy(update={"tiling": TilingRecord(scale=0.5)}))
    calibration = load_calibration(sku_dir / "calibration.json")  # the demo's thresholds, carried over on purpose
    save_calibration(calibration.model_copy(update={"sku_fingerprint": maps_fingerprint(sku_dir)}),
                     sku_dir / "calibration.json")
    sku = load_sku(load_config(write_config(tmp_path, sku_dir, 1883, {"type": "synthetic"})), "brick")
    rng = np.random.default_rng(11)
    cells = [[render_part("brick", 128, rng) for _ in range(3)] for _ in range(2)]  # a 384 x 256 frame of 6 parts
    good = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
    cells[1][2], mask = draw_defect(cells[1][2], rng, "scratch")
    bad = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
    published: list[Any] = []
    pipeline = Pipeline(ListSource([bad, good]), sku, lambda v, m: published.append(v), batch=4)
    pipeline.start()
    assert pipeline.wait(120)
    ng, ok = published
    assert ng.reason is None and not ng.ok and ng.score > ok.score
    ys, xs = np.nonzero(mask)
    truth = (256 + xs.min(), 128 + ys.min(), 256 + xs.max() + 1, 128 + ys.max() + 1)  # frame px of the scratch
    biggest = max(ng.regions, key=lambda r: r.w * r.h)
    assert biggest.x < truth[2] and biggest.x + biggest.w > truth[0] and biggest.y < truth[3] \
        and biggest.y + biggest.h > truth[1]  # the reported region overlaps the painted defect
    assert all(r.x + r.w > 256 - 4 and r.y + r.h > 128 - 4 for r in ng.regions)  # nothing in the other parts
