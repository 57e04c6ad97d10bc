"""Pre-flight (`inspector config check`, `inspector run` start-up): every file and directory the config names,
each missing or wrong one reported with its fix; real files, a real SKU saved by the project's own code."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import genicam
import numpy as np
import pytest

from calibration.thresholds import save_calibration
from engines.runtime.benchmark import make_random_sku
from engines.runtime.staged import PART_NAMES, UNROLLED_NAME
from inspector.cli import main
from inspector.config import load_config
from inspector.preflight import Problem, check
from tdad.manifest import maps_fingerprint, read_manifest, write_manifest
from tests.fixtures_data import make_good_folder
from tests.small_fs import small_fs
from tests.test_decider import make_calibration

REPO = Path(__file__).resolve().parents[1]
VIKY = Path(genicam.__file__).parent / "viky.cti"


@pytest.fixture(scope="module")
def sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved (not exported) random-init SKU with calibration.json: complete for engine.backend = torch."""
    sku_dir = make_random_sku(tmp_path_factory.mktemp("preflight") / "sku", image_size=64, export=False)
    save_calibration(make_calibration(), sku_dir / "calibration.json")
    return sku_dir


def station(tmp_path: Path, sku_dir: Path, *, camera: str | None = None, mqtt: str = "", backend: str = "torch",
            engine: str = "", extra: str = "") -> Path:
    """A complete station config under tmp_path (folder camera with one image, password file, spool, archive)."""
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    cv2.imwrite(str(frames / "0001.png"), np.zeros((64, 64, 3), np.uint8))
    password = tmp_path / "station.password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    path = tmp_path / "station.toml"
    path.write_text(f"""
active_sku = "part"
[camera]
{camera or f'type = "folder"{chr(10)}path = "{frames}"'}
[mqtt]
username = "station1"
password_file = "{password}"
spool_dir = "var/spool"
spool_max_mb = 1
{mqtt}
[engine]
backend = "{backend}"
{engine}
[archive]
dir = "var/archive"
max_mb = 1
[skus.part]
model_dir = "{sku_dir}"
{extra}
""")
    return path


def problems(path: Path) -> list[Problem]:
    return check(load_config(path))


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inspector.cli", "config", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_a_complete_station_passes_and_config_check_prints_it(tmp_path: Path, sku: Path) -> None:
    path = station(tmp_path, sku)
    assert problems(path) == []
    result = run_check(path)
    assert result.returncode == 0, result.stderr
    assert '"active_sku": "part"' in result.stdout and "s3cret" not in result.stdout
    assert "is valid" in result.stderr


def test_each_missing_file_is_one_problem_with_its_fix(tmp_path: Path, sku: Path) -> None:
    sku_copy = Path(shutil.copytree(sku, tmp_path / "sku"))
    broken = tmp_path / "broken"  # calibrated, but no model
    broken.mkdir()
    (sku_copy / "calibration.json").rename(broken / "calibration.json")
    path = station(tmp_path, sku_copy, camera=f'type = "gentl"\ncti = "{tmp_path / "vendor" / "producer.cti"}"',
                   mqtt=f'tls_ca = "{tmp_path / "ca.crt"}"',
                   extra=f'[skus.gone]\nmodel_dir = "{tmp_path / "gone"}"\n[skus.broken]\nmodel_dir = "{broken}"\n')
    (tmp_path / "station.password").chmod(0o644)
    (tmp_path / "var").write_text("a file where the spool and archive folders should be")
    listed = problems(path)
    found = {(p.key, p.fatal): p.message for p in reversed(listed)}  # the first problem of each key
    expected = {
        ("camera.cti", False): r"producer\.cti does not exist; install the camera vendor's GenTL producer",
        ("mqtt.password_file", True): r"world-readable .*chmod 640",
        ("mqtt.tls_ca", True): r"ca\.crt does not exist; fix the path",
        ("mqtt.spool_dir", True): r"var/spool cannot be a directory: .*var is a file; fix the path",
        ("archive.dir", True): r"var/archive cannot be a directory",
        ("skus.part.model_dir", True): r"^skus\.part\.thresholds_file is not set and its default .*/calibration\.json "
                                       r"does not exist: no calibration for SKU 'part'; run `inspector calibrate "
                                       r"--sku part` \(it writes there\) or set skus\.part\.thresholds_file$",
        ("skus.gone.model_dir", True): r"gone does not exist; train the SKU \(inspector train --sku gone\)",
        ("skus.broken.model_dir", True): r"meta\.json: missing; train the SKU",
    }
    assert set(found) >= set(expected), sorted(found)
    for key, pattern in expected.items():
        assert re.search(pattern, found[key]), (key, found[key])
    assert "calibrat" not in found[("skus.gone.model_dir", True)]

    result = run_check(path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines) and len(lines) == len(listed) + 1


