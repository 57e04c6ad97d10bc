"""Pre-flight: every file and directory a station's config names, checked, each problem with its fix.

`inspector config check` prints them all and exits 2 when there is any; `inspector run` runs the same checks
at start-up, refuses to start on a fatal one and only logs the others, which the daemon rides out: a GenTL
producer or camera that is not there yet is waited for, and a disk too small for the spool and archive caps
is handled by the spool (verdicts wait in memory, the oldest OK ones are dropped first). Changeover and
threshold reload use `check_sku`; activating a version of the SKU store runs the same `check_sku_dir` on it
(`version_check`). Nothing here changes the box: no directory is created, no file written.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from engines.runtime.config import EngineSettings, TensorRTSettings
from foundation.errors import DataError, InspectorError
from inspector.config import (
    CameraConfig,
    GenTLCamera,
    InspectorConfig,
    MqttConfig,
    SkuConfig,
    WebConfig,
    check_secret_file,
    resolve_sku,
)
from tdad.manifest import WEIGHTS_FILE, maps_fingerprint, read_manifest


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the station: the config key at fault and the one-line message naming the fix."""

    key: str
    message: str
    fatal: bool = True  # False: `inspector run` starts anyway and handles it at run time

    def __str__(self) -> str:
        return self.message


def check(config: InspectorConfig, skus: Iterable[str] | None = None) -> list[Problem]:
    """Every problem of the camera, the broker's files, spool and archive storage, the station page's token and
    the SKUs (all, or `skus`)."""
    problems = [*check_camera(config.camera), *check_mqtt(config.mqtt), *check_storage(config), *check_web(config.web)]
    for name in config.skus if skus is None else skus:
        problems += check_sku(config, name)
    return problems


def check_camera(camera: CameraConfig) -> list[Problem]:
    """GenTL: the producer file exists (the camera itself is not opened: the daemon may hold it); folder and
    video: the source opens, exactly as `inspector run` opens it."""
    if isinstance(camera, GenTLCamera):
        if not camera.cti.is_file():
            return [Problem("camera.cti", f"camera.cti = {camera.cti} does not exist; install the camera vendor's "
                            "GenTL producer and point camera.cti at its .cti file (inspector run waits for it)",
                            fatal=False)]
        if not os.access(camera.cti, os.R_OK):
            return [Problem("camera.cti", f"camera.cti = {camera.cti} is not readable by {getpass.getuser()}; "
                            "make it world-readable (chmod 644)", fatal=False)]
        return []
    if camera.type == "synthetic":
        return []
    from inspector.acquisition import open_source

    source = open_source(camera)
    try:
        source.open()
    except InspectorError as exc:
        return [Problem("camera.path", str(exc))]
    source.close()
    return []


def check_mqtt(cfg: MqttConfig) -> list[Problem]:
    """Password and TLS key: present, not world-readable, readable by this user; CA and certificate present."""
    problems = []
    for key in ("password_file", "tls_key"):
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            check_secret_file(path, f"mqtt.{key}")
        except InspectorError as exc:
            problems.append(Problem(f"mqtt.{key}", str(exc)))
            continue
        if not os.access(path, os.R_OK):
            problems.append(Problem(f"mqtt.{key}", f"mqtt.{key}: secret file {path} is not readable by "
                                    f"{getpass.getuser()}; chown it to the service user (mode 600)"))
    for key in ("tls_ca", "tls_cert"):
        path = getattr(cfg, key)
        if path is not None and not path.is_file():
            problems.append(Problem(f"mqtt.{key}", f"mqtt.{key} = {path} does not exist; fix the path or remove "
                                    "the key"))
    return problems


def check_web(cfg: WebConfig) -> list[Problem]:
    """The station page's control token: present, not world-readable, long enough, readable by this user."""
    if not cfg.enabled or cfg.token_file is None:
        return []
    try:
        cfg.read_token()
    except InspectorError as exc:
        return [Problem("web.token_file", str(exc))]
    return []


