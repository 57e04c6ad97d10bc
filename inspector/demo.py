"""`inspector demo`: train a small brick SKU on the CPU, then run the daemon on synthetic parts and score it.

First run: writes an MVTec-layout category of scikit-image brick parts (or uses --mvtec-root), trains the
tiny preset (a few CPU minutes, progress bars), exports ONNX, calibrates thresholds on held-out good parts
(and reports the miss rate on held-out defective ones). The SKU is cached under <workdir>/sku and reused
while its recipe (demo.json) matches. Then: a local mosquitto is started unless one answers at the
configured host/port, the daemon runs in-process on a synthetic camera of good and defective parts, a
subscriber prints one line per verdict, and a summary says how many defects were caught or missed. The station
page is served at http://127.0.0.1:8080/ (--web-port) with a control token in <workdir>/web.token; with
--frames 0 the line runs until Ctrl-C (or SIGTERM), then drains, delivers every verdict and prints the summary;
a second Ctrl-C stops waiting and says how many verdicts were not delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from engines.runtime.config import engine_settings
from foundation.errors import InspectorError
from foundation.log import configure_logging, get_logger
from inspector.acquisition import Frame, Source, open_source
from inspector.broker import port_open, start_local_broker
from inspector.config import (
    ArchiveConfig,
    InspectorConfig,
    LineConfig,
    MqttConfig,
    ServiceConfig,
    SkuConfig,
    SyntheticCamera,
    WebConfig,
    load_config,
)

if TYPE_CHECKING:
    from inspector.pipeline import Pipeline

log = get_logger(__name__)

DEMO_SKU = "demo-brick"
RECIPE_FILE = "demo.json"
DELIVERY_TIMEOUT_S = 30.0  # once the pipeline has drained: how long the viewer may take to get the last verdicts
# The daemon's own drain at stop: the demo drains before it stops the daemon, so this bounds only the stop after
# a second Ctrl-C (or an error), when nobody waits for the frames in flight.
STOP_DRAIN_S = 2.0


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the demo SKU; a cached SKU is reused only when its recipe is equal."""

    texture: str = "brick"
    mvtec_root: str | None = None
    category: str = "brick"
    preset: str = "tiny"
    part_size: int = 128
    n_train: int = 96
    n_calib_good: int = 64
    n_calib_ng: int = 24
    target_frr: float = 0.02
    seed: int = 0
    backend: str = "onnxruntime"
    train_scale: float = 1.0  # fraction of the preset's steps per phase (< 1: quicker, less accurate)


def _recipe_matches(sku_dir: Path, recipe: Recipe) -> bool:
    """True when sku_dir holds a finished SKU built from exactly this recipe."""
    stamp = sku_dir / RECIPE_FILE
    needed = [sku_dir / "meta.json", sku_dir / "calibration.json", stamp]
    if not all(p.is_file() for p in needed):
        return False
    try:
        return json.loads(stamp.read_text()) == asdict(recipe)
    except ValueError:
        return False


