"""Soak: `inspector run` at line rate for N minutes while the broker is killed every minute; count every frame.

    nice .venv/bin/python bench/soak.py --minutes 3 --fps 25 [--kill-every 60] [--down 5] [--signal KILL] \
        [--spool-disk-kib 384]

A synthetic camera feeds the daemon (a subprocess, 1 engine thread, ONNX Runtime) on a random-init 64 px SKU
(the engine's accuracy does not matter here: every frame needs exactly one verdict). A local mosquitto with
persistence is killed every --kill-every seconds and restarted --down seconds later; a subscriber with a
persistent session counts every verdict by (run_id, frame_id). At the end the daemon gets SIGTERM with the
broker up, and the table says: frames acquired (the daemon's own count), verdicts received, lost (acquired
frame ids never received), duplicates (at-least-once re-deliveries), NG, spool losses, the daemon's RSS at
the first verdict and at the end, and its exit status.

Full-disk phase (--spool-disk-kib N, needs root to mount): the spool lives on an N KiB tmpfs, so every broker
outage also fills the spool's disk; the daemon must then hold acquisition (`not_ready`) and resume once the
broker is back. "unaccounted" = frames never received minus the losses the daemon counted (dropped, unsaved):
it must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from calibration.thresholds import Calibration, save_calibration
from engines.runtime import OnnxRuntimeSettings, create_engine
from engines.runtime.benchmark import make_random_sku
from inspector.broker import LocalBroker
from tdad.manifest import score_top_k
from tdad.scoring import image_scores
from tdad.training.sample_data import render_part

REPO = Path(__file__).resolve().parent.parent


def random_sku(workdir: Path) -> Path:
    """The 64 px random-init SKU, exported, with thresholds at the median score of rendered parts (OK and NG)."""
    sku_dir = workdir / "sku"
    if (sku_dir / "calibration.json").is_file():
        return sku_dir
    make_random_sku(sku_dir, image_size=64)
    engine = create_engine(OnnxRuntimeSettings(threads=1), sku_dir)
    rng = np.random.default_rng(0)
    maps = engine.infer(np.stack([render_part("brick", 64, rng) for _ in range(16)]))
    scores = image_scores(maps, top_k=score_top_k(sku_dir))
    calibration = Calibration(image_threshold=float(np.median(scores)), pixel_threshold=float(np.quantile(maps, 0.99)),
                              min_defect_area_px=4, target_false_reject_rate=0.5, n_good=16, n_ng=0,
                              created=datetime.now(UTC), note="soak benchmark: a median split, not a calibration")
    save_calibration(calibration, sku_dir / "calibration.json")
    return sku_dir


class VerdictCounter:
    """A persistent-session subscriber counting verdicts per (run_id, frame_id)."""

    def __init__(self, port: int, root: str) -> None:
        self.seen: Counter[tuple[str, int]] = Counter()
        self.ng: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-plc", clean_session=False)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{root}/verdict", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        verdict = json.loads(message.payload)
        key = (verdict["run_id"], verdict["frame_id"])
        with self._lock:
            self.seen[key] += 1
            if not verdict["ok"]:
                self.ng.add(key)

    def unique(self) -> int:
        """Distinct frames seen."""
        with self._lock:
            return len(self.seen)


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mount_tmpfs(path: Path, size_kib: int) -> None:
    """A real tiny filesystem for the spool (the full-disk phase); exits with the mount's error when it fails."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"--spool-disk-kib needs root to mount a tmpfs on {path}: {result.stderr.strip()}")


def write_config(workdir: Path, sku_dir: Path, port: int, fps: float, spool_dir: Path) -> Path:
    """The soak station: synthetic 64 px camera at `fps`, spool and archive under workdir, 1 engine thread."""
    path = workdir / "soak.toml"
    path.write_text(f"""
active_sku = "soak"
log_level = "info"
[line]
line_id = "soak"
station_id = "s1"
[camera]
type = "synthetic"
width = 64
height = 64
fps = {fps}
frames = 0
defect_rate = 0.2
[mqtt]
port = {port}
spool_dir = "{spool_dir}"
spool_max_mb = 256
reconnect_min_s = 0.2
reconnect_max_s = 2.0
[engine]
backend = "onnxruntime"
batch = 4
threads = 1
[archive]
dir = "archive"
max_mb = 50
[service]
drain_timeout_s = 10
[skus.soak]
model_dir = "{sku_dir}"
""")
    return path