def check_storage(config: InspectorConfig) -> list[Problem]:
    """Spool (and archive) directories writable, and their size caps within the free space of their filesystem."""
    dirs = [("mqtt.spool_dir", config.mqtt.spool_dir, config.mqtt.spool_max_mb)]
    if config.archive.enabled:
        dirs.append(("archive.dir", config.archive.dir, config.archive.max_mb))
    problems = []
    by_device: dict[int, list[tuple[str, Path, float, Path]]] = {}
    for key, path, cap_mb in dirs:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            problems.append(Problem(key, f"{key} = {path} cannot be a directory: {existing} is a file; fix the path"))
        elif not os.access(existing, os.W_OK | os.X_OK):
            made = "" if existing == path else f" (it would be created in {existing})"
            problems.append(Problem(key, f"{key} = {path} is not writable by {getpass.getuser()}{made}; fix the path "
                                    "or give the service user write access"))
        else:
            by_device.setdefault(existing.stat().st_dev, []).append((key, path, cap_mb, existing))
    for entries in by_device.values():
        st = os.statvfs(entries[0][3])
        free_mb = st.f_bavail * st.f_frsize / 2**20
        used_mb = sum(_tree_bytes(path) for _, path, _, _ in entries) / 2**20
        if sum(cap for _, _, cap, _ in entries) > free_mb + used_mb:
            caps = " + ".join(f"{key} cap ({cap:g} MB)" for key, _, cap, _ in entries)
            problems.append(Problem(
                entries[0][0],
                f"{caps} exceed the {free_mb + used_mb:.1f} MB that {entries[0][3]} can hold; lower "
                "mqtt.spool_max_mb / archive.max_mb or free space (when the disk fills, verdicts wait in memory "
                "and the oldest OK ones are dropped first)",
                fatal=False,
            ))
    return problems


def check_sku(config: InspectorConfig, name: str, *, engine_files: bool = True) -> list[Problem]:
    """The SKU's model_dir, calibration, manifest (meta.json) and the files the configured engine backend loads."""
    return check_sku_dir(resolve_sku(config, name), config.engine, name, engine_files=engine_files)


def version_check(config: InspectorConfig, name: str) -> Callable[[Path], None]:
    """The pre-flight to pass as `SkuStore.activate(check=...)`: check_sku_dir of a version folder as SKU `name`
    of this station (its engine, its [skus.<name>] settings, or the defaults where it has no such table); the
    first problem is raised as DataError, so a version the daemon would refuse never goes live."""
    settings = config.skus.get(name)

    def check(version_dir: Path) -> None:
        sku = (SkuConfig(model_dir=version_dir) if settings is None
               else settings.model_copy(update={"model_dir": version_dir}))
        for problem in check_sku_dir(sku, config.engine, name):
            raise DataError(str(problem))

    return check


def check_sku_dir(sku: SkuConfig, engine: EngineSettings, name: str, *, engine_files: bool = True) -> list[Problem]:
    """The SKU folder `sku.model_dir` as SKU `name` of a station running `engine`: calibration present and fit on
    these weights, manifest readable, and (engine_files) the files the backend loads; the daemon's SKU loading and
    a store version's activation both run exactly this."""
    from calibration.thresholds import load_calibration  # scikit-learn: only when a SKU is checked

    key = f"skus.{name}"
    if not sku.model_dir.is_dir():
        return [Problem(f"{key}.model_dir", f"{key}.model_dir = {sku.model_dir} does not exist; train the SKU "
                        f"(inspector train --sku {name}) or fix the path")]
    problems = []
    calibration = sku.calibration_path()
    cal_key = f"{key}.thresholds_file" if sku.thresholds_file else f"{key}.model_dir"
    if not calibration.is_file():
        where, other_fix = ((f"{key}.thresholds_file = {calibration} does not exist", "fix the path")
                            if sku.thresholds_file else
                            (f"{key}.thresholds_file is not set and its default {calibration} does not exist",
                             f"set {key}.thresholds_file"))
        problems.append(Problem(cal_key, f"{where}: no calibration for SKU {name!r}; run `inspector calibrate "
                                f"--sku {name}` (it writes there) or {other_fix}"))
    else:
        try:
            stale = _calibration_is_stale(load_calibration(calibration).sku_fingerprint, sku.model_dir,
                                          sku.schedule_override())
        except DataError as exc:
            problems.append(Problem(cal_key, str(exc)))
        else:
            if stale:
                problems.append(Problem(cal_key, f"{calibration} was fit on other weights or settings than "
                                        f"{sku.model_dir} and [{key}] hold now (retrained, its memory boost or "
                                        f"fine memory changed, or t1/t2/steps changed); run `inspector calibrate "
                                        f"--sku {name}` again"))
    if not engine_files:
        return problems
    try:
        read_manifest(sku.model_dir)
    except DataError as exc:
        return [*problems, Problem(f"{key}.model_dir", str(exc))]
    missing, fix = _engine_files_missing(sku.model_dir, engine)
    if missing:
        problems.append(Problem(f"{key}.model_dir", f"{sku.model_dir} lacks {', '.join(missing)} for engine.backend "
                                f"= {engine.backend!r}; {fix}"))
    if isinstance(engine, TensorRTSettings):
        problems += _plans_below_batch(sku.model_dir, engine)
    return problems