def test_a_missing_thresholds_file_is_one_line_naming_its_key_value_and_fix(tmp_path: Path, sku: Path) -> None:
    missing = tmp_path / "thresholds" / "part.json"
    path = station(tmp_path, sku, extra=f'thresholds_file = "{missing}"')
    (problem,) = problems(path)
    assert problem.key == "skus.part.thresholds_file"
    assert problem.message == (f"skus.part.thresholds_file = {missing} does not exist: no calibration for SKU "
                               "'part'; run `inspector calibrate --sku part` (it writes there) or fix the path")
    result = run_check(path)
    assert result.returncode == 2 and f"error: {problem.message}" in result.stderr.splitlines()


def test_an_sku_without_its_engine_files_names_the_command_that_makes_them(tmp_path: Path, sku: Path) -> None:
    found = problems(station(tmp_path, sku, backend="onnxruntime"))
    (problem,) = found
    assert problem.key == "skus.part.model_dir" and "encoder.onnx" in problem.message
    assert f"run: inspector export --sku-dir {sku}" in problem.message
    (int8,) = problems(station(tmp_path, sku, backend="onnxruntime", engine='precision = "int8"'))
    assert "encoder.int8.onnx" in int8.message
    assert f"run: inspector export --sku-dir {sku} --int8 --calib DIR" in int8.message


def test_an_engine_batch_above_the_plans_max_batch_names_the_build_that_fits(tmp_path: Path, sku: Path) -> None:
    sku_copy = Path(shutil.copytree(sku, tmp_path / "sku"))
    for name in (*PART_NAMES, UNROLLED_NAME):  # plans as inspector build leaves them, the segmenter's for batch 4
        plan = sku_copy / f"{name}.nvidia-a2.trt10.8.0.43.fp16.plan"
        plan.write_bytes(b"plan")
        plan.with_suffix(".json").write_text(json.dumps({"max_batch": 4 if name == "segmenter" else 8}))
    assert problems(station(tmp_path, sku_copy, backend="tensorrt", engine="batch = 4")) == []
    (problem,) = problems(station(tmp_path, sku_copy, backend="tensorrt", engine="batch = 8"))
    assert problem.key == "engine.batch" and problem.fatal
    assert problem.message == (
        "engine.batch = 8, but the TensorRT plans (segmenter.nvidia-a2.trt10.8.0.43.fp16.plan) take at most 4 frames "
        "per call (engine.batch is the daemon's micro-batch and a tiled SKU's tile chunk); run: inspector build "
        f"--sku-dir {sku_copy} --precision fp16 --max-batch 8, or lower engine.batch")
    for name in (*PART_NAMES, UNROLLED_NAME):  # the same SKU also carries plans for another GPU, built for batch 8
        plan = sku_copy / f"{name}.nvidia-h100-80gb-hbm3.trt10.8.0.43.fp16.plan"
        plan.write_bytes(b"plan")
        plan.with_suffix(".json").write_text(json.dumps({"max_batch": 8}))
    (problem,) = problems(station(tmp_path, sku_copy, backend="tensorrt", engine="batch = 8"))
    assert problem.key == "engine.batch" and not problem.fatal  # which GPU this box has is the engine's to know
    assert problem.message.startswith("if this box's GPU is nvidia-a2.trt10.8.0.43: engine.batch = 8, but the ")
    assert problem.message.endswith("or lower engine.batch (the plans for nvidia-h100-80gb-hbm3.trt10.8.0.43 take it)")


def test_folder_camera_and_secret_readability(tmp_path: Path, sku: Path) -> None:
    found = problems(station(tmp_path, sku, camera=f'type = "folder"\npath = "{tmp_path / "nope"}"'))
    assert [(p.key, p.fatal) for p in found] == [("camera.path", True)]
    assert "is not a folder; point it at a folder of images" in found[0].message
    gentl = problems(station(tmp_path, sku, camera=f'type = "gentl"\ncti = "{VIKY}"'))
    assert gentl == []


