"""`inspector sku update` and the page's Teach: a new version of a SKU that knows more good parts, made in seconds
to minutes on the station without retraining.

From the SKU's active version in the store: the good parts (a folder, or the parts operators reviewed as false
rejects or confirmed OK, cropped to the SKU's ROI) are taught to its memory of normal patches
(tdad/training/teach.py), its ONNX graphs exported again (fp16 / int8 too where the version had them), its
thresholds re-fit on the SKU's calibration parts (`skus.<name>.good_dir` or --good: good parts kept apart from the
taught ones, since a taught part reads as normal by construction) at the version's target false-reject rate,
and the result added to the store as a new version with its provenance. TensorRT plans of the old version are
not carried over (the weights changed): rebuild them with `inspector build` where the station runs TensorRT.
Activation is separate (inspector sku activate, or the daemon's `activate` command), so it goes through the
same pre-flight and changeover as any version.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from calibration.thresholds import CALIBRATION_FILE, load_calibration, save_calibration
from foundation.errors import ConfigError, DataError, InspectorError
from foundation.log import get_logger
from inspector.config import InspectorConfig
from inspector.reviews import GOOD_FOLDER, export_mvtec
from inspector.skustore import Provenance, SkuStore, sku_files, sku_paths
from tdad.manifest import TaughtRecord, read_manifest

log = get_logger(__name__)


@dataclass(frozen=True)
class Updated:
    """A version made by update_sku: its id, the version it came from, what was taught and the new threshold."""

    version: str
    parent: str
    taught: TaughtRecord
    image_threshold: float
    good_parts: int


def update_sku(config: InspectorConfig, sku: str, *, add_good: Path | None = None, from_reviews: bool = False,
               good: Path | None = None, actor: str = "",
               progress: Callable[[str], None] = lambda _: None) -> Updated:
    """Teach SKU `sku`'s active version the good parts of `add_good` or of the reviews, re-fit its thresholds and
    add the result to the store as a new version (not activated); see the module docstring. One-line
    InspectorErrors for everything an operator can get wrong."""
    # torch and the exporter: imported here, so the daemon (which holds Teaching) starts without them
    from engines.export import export_sku
    from engines.quantize import derive_fp16, quantize_int8
    from engines.runtime.tensorrt_backend import plan_sidecar
    from inspector.commands.calibrate import calibrate_sku
    from tdad.training.teach import teach_sku

    store = SkuStore(config.store.dir)
    parent = store.active(sku)
    if parent is None:
        raise DataError(f"SKU {sku!r} has no active version in the store {store.root}: install and activate one "
                        "first (inspector sku install / activate)")
    if (add_good is None) == (not from_reviews):
        raise ConfigError("say what to teach: --add-good DIR or --from-reviews (one of them)")
    settings = config.skus.get(sku)
    good = good or (settings.good_dir if settings else None)
    if good is None:
        raise ConfigError(f"no good parts to re-fit the thresholds on: set skus.{sku}.good_dir in inspector.toml or "
                          "pass --good DIR (good parts not among those taught)")
    parent_dir = store.path(sku, parent)
    target_frr = load_calibration(parent_dir / CALIBRATION_FILE).target_false_reject_rate
    with tempfile.TemporaryDirectory(prefix="teach-") as scratch, store.staging(sku) as staged:
        if from_reviews:
            if not config.archive.enabled:
                raise ConfigError("--from-reviews needs the archive the reviews live in: archive.enabled = true")
            progress("collecting the reviewed good parts")
            counts = export_mvtec(config.archive.dir, sku, Path(scratch), roi=settings.roi if settings else None)
            if not counts.get(GOOD_FOLDER):
                raise DataError(f"no part of SKU {sku!r} is reviewed as a false reject or confirmed OK: review them on "
                                "the station page first")
            folder, source = Path(scratch) / sku / "test" / GOOD_FOLDER, f"reviews in {config.archive.dir}"
        else:
            assert add_good is not None
            folder, source = add_good, str(add_good)
        paths = sku_paths(parent_dir)
        plans = [p for p in paths if p.endswith(".plan")]  # built for the old weights: left out, with their sidecars
        stale = {*plans, *(plan_sidecar(Path(p)).as_posix() for p in plans)}
        for relative in paths:
            if relative not in stale:
                (staged / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(parent_dir / relative, staged / relative)
        progress(f"teaching the good parts of {source}")
        record = teach_sku(staged, folder, source)
        progress("exporting the ONNX graphs")
        export = read_manifest(parent_dir).export
        export_sku(staged)
        if export is not None and export.fp16 is not None:
            derive_fp16(staged)
        if export is not None and export.int8 is not None:
            quantize_int8(staged, good)
        progress(f"re-fitting the thresholds on {good}")
        # one image per engine call: a memory search's distance matrix grows with the batch (GBs at 8 frames against a
        # large fine memory), and this runs beside the inspecting daemon
        calibration = calibrate_sku(config.engine, staged, good, target_frr, batch=1,
                                    schedule_override=settings.schedule_override() if settings else None)
        save_calibration(calibration, staged / CALIBRATION_FILE)
        provenance = Provenance(origin="update", source=f"{parent} + {record.images} good parts from {source}",
                                actor=actor, details={"parent": parent, "taught": record.model_dump(mode="json")})
        version = store.commit(sku, staged, sku_files(staged), provenance)
    log.info("sku_updated", sku=sku, version=version, parent=parent, images=record.images,
             memory=list(record.memory), threshold=calibration.image_threshold)
    return Updated(version, parent, record, calibration.image_threshold, calibration.n_good)


class Teaching:
    """The daemon's `teach` command: update_sku from the reviews in a child process at the lowest CPU priority with
    one thread (inspection never waits for it), one at a time; the new version is added, not activated (the
    operator activates it: pre-flight and changeover as any version). `state()` goes into the status."""

    def __init__(self, config: InspectorConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"state": "idle"}
        self._child: BaseProcess | None = None

    def state(self) -> dict[str, Any]:
        """{"state": idle | teaching | done | failed, "sku", "version" (done), "error" (failed), ...}."""
        with self._lock:
            return dict(self._state)

    def start(self, command: dict[str, Any], client: str,
              deliver: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
        """Start teaching SKU command["sku"] its reviewed good parts; the reply now says "teaching" (or why not),
        `deliver` gets the final reply (done with the version, or failed with the error in one line)."""
        sku = command.get("sku")
        if not isinstance(sku, str) or sku not in self.config.skus:
            return {"ok": False, "error": f'teach needs "sku", one of the configured SKUs '
                                          f'({", ".join(self.config.skus)}), got {sku!r}'}
        with self._lock:
            if self._state["state"] == "teaching":
                return {"ok": False, "error": f"SKU {self._state['sku']!r} is being taught already; wait for it"}
            self._state = {"state": "teaching", "sku": sku, "client": client}
        log.info("teach_started", sku=sku, client=client)
        threading.Thread(target=self._run, args=(sku, client, deliver), name="teach", daemon=True).start()
        return {"ok": True, "state": "teaching", "sku": sku}

    def stop(self) -> None:
        """End a teaching child (the daemon stops): its staging folder never becomes a version."""
        child = self._child
        if child is not None and child.is_alive():
            child.terminate()
            child.join(5.0)

    def _run(self, sku: str, client: str, deliver: Callable[[dict[str, Any]], None] | None) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no lock or thread of the daemon's
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_teach_child, args=(self.config, sku, client, send), name=f"teach-{sku}")
        self._child = child
        child.start()
        send.close()
        try:
            result: dict[str, Any] = receive.recv()
        except EOFError:  # the child died without a word: killed, or out of memory
            child.join(5.0)
            result = {"ok": False, "error": f"teaching stopped (exit code {child.exitcode})"}
        child.join(5.0)
        final = {"sku": sku} | result | {"state": "done" if result.get("ok") else "failed"}
        with self._lock:
            self._state = final | {"client": client}
        log.info("teach_finished", **final)
        if deliver is not None:
            deliver(final)


def _teach_child(config: InspectorConfig, sku: str, actor: str, send: Connection) -> None:
    """The child of Teaching: lowest priority, one thread; sends {"ok": True, "version", ...} or the error."""
    import torch

    os.nice(19)
    torch.set_num_threads(1)
    try:
        done = update_sku(config, sku, from_reviews=True, actor=actor)
        send.send({"ok": True, "version": done.version, "from": done.parent, "images": done.taught.images,
                   "memory": list(done.taught.memory), "image_threshold": done.image_threshold})
    except InspectorError as exc:
        send.send({"ok": False, "error": str(exc)})
    except Exception as exc:  # reported to the operator in one line; the daemon keeps running
        send.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
