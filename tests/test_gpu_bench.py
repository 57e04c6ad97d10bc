"""The GPU session's bench scripts, run here on the CPU at tiny sizes (bench/gpu_check.sh all runs them on CUDA):
bench/gpu_profile.py's per-stage table and bench/train_speed.py's preset table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench_scripts import load_script


def test_the_profile_splits_a_frame_into_its_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = load_script("gpu_profile")
    out = tmp_path / "profile.json"
    args = ["--random-sku", str(tmp_path / "sku"), "--image-size", "64", "--memory", "200", "--fine-memory", "300",
            "--steps", "1+1", "--iters", "2", "--threads", "1", "--batch", "2", "--json", str(out)]
    assert profile.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["preprocess", "H2D", "encoder", "stage-1", "fusion", "stage-2", "decoder", "backbone",
                          "segmenter", "D2H", "other", "total"]
    for stage in ("encoder", "stage-1", "fusion", "stage-2", "decoder", "backbone", "segmenter"):
        assert rows[stage]["host_ms"] > 0, stage  # every range opened and closed where the model runs it
    parts = sum(row["host_ms"] for name, row in rows.items() if name != "total")
    assert parts == pytest.approx(rows["total"]["host_ms"], rel=1e-6)
    assert "segmenter (excl. backbone)" in capsys.readouterr().out
    assert profile.main([*args[:2], "--engine", "torch+compile=default"]) == 2  # fused stages cannot be split


def test_the_preset_table_times_each_phase_and_extrapolates_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    speed = load_script("train_speed")
    speed.main(["--preset", "tiny", "--steps", "1", "--threads", "1", "--variants", "fp32,fp32+channels_last",
                "--phases", "segmenter"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| variant | segmenter img/s | full schedule min |"
    rows = [line.split(" | ") for line in lines[3:]]
    assert [row[0] for row in rows] == ["| fp32", "| fp32+channels_last"]
    assert all(float(row[1]) > 0 and float(row[2].rstrip(" |")) > 0 for row in rows)


@pytest.mark.integration
def test_the_daemon_bench_runs_a_given_sku_on_a_given_engine(random_calibrated_sku: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    daemon = load_script("daemon")
    args = ["--workdir", str(tmp_path), "--sku-dir", str(random_calibrated_sku), "--part-size", "64", "--engine",
            "torch+preprocess_on_device", "--batches", "2", "--fps", "0", "--frames", "6", "--no-web", "--no-archive",
            "--threads", "1"]
    assert daemon.main(args) == 0
    out = capsys.readouterr().out
    assert f"engine: torch+preprocess_on_device, SKU {random_calibrated_sku}" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| 64x64 as one 64 px input | 2 |")]
    assert float(row.split(" | ")[3]) > 0  # throughput, frames/s
    assert not (tmp_path / "sku").exists()  # no demo SKU trained