def final_event(log_path: Path, name: str) -> dict[str, Any]:
    """The last JSON log line of the daemon with event `name`."""
    for line in reversed(log_path.read_text().splitlines()):
        if line.startswith("{") and json.loads(line).get("event") == name:
            return json.loads(line)
    raise SystemExit(f"no {name} in {log_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its table; exit 1 when a frame was lost uncounted or the daemon did not exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--fps", type=float, default=25.0, help="camera rate (the line rate)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between broker kills")
    parser.add_argument("--down", type=float, default=5.0, help="seconds the broker stays down")
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL", help="how the broker is killed")
    parser.add_argument("--spool-disk-kib", type=int, default=0,
                        help="full-disk phase: put the spool on a tmpfs of this size (0: no such phase)")
    parser.add_argument("--workdir", type=Path, default=REPO / "var" / "soak")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spool_dir = workdir / "spool"
    if args.spool_disk_kib:
        mount_tmpfs(workdir / "spoolfs", args.spool_disk_kib)
        spool_dir = workdir / "spoolfs" / "spool"
    for stale in spool_dir.glob("*"):
        stale.unlink()
    try:
        return soak(args, workdir, spool_dir)
    finally:
        if args.spool_disk_kib:
            subprocess.run(["umount", "-l", str(workdir / "spoolfs")], check=False)


def soak(args: argparse.Namespace, workdir: Path, spool_dir: Path) -> int:
    """The soak itself (main's body once the spool's filesystem is ready)."""
    sku_dir = random_sku(workdir)
    broker = LocalBroker(workdir / "broker", persistent=True, extra_conf="autosave_interval 1\n").start()
    config = write_config(workdir, sku_dir, broker.port, args.fps, spool_dir)
    counter = VerdictCounter(broker.port, "inspector/soak/s1")
    log_path = workdir / "daemon.log"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("NOTIFY_SOCKET", None)
    with log_path.open("w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run", "--config", str(config)],
                                  cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=log)
    kills = 0
    try:
        deadline = time.monotonic() + 120
        while counter.unique() == 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the daemon published nothing; see {log_path}")
            time.sleep(0.1)
        rss = [rss_mb(daemon.pid)]  # at the first verdict, then once a minute
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_kill, next_sample = t0 + args.kill_every, t0 + 60
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            if next_sample <= time.monotonic() < end - 1:
                rss.append(rss_mb(daemon.pid))
                next_sample += 60
            if time.monotonic() >= next_kill and time.monotonic() + args.down < end:
                assert broker.proc is not None
                broker.proc.send_signal(getattr(signal, f"SIG{args.signal}"))
                broker.proc.wait(10)
                broker.proc = None
                kills += 1
                time.sleep(args.down)
                broker.start()
                next_kill += args.kill_every
        rss.append(rss_mb(daemon.pid))
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    stopped = final_event(log_path, "daemon_stopped")
    acquired, run_id = stopped["acquired"], stopped["run_id"]
    deadline = time.monotonic() + 60
    while counter.unique() < acquired and time.monotonic() < deadline:
        time.sleep(0.2)
    received = {fid for (rid, fid) in counter.seen if rid == run_id}
    lost = sorted(set(range(1, acquired + 1)) - received)
    counted = stopped["spool_dropped_ok"] + stopped["spool_dropped_ng"] + stopped["spool_unsaved"]
    holds = sum('"event": "not_ready"' in line for line in log_path.read_text().splitlines())
    duplicates = sum(n - 1 for n in counter.seen.values())
    counter.client.disconnect()
    counter.client.loop_stop()
    broker.stop()
    rows = {
        "duration (min)": round(args.minutes, 1), "camera fps": args.fps, "broker kills": f"{kills} (SIG{args.signal})",
        "spool disk": f"{args.spool_disk_kib} KiB tmpfs" if args.spool_disk_kib else "the work folder's",
        "acquisition held (not_ready episodes)": holds,
        "frames acquired": acquired, "verdicts (unique)": len(received), "lost": len(lost),
        "unaccounted (lost minus counted losses)": len(lost) - counted,
        "duplicates": duplicates, "NG verdicts": len(counter.ng),
        "spool dropped ok/ng, unsaved": f"{stopped['spool_dropped_ok']}/{stopped['spool_dropped_ng']}, "
                                        f"{stopped['spool_unsaved']}",
        "RSS start (MB)": round(rss[0], 1), "RSS end (MB)": round(rss[-1], 1),
        "RSS growth (MB)": round(rss[-1] - rss[0], 1),
        "RSS each minute (MB)": ", ".join(f"{r:.1f}" for r in rss), "exit status": rc,
    }
    print("| measure | value |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")
    if lost:
        print(f"lost frame ids: {lost[:50]}{' ...' if len(lost) > 50 else ''}")
    return 0 if len(lost) == counted and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
