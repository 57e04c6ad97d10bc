"""SKUs for daemon tests: a model trained by the project's own code (slow, once per session) and a random-init
exported SKU with thresholds fitted on its own outputs (fast; for lifecycle mechanics, not accuracy).

`trained_sku` builds the demo SKU (tiny preset, a few CPU minutes). Set INSPECTOR_TEST_WORKDIR to a folder
to keep (and reuse across sessions) the trained SKU there; `inspector demo --workdir DIR` builds exactly the
same recipe, so INSPECTOR_TEST_WORKDIR=var/demo reuses the SKU of `make demo`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from calibration.thresholds import fit_thresholds, save_calibration
from engines.runtime import OnnxRuntimeSettings, create_engine
from engines.sample_data import render_part
from engines.scoring import image_scores
from engines.sku import score_top_k
from inspector.demo import Recipe, build_demo_sku
from tests.fixtures_engines import exported_random_sku

TEST_RECIPE = Recipe()
_CACHE: dict[str, Path] = {}


def trained_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo SKU (trained, ONNX-exported, calibrated) built once per session; do not modify it."""
    if "trained" not in _CACHE:
        workdir = os.environ.get("INSPECTOR_TEST_WORKDIR")
        root = Path(workdir) if workdir else tmp_path_factory.mktemp("demo_sku")
        _CACHE["trained"] = build_demo_sku(root, TEST_RECIPE, threads=2, progress=False)
    return _CACHE["trained"]


def random_calibrated_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the random-init exported SKU with calibration.json fitted on brick parts."""
    if "random" not in _CACHE:
        sku_dir = Path(shutil.copytree(exported_random_sku(tmp_path_factory),
                                       tmp_path_factory.mktemp("random_cal") / "sku"))
        engine = create_engine(OnnxRuntimeSettings(threads=1), sku_dir)
        rng = np.random.default_rng(0)
        parts = np.stack([render_part("brick", engine.image_size, rng) for _ in range(9)])
        maps = engine.infer(parts)
        top_k = score_top_k(sku_dir)
        save_calibration(fit_thresholds(image_scores(maps, top_k=top_k), maps, 0.2, score_top_k=top_k),
                         sku_dir / "calibration.json")
        _CACHE["random"] = sku_dir
    return _CACHE["random"]
