"""bench/baseline.py: the data README's PatchCore-style baseline, rebuilt from its description and scored with the
project's metrics on a test split."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tdad.training.sample_data import write_mvtec_tree
from tests.bench_scripts import BENCH, load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    module = load_script("baseline")
    module.torch.set_num_threads(1)
    return module


def test_a_remembered_part_scores_zero_and_painted_defects_rank_above_good_parts(script: ModuleType,
                                                                                 tmp_path: Path) -> None:
    root = write_mvtec_tree(tmp_path / "data", "brick", n_train=8, n_test_good=3, n_test_bad=4, size=64)
    base = root / "brick"
    # a test part identical to a training part: every one of its patches is in the (not subsampled) memory
    shutil.copy(sorted((base / "train" / "good").iterdir())[0], base / "test" / "good" / "copy.png")
    inference, scores = script.baseline(root, "brick", 64)
    paths = [r.path.name for r in script.open_dataset("mvtec", root, "brick", "test", 64).records]
    # zero up to the rounding of the matmul-form distance (|q|^2 - 2 q.m + |m|^2, then its square root)
    assert scores[paths.index("copy.png")] < 0.01 * np.median(scores)
    assert inference.maps.shape == (8, 64, 64) and inference.labels.sum() == 4
    assert np.allclose(scores, inference.maps.reshape(8, -1).max(1))  # the image score is the map's maximum
    assert scores[inference.labels].min() > scores[~inference.labels].max()


def test_the_command_prints_a_row_per_resolution(tmp_path: Path) -> None:
    root = write_mvtec_tree(tmp_path / "data", "brick", n_train=4, n_test_good=2, n_test_bad=2, size=64)
    out = subprocess.run([sys.executable, str(BENCH / "baseline.py"), "--root", str(root), "--category", "brick",
                          "--size", "32", "64", "--threads", "1"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("PatchCore-style baseline on brick")
    assert lines[2].split()[:2] == ["32", "px"] and lines[3].split()[:2] == ["64", "px"]
