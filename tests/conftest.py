"""Shared test set-up: the session's SKUs (each built once per pytest run, shared read-only by every test that
needs one) and GPU-marked tests, which skip only where nvidia-smi sees no NVIDIA GPU: where it sees one, they run
and fail when the GPU stack (driver, CUDA torch, cuda-python, TensorRT) is broken, instead of hiding it.

`trained_sku` is the demo SKU trained by the project's own code with TEST_RECIPE. Set INSPECTOR_TEST_WORKDIR
to a folder to keep (and reuse across runs) the trained SKU there; `inspector demo --workdir DIR
--train-scale S` builds exactly the same recipe. Session fixtures are not subject to the per-test timeout
(timeout_func_only in pyproject.toml): the training time grows with the machine's load, a test's does not.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from inspector.broker import LocalBroker, start_local_broker
from tests.fixtures_engines import IMAGE_SIZE

# Tests share 2 CPU cores; one BLAS/torch thread per process keeps timings stable and runs predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The demo recipe with half the tiny preset's steps: the daemon's accuracy checks pass with a wide margin,
# and training stays well under a minute of CPU on an idle 2-core box.
TEST_RECIPE_SCALE = 0.5


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """Logging is process-wide: a test that runs a command's main() in-process (bench/daemon.py configures
    "warning") must not hide the info events later tests capture (a spool test failed only after it)."""
    saved, level = structlog.get_config(), logging.getLogger().level
    yield
    structlog.configure(**saved)
    logging.getLogger().setLevel(level)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A real mosquitto on a free loopback port, anonymous, no persistence; stopped after the test."""
    b = start_local_broker(tmp_path / "broker")
    yield b
    b.stop()


def nvidia_smi_sees_gpu() -> bool:
    """True when `nvidia-smi -L` runs and lists at least one GPU (the driver's view, independent of Python)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not nvidia_smi_sees_gpu():
        skip = pytest.mark.skip(reason="no NVIDIA GPU here (nvidia-smi is absent or lists none)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def exported_random_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init SKU (weights, meta.json, every .onnx) at IMAGE_SIZE; read-only, copy it to modify it."""
    from engines.runtime.benchmark import make_random_sku

    return make_random_sku(tmp_path_factory.mktemp("random_sku") / "sku", IMAGE_SIZE)


@pytest.fixture(scope="session")
def random_calibrated_sku(exported_random_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the random-init SKU with calibration.json fitted on brick parts: daemon mechanics, not accuracy."""
    from calibration.reference import stats_of_images
    from calibration.thresholds import fit_thresholds, save_calibration
    from engines.runtime import OnnxRuntimeSettings, create_engine
    from tdad.manifest import score_top_k
    from tdad.scoring import image_scores
    from tdad.training.sample_data import render_part

    sku_dir = Path(shutil.copytree(exported_random_sku, tmp_path_factory.mktemp("random_cal") / "sku"))
    engine = create_engine(OnnxRuntimeSettings(threads=1), sku_dir)
    rng = np.random.default_rng(0)
    images = np.stack([render_part("brick", engine.image_size, rng) for _ in range(9)])
    maps = engine.infer(images)
    top_k = score_top_k(sku_dir)
    save_calibration(fit_thresholds(image_scores(maps, top_k=top_k), maps, 0.2, score_top_k=top_k,
                                    good_image_stats=stats_of_images(images)), sku_dir / "calibration.json")
    return sku_dir


@pytest.fixture(scope="session")
def trained_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SKU (trained, ONNX-exported, calibrated), built once per run; read-only, copy it to modify it."""
    from inspector.demo import Recipe, build_demo_sku

    workdir = os.environ.get("INSPECTOR_TEST_WORKDIR")
    root = Path(workdir) if workdir else tmp_path_factory.mktemp("demo_sku")
    return build_demo_sku(root, Recipe(train_scale=TEST_RECIPE_SCALE), threads=2, progress=False)