def _plans_below_batch(sku_dir: Path, engine: TensorRTSettings) -> list[Problem]:
    """engine.batch above the max batch a plan of the engine's precision was built for (as its sidecar records):
    every micro-batch and tile chunk above it would fail. Plans are grouped by the GPU model and TensorRT they
    were built for (a SKU may carry plans for several). Where TensorRT and the GPU are here, only the group this
    box loads counts; elsewhere (a config checked on another machine) it is fatal when no group takes the batch
    and a warning naming the groups that do not when another does. A plan without a readable sidecar is the
    backend's to report (it names the rebuild)."""
    from engines.runtime.tensorrt_backend import max_batch_error, plan_sidecar

    suffix = f".{engine.precision}.plan"
    groups: dict[str, dict[str, int]] = {}  # "<gpu>.<trt>" -> {plan below the batch: its max batch}
    for plan in sorted(sku_dir.glob(f"*{suffix}")):
        try:
            max_batch = int(json.loads(plan_sidecar(plan).read_text())["max_batch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        group = groups.setdefault(plan.name.removesuffix(suffix).split(".", 1)[-1], {})
        if max_batch < engine.batch:
            group[plan.name] = max_batch
    here = _plan_group_here(engine) if len(groups) > 1 else None
    if here in groups:
        groups = {here: groups[here]}
    below = {gpu: group for gpu, group in groups.items() if group}
    if not below:
        return []
    small = {name: batch for group in below.values() for name, batch in group.items()}
    first, *others = small
    plans = f"the TensorRT plans ({first}{f' and {len(others)} more' if others else ''})"
    message = max_batch_error(sku_dir, engine.precision, engine.batch, min(small.values()), plans)
    if len(below) == len(groups):
        return [Problem("engine.batch", message)]
    fits = ", ".join(sorted(set(groups) - set(below)))
    return [Problem("engine.batch", f"if this box's GPU is {' or '.join(sorted(below))}: {message} (the plans for "
                    f"{fits} take it)", fatal=False)]


def _plan_group_here(engine: TensorRTSettings) -> str | None:
    """The "<gpu>.<trt>" part of the plan names this box's TensorRT engine loads (tensorrt_backend.plan_tag), or
    None where TensorRT or the GPU cannot say."""
    from engines.runtime.tensorrt_backend import plan_tag
    from foundation.gpu import cuda_device, import_tensorrt

    try:
        trt = import_tensorrt()
        gpu = cuda_device(engine.device_id)
    except InspectorError:
        return None
    return plan_tag(gpu.name, trt.__version__, engine.precision).removesuffix(f".{engine.precision}")


def _calibration_is_stale(fingerprint: str, sku_dir: Path, schedule_override: dict[str, int]) -> bool:
    """Whether a calibration that recorded its SKU's maps fingerprint was fit on another state of sku_dir or
    another schedule override (unknowable, so not stale, when it recorded none or the weights, manifest or
    override cannot be read)."""
    if not fingerprint or not (sku_dir / WEIGHTS_FILE).is_file():
        return False
    try:
        return fingerprint != maps_fingerprint(sku_dir, schedule_override)
    except (DataError, ValueError, TypeError):  # a broken meta.json or override is reported where it is loaded
        return False


def _engine_files_missing(sku_dir: Path, engine: EngineSettings) -> tuple[list[str], str]:
    """The files of `sku_dir` the backend would load that are not there, and the command that makes them
    ("run: ..."); ONNX Runtime's are the graphs of its precision (X.onnx or X.int8.onnx, engines/precision.py)."""
    from engines.precision import graph_file, regenerate_hint
    from engines.runtime.staged import PART_NAMES

    if engine.backend == "torch":
        return ([] if (sku_dir / WEIGHTS_FILE).is_file() else [WEIGHTS_FILE]), f"run: inspector train --out {sku_dir}"
    if engine.backend == "tensorrt":
        missing = [f"{n}.*.{engine.precision}.plan" for n in PART_NAMES
                   if not any(sku_dir.glob(f"{n}.*.{engine.precision}.plan"))]
        return missing, f"run: inspector build --sku-dir {sku_dir} --precision {engine.precision}"
    graphs = [graph_file(sku_dir, n, engine.precision) for n in PART_NAMES]
    return [g.name for g in graphs if not g.is_file()], regenerate_hint(sku_dir, engine.precision)


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under path (0 when it does not exist yet)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