def test_caps_beyond_the_free_space_are_a_warning_run_rides_out(tmp_path: Path, sku: Path) -> None:
    with small_fs(tmp_path / "small", 256) as small:
        path = station(tmp_path, sku, mqtt="")
        text = path.read_text().replace('"var/spool"', f'"{small / "spool"}"').replace('"var/archive"',
                                                                                        f'"{small / "archive"}"')
        path.write_text(text)
        found = problems(path)
    assert [(p.key, p.fatal) for p in found] == [("mqtt.spool_dir", False)]
    assert "mqtt.spool_dir cap (1 MB) + archive.dir cap (1 MB) exceed" in found[0].message
    assert "oldest OK ones are dropped first" in found[0].message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a read-only filesystem")
def test_an_unwritable_spool_dir(tmp_path: Path, sku: Path) -> None:
    readonly = tmp_path / "ro"
    with small_fs(readonly, 64):
        subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
        path = station(tmp_path, sku)
        path.write_text(path.read_text().replace('"var/spool"', f'"{readonly / "spool"}"'))
        found = problems(path)
    assert [(p.key, p.fatal) for p in found] == [("mqtt.spool_dir", True)]
    assert "is not writable by root (it would be created in" in found[0].message


def test_the_station_page_token_is_checked_like_the_broker_password(tmp_path: Path, sku: Path) -> None:
    token = tmp_path / "web.token"
    path = station(tmp_path, sku, extra=f'[web]\nenabled = true\ntoken_file = "{token}"\n')
    token.write_text("a-long-enough-control-token\n")
    token.chmod(0o644)
    assert [(p.key, "chmod 640" in p.message) for p in problems(path)] == [("web.token_file", True)]
    token.chmod(0o600)
    assert problems(path) == []
    token.write_text("short\n")
    assert ["at least 16" in p.message for p in problems(path)] == [True]


def test_a_calibration_fit_on_another_state_of_the_sku_is_refused(tmp_path: Path, sku: Path) -> None:
    """Thresholds carry the fingerprint of the maps they were fit on: a memory boost change (or a retraining)
    makes them stale, named with the command that refits them; one that recorded none is not judged."""
    sku_copy = Path(shutil.copytree(sku, tmp_path / "sku"))
    save_calibration(make_calibration(sku_fingerprint=maps_fingerprint(sku_copy)), sku_copy / "calibration.json")
    path = station(tmp_path, sku_copy)
    assert problems(path) == []
    manifest = read_manifest(sku_copy)
    boosted = dataclasses.replace(manifest.model, memory_boost=8.0)  # as train --resume --memory-boost 8
    write_manifest(sku_copy, manifest.model_copy(update={"model": boosted}))
    (stale,) = problems(path)
    assert stale.key == "skus.part.model_dir" and stale.fatal
    assert "was fit on other weights or settings" in stale.message
    assert "run `inspector calibrate --sku part` again" in stale.message
    save_calibration(make_calibration(), sku_copy / "calibration.json")  # recorded before fingerprints: accepted
    assert problems(path) == []


def test_a_calibration_fit_on_another_schedule_override_is_refused(tmp_path: Path, sku: Path) -> None:
    """The station's [skus.*] t1/t2/steps change the maps as a retraining does: thresholds fit without the
    override are refused once it differs from the trained schedule, and accepted again when refit with it."""
    save_calibration(make_calibration(sku_fingerprint=maps_fingerprint(sku)), tmp_path / "calibration.json")
    trained_t2 = read_manifest(sku).schedule.t2
    same = station(tmp_path, sku, extra=f'thresholds_file = "{tmp_path / "calibration.json"}"\nt2 = {trained_t2}')
    assert problems(same) == []  # the schedule that runs is hashed, not how it was written
    other = station(tmp_path, sku, extra=f'thresholds_file = "{tmp_path / "calibration.json"}"\nt2 = {trained_t2 - 1}')
    (stale,) = problems(other)
    assert "t1/t2/steps changed" in stale.message and "inspector calibrate --sku part" in stale.message
    good = make_good_folder(tmp_path / "good", n=6, size=64)
    assert main(["calibrate", "--config", str(other), "--sku", "part", "--good", str(good), "--frr", "0.2",
                 "--threads", "1"]) == 0  # runs the override and records it
    assert problems(other) == []