def build_demo_sku(workdir: Path, recipe: Recipe = Recipe(), *, threads: int = 0, progress: bool = True) -> Path:
    """Train, export and calibrate the demo SKU under workdir/sku (cached by recipe); returns the SKU dir."""
    import torch

    from calibration.evaluate import infer_dataset, sku_split
    from calibration.reference import stats_of_images
    from calibration.thresholds import fit_thresholds, format_table, save_calibration
    from engines.runtime import create_engine
    from tdad.manifest import maps_fingerprint, read_manifest
    from tdad.scoring import image_scores
    from tdad.training.data import file_list_hash
    from tdad.training.sample_data import write_mvtec_tree
    from tdad.training.train import PRESETS, TrainConfig, train_sku

    workdir = Path(workdir)
    sku_dir = workdir / "sku"
    if _recipe_matches(sku_dir, recipe):
        log.info("demo_sku_cached", sku_dir=str(sku_dir))
        return sku_dir
    if threads > 0:
        torch.set_num_threads(threads)
    if recipe.mvtec_root is not None:
        data_root = Path(recipe.mvtec_root)
    else:
        data_root = workdir / "data"
        if not (data_root / recipe.category).is_dir():
            print(f"writing {recipe.texture} parts to {data_root} ...", file=sys.stderr)
            write_mvtec_tree(data_root, recipe.category, n_train=recipe.n_train, n_test_good=recipe.n_calib_good,
                             n_test_bad=recipe.n_calib_ng, size=recipe.part_size, seed=recipe.seed,
                             texture=recipe.texture)
    knobs = dict(PRESETS[recipe.preset])
    for key in ("ae_steps", "diffusion_steps", "seg_steps"):
        knobs[key] = max(10, round(knobs[key] * recipe.train_scale))
    print(f"training the {recipe.preset} preset on the CPU (three phases) ...", file=sys.stderr)
    train_sku(TrainConfig(data=data_root, out=sku_dir, dataset="mvtec", category=recipe.category,
                          seed=recipe.seed, threads=threads, progress=progress, **knobs))
    if recipe.backend == "onnxruntime":
        from engines.export import export_sku

        print("exporting ONNX graphs ...", file=sys.stderr)
        export_sku(sku_dir)
    engine = create_engine(engine_settings(recipe.backend, threads=threads), sku_dir)
    manifest = read_manifest(sku_dir)
    top_k = manifest.score.top_k
    test = sku_split(manifest, "mvtec", data_root, recipe.category)
    inference = infer_dataset(engine, test, desc="calibrate", tiling=manifest.tiling)
    good, ng = ~inference.labels, inference.labels
    scores = image_scores(inference.maps, top_k=top_k)
    calibration = fit_thresholds(
        scores[good], inference.maps[good], recipe.target_frr,
        ng_scores=scores[ng], ng_maps=inference.maps[ng], ng_masks=inference.masks[ng],
        score_top_k=top_k, data_hash=file_list_hash(test), sku_fingerprint=maps_fingerprint(sku_dir),
        good_image_stats=stats_of_images(test[int(i)].image for i in np.flatnonzero(good)),
    )
    save_calibration(calibration, sku_dir / "calibration.json")
    (sku_dir / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    print(format_table(calibration), file=sys.stderr)
    return sku_dir


class RecordingSource:
    """Wraps a Source and remembers which frame ids carried a drawn defect (meta["defect"]).

    With a `gate`, the first frame waits until the gate is set (or the source stopped): a measurement can
    attach its viewers to a started daemon before any frame flows.
    """

    def __init__(self, inner: Source, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.defect: dict[int, bool] = {}
        self.gate = gate

    def open(self) -> None:
        self.inner.open()

    def frames(self) -> Iterator[Frame]:
        if self.gate is not None:
            self.gate.wait()
        for frame in self.inner.frames():
            self.defect[frame.id] = bool(frame.meta.get("defect", False))
            yield frame

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.inner.stop()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class VerdictPrinter:
    """Subscribes to <root>/verdict like a line PLC would, prints one line per verdict of run_id, keeps them by id.

    Verdicts of other runs (an earlier run's spool, re-sent when the daemon starts) are not this run's frames.
    """

    def __init__(self, host: str, port: int, topic_root: str, run_id: str, defect: dict[int, bool],
                 quiet: bool = False) -> None:
        self.topic = f"{topic_root}/verdict"
        self.run_id = run_id
        self.defect = defect
        self.quiet = quiet
        self.verdicts: dict[int, dict[str, Any]] = {}
        self.duplicates = 0
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-viewer-{time.time_ns()}")
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise InspectorError(f"demo viewer could not subscribe to {self.topic} at {host}:{port}")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        verdict = json.loads(message.payload)
        if verdict.get("run_id") != self.run_id:
            return
        with self._cond:
            if verdict["frame_id"] in self.verdicts:
                self.duplicates += 1
                return
            self.verdicts[verdict["frame_id"]] = verdict
            self._cond.notify_all()
        if not self.quiet:
            print(format_verdict(verdict, self.defect.get(verdict["frame_id"])), flush=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def format_verdict(v: dict[str, Any], defect: bool | None) -> str:
    """One console line: id, OK/NG, score vs threshold, regions, latency, and the ground truth if known."""
    verdict = "OK" if v["ok"] else "NG"
    score = "   -  " if v["score"] is None else f"{v['score']:.4f}"
    regions = " ".join(f"[{r['x']},{r['y']} {r['w']}x{r['h']}]" for r in v["regions"][:3])
    truth = "" if defect is None else ("defect" if defect else "good  ")
    reason = f" reason={v['reason']}" if v.get("reason") else ""
    return (f"#{v['frame_id']:>4}  {verdict}  score {score} (thr {v['threshold']:.4f})  {truth}  "
            f"{v['latency_ms'].get('total', 0):7.1f} ms  {regions}{reason}")


def summarize(verdicts: dict[int, dict[str, Any]], defect: dict[int, bool]) -> dict[str, Any]:
    """Counts, rates, throughput (first acquisition to last publish) and camera-to-publish latency percentiles."""
    totals = np.asarray([v["latency_ms"].get("total", np.nan) for v in verdicts.values()], dtype=np.float64)
    acquired_at = np.asarray([v["t_acquired"] for v in verdicts.values()], dtype=np.float64)
    span_s = float(np.nanmax(acquired_at + totals / 1000.0) - acquired_at.min()) if totals.size else 0.0
    decided = {i: v for i, v in verdicts.items() if not v.get("reason")}
    defective = [i for i in decided if defect.get(i)]
    good = [i for i in decided if defect.get(i) is False]
    caught = sum(not decided[i]["ok"] for i in defective)
    false_rejects = sum(not decided[i]["ok"] for i in good)
    return {
        "frames acquired": len(defect),
        "verdicts received": len(verdicts),
        "NG": sum(not v["ok"] for v in verdicts.values()),
        "fail-safe": sum(bool(v.get("reason")) for v in verdicts.values()),
        "throughput (fps)": round(len(verdicts) / span_s, 2) if span_s > 0 else 0.0,
        "latency p50 (ms)": round(float(np.nanpercentile(totals, 50)), 1) if totals.size else None,
        "latency p99 (ms)": round(float(np.nanpercentile(totals, 99)), 1) if totals.size else None,
        "defective parts": len(defective),
        "caught (NG)": caught,
        "missed (OK)": len(defective) - caught,
        "good parts": len(good),
        "falsely rejected": false_rejects,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned two-column table."""
    width = max(len(k) for k in summary)
    rule = "-" * (width + 12)
    return "\n".join([rule, *(f"{k:<{width}}  {v}" for k, v in summary.items()), rule])


def demo_config(args: argparse.Namespace, sku_dir: Path, workdir: Path) -> InspectorConfig:
    """The daemon config of the demo: synthetic camera, the demo SKU, broker from --config (or defaults)."""
    mqtt_cfg = load_config(args.config).mqtt if args.config is not None else MqttConfig()
    mqtt_cfg = mqtt_cfg.model_copy(update={"spool_dir": workdir / "spool", "client_id": None})
    return InspectorConfig(
        active_sku=DEMO_SKU,
        log_level="warning",
        line=LineConfig(line_id="demo", station_id="station1"),
        camera=SyntheticCamera(width=args.part_size, height=args.part_size, fps=args.fps, frames=args.frames,
                               defect_rate=args.defect_rate, seed=args.seed + 1, texture="brick"),
        mqtt=mqtt_cfg,
        engine=engine_settings(args.backend, batch=args.batch, threads=args.threads),
        archive=ArchiveConfig(enabled=True, dir=workdir / "archive", max_mb=64),
        service=ServiceConfig(watchdog=False, queue_depth=args.queue_depth,
                              frame_timeout_ms=args.frame_timeout_ms, drain_timeout_s=STOP_DRAIN_S),
        web=WebConfig(enabled=not args.no_web, port=args.web_port, token_file=demo_token(workdir)),
        skus={DEMO_SKU: SkuConfig(model_dir=sku_dir)},
    )


def demo_token(workdir: Path) -> Path:
    """<workdir>/web.token: the demo page's control token, made once (mode 600, like a real secret file)."""
    path = workdir / "web.token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(24) + "\n")
    return path


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM counted, not raised, while the line runs: the first stops the camera, a second
    stops waiting for the drain; neither cuts short the shutdown of the daemon, the viewer and the broker."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.count += 1  # nothing else: a handler that takes a lock can deadlock the main thread holding it

    def wait(self, done: Callable[[], bool], before: int, timeout_s: float | None = None) -> bool:
        """True once done() holds; False once `before` interrupts have come in all, or after timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if self.count >= before or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(0.05)
        return True


def run_until_delivered(pipeline: Pipeline, source: RecordingSource, viewer: VerdictPrinter,
                        interrupts: Interrupts) -> None:
    """Run until a finite camera ends or the first interrupt stops it, then until every frame taken has its verdict
    at the viewer; a second interrupt (or DELIVERY_TIMEOUT_S without them) ends the wait and says what is missing."""
    interrupts.wait(pipeline.finished.is_set, before=1)
    if interrupts.count:
        print("stopping the camera; draining the frames already taken and delivering their verdicts (Ctrl-C again: "
              "stop waiting) ...", file=sys.stderr)
        source.stop()

    def acquired() -> int:
        return int(pipeline.stats.snapshot()["acquired"])

    if (interrupts.wait(pipeline.finished.is_set, before=2)
            and interrupts.wait(lambda: len(viewer.verdicts) >= acquired(), 2, DELIVERY_TIMEOUT_S)):
        return
    taken, why = acquired(), "interrupted again" if interrupts.count >= 2 else f"none for {DELIVERY_TIMEOUT_S:g} s"
    print(f"{taken - len(viewer.verdicts)} of {taken} verdicts not delivered to the viewer ({why})", file=sys.stderr)


def run_demo(config: InspectorConfig, workdir: Path, quiet: bool = False,
             attach: Callable[[str], AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
    """Run the daemon in-process over config.camera and return the summary of what was received.

    An endless camera (frames = 0) runs until Ctrl-C or SIGTERM, then the camera stops and the frames already taken
    are drained and delivered (run_until_delivered). A local broker started here runs in a session of its own, so a
    terminal's Ctrl-C does not take it down before the drain, and is stopped on every way out. `attach(page_url)`
    (with the page enabled) is entered before the first frame is taken and left after the last verdict: the bench
    opens its browsers there.
    """
    from inspector.service import Daemon

    with Interrupts() as interrupts:
        with contextlib.ExitStack() as cleanup:
            if not port_open(config.mqtt.host, config.mqtt.port):
                broker = start_local_broker(workdir / "broker")
                cleanup.callback(broker.stop)
                print(f"no broker at {config.mqtt.host}:{config.mqtt.port}; started mosquitto on "
                      f"127.0.0.1:{broker.port}", file=sys.stderr)
                mqtt_cfg = config.mqtt.model_copy(update={"host": "127.0.0.1", "port": broker.port})
                config = config.model_copy(update={"mqtt": mqtt_cfg})
            source = RecordingSource(open_source(config.camera), gate=threading.Event())
            daemon = Daemon(config, source=source)
            viewer = VerdictPrinter(config.mqtt.host, config.mqtt.port, config.topic_root, daemon.run_id,
                                    source.defect, quiet)
            cleanup.callback(viewer.close)
            cleanup.callback(daemon.stop)
            daemon.start()
            if daemon.web is not None:
                print(f"station page: {daemon.web.url}  (control token in {config.web.token_file})", file=sys.stderr)
            viewers = attach(daemon.web.url) if attach is not None and daemon.web is not None else None
            with viewers or contextlib.nullcontext():
                assert source.gate is not None
                source.gate.set()
                run_until_delivered(daemon.running, source, viewer, interrupts)
        return summarize(viewer.verdicts, source.defect)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector demo`."""
    parser.add_argument("--workdir", type=Path, default=Path("var/demo"), help="cache and output folder")
    parser.add_argument("--frames", type=int, default=200, help="synthetic parts to inspect (0 = until Ctrl-C)")
    parser.add_argument("--fps", type=float, default=25.0,
                        help="camera rate, a line-like 25 by default (0 = as fast as the daemon takes: throughput)")
    parser.add_argument("--defect-rate", type=float, default=0.3, help="share of parts with a drawn defect")
    parser.add_argument("--part-size", type=int, default=128, help="camera frame size in px (square)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mvtec-root", type=Path, help="train on this MVTec AD root instead of generated parts")
    parser.add_argument("--category", default="brick", help="MVTec category under --mvtec-root")
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for training and inference")
    parser.add_argument("--train-scale", type=float, default=1.0,
                        help="fraction of the tiny preset's training steps (e.g. 0.25 on a busy CPU)")
    parser.add_argument("--batch", type=int, default=4, help="engine micro-batch")
    parser.add_argument("--queue-depth", type=int, default=256)
    parser.add_argument("--frame-timeout-ms", type=float, default=30000.0)
    parser.add_argument("--rebuild", action="store_true", help="retrain even if a cached SKU matches")
    parser.add_argument("--web-port", type=int, default=8080, help="port of the station page on 127.0.0.1 (0 = any)")
    parser.add_argument("--no-web", action="store_true", help="run without the station page")
    parser.add_argument("--quiet", action="store_true", help="summary only, no line per verdict")


def run(args: argparse.Namespace) -> int:
    """Build (or reuse) the demo SKU, run the daemon on synthetic parts, print verdicts and a summary."""
    configure_logging("warning")
    workdir = Path(args.workdir).resolve()
    recipe = Recipe(mvtec_root=str(args.mvtec_root.resolve()) if args.mvtec_root else None,
                    category=args.category, part_size=args.part_size, seed=args.seed, backend=args.backend,
                    train_scale=args.train_scale)
    if args.rebuild:
        (workdir / "sku" / RECIPE_FILE).unlink(missing_ok=True)
    sku_dir = build_demo_sku(workdir, recipe, threads=args.threads)
    summary = run_demo(demo_config(args, sku_dir, workdir), workdir, quiet=args.quiet)
    print(format_summary(summary))
    return 0 if summary["verdicts received"] == summary["frames acquired"] else 1
