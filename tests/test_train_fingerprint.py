"""bench/train_fingerprint.py: the first segmenter batches' numbers as train_sku starts them, and the gap report
that tells a box's libraries (the CPU columns) from its device (the device columns)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tdad.training.sample_data import write_mvtec_tree
from tdad.training.train import PRESETS, TrainConfig
from tests.bench_scripts import load_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("train_fingerprint")


def test_fingerprint_is_reproducible_and_a_gap_is_named(script: ModuleType, tmp_path: Path) -> None:
    root = write_mvtec_tree(tmp_path / "data", "brick", n_train=6, n_test_good=1, n_test_bad=1, size=64)
    cfg = TrainConfig(data=root, out=tmp_path / "unused", dataset="mvtec", category="brick", reconstruction="none",
                      **(dict(PRESETS["small"]) | {"image_size": 64}))
    rows = script.fingerprint(cfg, script.Start.of(cfg), script.torch.device("cpu"), steps=2)
    assert rows == script.fingerprint(cfg, script.Start.of(cfg), script.torch.device("cpu"), steps=2)  # seeded
    for row in rows:
        assert 0 < row["mask_area"] < 1 and row["contrast"] > 0 and row["loss_cpu"] > 0
        assert row["loss_device"] == row["loss_cpu"]  # the device is the CPU here
        assert row["loss_device_bf16"] == pytest.approx(row["loss_cpu"], rel=script.TOLERANCE)
    run = {"steps": rows}
    assert script.gaps(run, run) == []
    other_batches = {"steps": [dict(r, loss_cpu=r["loss_cpu"] * 1.4) for r in rows]}
    assert script.gaps(run, other_batches)[0].startswith("loss_cpu step 0: ")
    other_device = {"steps": [dict(rows[0], loss_device_bf16=rows[0]["loss_cpu"] * 1.36)]}
    assert script.gaps(other_device, {"steps": rows[:1]}) == [
        f"loss_device_bf16 step 0: {rows[0]['loss_cpu'] * 1.36:.4f}, the CPU's {rows[0]['loss_cpu']:.4f}"]


def test_short_training_is_held_to_the_reference_and_the_device_to_the_cpu(script: ModuleType, tmp_path: Path) -> None:
    root = write_mvtec_tree(tmp_path / "data", "brick", n_train=6, n_test_good=1, n_test_bad=1, size=64)
    cfg = TrainConfig(data=root, out=tmp_path / "unused", dataset="mvtec", category="brick", reconstruction="none",
                      **(dict(PRESETS["small"]) | {"image_size": 64, "batch_size": 2}))
    start = script.Start.of(cfg)
    trained = script.train_ab(cfg, start, script.torch.device("cpu"), steps=3, held_out=2)
    assert [r["column"] for r in trained] == ["cpu fp32"]  # no device columns on a CPU-only run
    row = trained[0]
    assert row["memory_scale"] > 0 and row["held_out"] > 0 and row["last"] != row["first"]
    run = {"steps": [], "train": trained}
    assert script.gaps(run, run) == []
    drifted = {"steps": [], "train": [dict(row, held_out=row["held_out"] * 2)]}
    assert script.gaps(run, drifted) == [
        f"train cpu fp32 held_out: {row['held_out']:.4f} here, {row['held_out'] * 2:.4f} in the reference"]
    broken_device = {"steps": [], "train": [row, dict(row, column="device bf16", memory_scale=row["memory_scale"] * 3)]}
    assert script.gaps(broken_device, run) == [
        f"train device bf16 memory_scale: {row['memory_scale'] * 3:.4f}, the CPU's {row['memory_scale']:.4f}"]
    device_only = {"steps": [], "train": [dict(row, column="device fp32", held_out=row["held_out"] * 6)]}
    assert script.gaps(device_only, run) == [  # no CPU column here: held to the reference's
        f"train device fp32 held_out: {row['held_out'] * 6:.4f}, the CPU's {row['held_out']:.4f}"]
    assert script.train_ab(cfg, start, script.torch.device("cpu"), steps=1, held_out=1, cpu=False)[0]["column"] == \
        "cpu fp32"  # the CPU is the device here
