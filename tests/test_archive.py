"""Archive: NG frames as image + heat map + JSON, OK sampling, oldest-first size cap, never blocking."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from inspector.archive import Archive, ArchiveItem, heatmap_overlay


def item(frame_id: int, ok: bool = False, size: int = 64, image: bool = True) -> ArchiveItem:
    rng = np.random.default_rng(frame_id)
    return ArchiveItem(
        sku="brick", frame_id=frame_id, t_acquired=1_700_000_000.0 + frame_id, ok=ok,
        verdict={"frame_id": frame_id, "ok": ok},
        image_u8_hwc=rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if image else None,
        map_f32_hw=rng.random((16, 16), dtype=np.float32),
        map_rect=(8, 8, 32, 32),
    )


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_ng_frame_writes_png_heatmap_and_json_under_sku_and_date(tmp_path: Path) -> None:
    archive = Archive(tmp_path, max_mb=10).start()
    assert archive.submit(item(7))
    archive.stop()
    written = files(tmp_path)
    assert [p.relative_to(tmp_path).parts[:2] for p in written] == [("brick", "2023-11-14")] * 3
    names = sorted(p.name for p in written)
    assert names[0].endswith("_7_ng.json") and names[1].endswith("_7_ng.png") and names[2].endswith("_7_ng_heat.png")
    assert json.loads(next(p for p in written if p.suffix == ".json").read_text()) == {"frame_id": 7, "ok": False}
    image = cv2.imread(str(next(p for p in written if p.name.endswith("_ng.png"))))
    assert image.shape == (64, 64, 3)
    assert archive.stats()["saved"] == 1


def test_heatmap_only_colours_the_roi() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    out = heatmap_overlay(image, np.ones((8, 8), np.float32), (10, 5, 20, 10))
    assert out.shape == (40, 60, 3)
    assert out[5:15, 10:30].any() and not out[:5].any() and not out[:, :10].any()


def test_ok_frames_are_sampled_at_ok_sample_rate() -> None:
    never = Archive(Path("unused"), max_mb=1, ok_sample_rate=0.0, seed=1)
    always = Archive(Path("unused"), max_mb=1, ok_sample_rate=1.0, seed=1)
    half = Archive(Path("unused"), max_mb=1, ok_sample_rate=0.5, seed=1)
    assert never.wants(ok=False) and not never.wants(ok=True) and always.wants(ok=True)
    assert 400 < sum(half.wants(ok=True) for _ in range(1000)) < 600


def test_size_cap_deletes_oldest_first_including_files_from_earlier_runs(tmp_path: Path) -> None:
    old = tmp_path / "brick" / "2020-01-01"
    old.mkdir(parents=True)
    (old / "old.bin").write_bytes(b"x" * 200_000)
    archive = Archive(tmp_path, max_mb=0.25).start()
    for i in range(1, 11):
        archive.submit(item(i, size=96))
        time.sleep(0.01)
    archive.stop()
    remaining = files(tmp_path)
    assert not old.exists()  # oldest file (and its emptied folder) went first
    assert sum(p.stat().st_size for p in remaining) <= 0.25 * 1024 * 1024
    assert any("_10_ng" in p.name for p in remaining)
    assert archive.stats()["deleted"] >= 1


def test_full_queue_skips_archiving_without_blocking(tmp_path: Path) -> None:
    archive = Archive(tmp_path, max_mb=10, queue_depth=1)  # not started: nothing drains the queue
    assert archive.submit(item(1))
    t0 = time.perf_counter()
    assert not archive.submit(item(2))
    assert time.perf_counter() - t0 < 0.05 and archive.stats()["skipped"] == 1


def test_fail_safe_frame_without_image_still_writes_the_verdict(tmp_path: Path) -> None:
    archive = Archive(tmp_path, max_mb=10).start()
    archive.submit(item(3, image=False))
    archive.stop()
    assert [p.suffix for p in files(tmp_path)] == [".json"]


def test_recent_ng_lists_the_newest_ng_parts_still_on_disk_including_earlier_runs(tmp_path: Path) -> None:
    first = Archive(tmp_path, max_mb=10).start()
    for frame_id in (1, 2):
        assert first.submit(item(frame_id))
    first.stop()
    archive = Archive(tmp_path, max_mb=10, ok_sample_rate=1.0).start()  # a restart indexes what is there
    for frame_id, ok in ((3, True), (4, False)):
        assert archive.submit(item(frame_id, ok=ok))
    archive.stop()
    assert [p.name.split("_")[1] for p in archive.recent_ng(10)] == ["4", "2", "1"]
    assert [p.name.split("_")[1] for p in archive.recent_ng(2)] == ["4", "2"]
    archive.recent_ng(1)[0].unlink()  # deleted by the size cap or by hand: no longer listed
    assert [p.name.split("_")[1] for p in archive.recent_ng(10)] == ["2", "1"]
