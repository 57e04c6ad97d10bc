"""Folder, video and synthetic sources: ordering, looping, pacing, stop(), corrupt files and clear errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from foundation.errors import DataError
from inspector.acquisition import Frame, Source, open_source
from inspector.config import FolderCamera, SyntheticCamera, VideoCamera
from tests.fixtures_data import damaged_copies


def write_images(folder: Path, n: int) -> list[np.ndarray]:
    """n small distinct RGB PNGs named img_000.png ...; returns the RGB arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        rgb = np.zeros((24, 32, 3), np.uint8)
        rgb[..., 0] = 10 * i
        rgb[..., 2] = 200
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images.append(rgb)
    return images


def collect(source: Source, limit: int = 1000) -> list[Frame]:
    """open(), take up to `limit` frames, close()."""
    source.open()
    try:
        frames = []
        for frame in source.frames():
            frames.append(frame)
            if len(frames) >= limit:
                break
        return frames
    finally:
        source.close()


def test_folder_replays_sorted_rgb_with_ids(tmp_path: Path) -> None:
    images = write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored by the pattern")
    frames = collect(open_source(FolderCamera(path=tmp_path / "imgs")))
    assert [f.id for f in frames] == [1, 2, 3]
    for frame, rgb in zip(frames, images, strict=True):
        assert frame.image is not None and frame.image.dtype == np.uint8
        np.testing.assert_array_equal(frame.image, rgb)
        assert frame.meta["source"] == "folder" and frame.meta["path"].endswith(".png")
    assert frames[0].t_acquired <= frames[-1].t_acquired <= time.time()


def test_folder_corrupt_file_yields_frame_without_image(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    (tmp_path / "img_001.png").write_bytes(b"not a png")
    frames = collect(open_source(FolderCamera(path=tmp_path)))
    assert len(frames) == 2
    assert frames[1].image is None and "img_001.png" in frames[1].meta["error"]


def test_folder_truncated_or_damaged_files_yield_frames_without_image(tmp_path: Path) -> None:
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96))
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    png = cv2.imencode(".png", rgb)[1].tobytes()
    files = {"a_good.jpg": jpeg, "b_half.jpg": jpeg[: len(jpeg) // 2], "c_half.png": png[: len(png) // 2],
             "d_empty.png": b"", "e_noise.jpg": np.random.default_rng(1).bytes(3000),
             "f_flipped.jpg": jpeg[:400] + bytes(b ^ 0xFF for b in jpeg[400:420]) + jpeg[420:][: len(jpeg) // 3]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert cv2.imread(str(tmp_path / "b_half.jpg")) is not None, "OpenCV alone decodes half a JPEG (grey rest)"
    frames = collect(open_source(FolderCamera(path=tmp_path, pattern="*.*")))
    assert frames[0].image is not None and "error" not in frames[0].meta
    for frame, name in zip(frames[1:], list(files)[1:], strict=True):
        assert frame.image is None and name in frame.meta["error"], (name, frame.meta)
    assert "truncated" in frames[1].meta["error"]


def test_folder_files_the_decoder_had_to_repair_yield_frames_without_image(tmp_path: Path) -> None:
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8), (256, 192))
    jpeg, png = (cv2.imencode(ext, rgb)[1].tobytes() for ext in (".jpg", ".png"))
    (tmp_path / "a_clean.jpg").write_bytes(jpeg)
    damaged = damaged_copies(jpeg, png)
    for name, (data, _) in damaged.items():
        (tmp_path / f"b_{name}").write_bytes(data)
    frames = collect(open_source(FolderCamera(path=tmp_path, pattern="*.*")))
    clean = cv2.cvtColor(cv2.imread(str(tmp_path / "a_clean.jpg")), cv2.COLOR_BGR2RGB)
    assert frames[0].image is not None and np.array_equal(frames[0].image, clean), "same pixels as training's decode"
    for frame, (name, (_, said)) in zip(frames[1:], sorted(damaged.items()), strict=True):
        error = frame.meta.get("error", "")
        assert frame.image is None and name in error and said in error, (name, frame.meta)


def test_folder_loops_and_stop_ends_frames(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    source = open_source(FolderCamera(path=tmp_path, loop=True))
    source.open()
    seen = []
    for frame in source.frames():
        seen.append(frame)
        if frame.id == 5:
            source.stop()
    source.close()
    assert [f.id for f in seen] == [1, 2, 3, 4, 5]
    assert seen[0].meta["path"] == seen[2].meta["path"] == seen[4].meta["path"]


def test_folder_fps_paces_and_stop_interrupts_from_another_thread(tmp_path: Path) -> None:
    write_images(tmp_path, 2)
    source = open_source(FolderCamera(path=tmp_path, loop=True, fps=20.0))
    source.open()
    start = time.monotonic()
    threading.Timer(0.3, source.stop).start()
    count = sum(1 for _ in source.frames())
    elapsed = time.monotonic() - start
    source.close()
    assert 0.25 < elapsed < 1.5
    assert 3 <= count <= 9


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: FolderCamera(path=p / "missing"), "is not a folder"),
        (lambda p: FolderCamera(path=p, pattern="*.bmp"), "camera.pattern"),
        (lambda p: VideoCamera(path=p / "missing.avi"), "does not exist"),
    ],
)
def test_source_errors_name_the_key(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DataError, match="camera\\.") as info:
        open_source(make(tmp_path)).open()
    assert message in str(info.value)


def write_video(path: Path, n: int) -> None:
    """An MJPG AVI with n frames of rising grey levels."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
    writer.release()


def test_video_frames_and_loop(tmp_path: Path) -> None:
    path = tmp_path / "parts.avi"
    write_video(path, 4)
    frames = collect(open_source(VideoCamera(path=path)))
    assert [f.id for f in frames] == [1, 2, 3, 4]
    assert frames[0].image is not None and frames[0].image.shape == (48, 64, 3)
    levels = [int(f.image.mean()) for f in frames if f.image is not None]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 60
    looped = collect(open_source(VideoCamera(path=path, loop=True)), limit=10)
    assert len(looped) == 10 and abs(int(looped[4].image.mean()) - levels[0]) < 5


def packet_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each JPEG (SOI to EOI) inside an MJPG file."""
    starts = [i for i in range(len(data)) if data.startswith(b"\xff\xd8\xff", i)]
    return [(s, data.index(b"\xff\xd9", s) + 2) for s in starts]


def test_video_mjpg_frame_the_decoder_had_to_repair_yields_frame_without_image(tmp_path: Path) -> None:
    path = tmp_path / "parts.avi"
    write_video(path, 4)
    data = bytearray(path.read_bytes())
    start, end = packet_spans(bytes(data))[2]
    cut = start + (end - start) * 6 // 10
    data[cut:end] = bytes(end - cut)  # frame 3's last 40 % zeroed: FFmpeg's decode stopped the replay here
    path.write_bytes(data)
    frames = collect(open_source(VideoCamera(path=path)))
    assert [f.id for f in frames] == [1, 2, 3, 4]
    assert [f.image is None for f in frames] == [False, False, True, False]
    assert "parts.avi frame 3" in frames[2].meta["error"] and "JPEG" in frames[2].meta["error"]


def test_video_that_ends_before_its_frame_count_yields_a_failed_frame(tmp_path: Path) -> None:
    path = tmp_path / "cut.avi"
    write_video(path, 6)
    data = path.read_bytes()
    path.write_bytes(data[: packet_spans(data)[3][0] - 8])  # cut before frame 4's chunk; the header says 6
    frames = collect(open_source(VideoCamera(path=path, loop=True)), limit=8)
    assert [f.image is None for f in frames] == [False, False, False, True, False, False, False, True]
    assert "cut.avi" in frames[3].meta["error"] and "3 of its 6 frames" in frames[3].meta["error"]


def test_video_unopenable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.avi"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="cannot be opened as a video"):
        open_source(VideoCamera(path=path)).open()


def test_synthetic_is_deterministic_and_labels_defects() -> None:
    cfg = SyntheticCamera(width=64, height=48, fps=0.0, frames=30, defect_rate=0.3, seed=3)
    first, second = collect(open_source(cfg)), collect(open_source(cfg))
    assert [f.id for f in first] == list(range(1, 31))
    assert first[0].image is not None and first[0].image.shape == (48, 64, 3) and first[0].image.dtype == np.uint8
    flags = [f.meta["defect"] for f in first]
    assert flags == [f.meta["defect"] for f in second]
    assert 3 <= sum(flags) <= 18
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
    defect = next(f for f in first if f.meta["defect"])
    assert defect.meta["defect_mask"].shape == (48, 64) and defect.meta["defect_mask"].any()
    other = collect(open_source(cfg.model_copy(update={"seed": 4})))
    assert not np.array_equal(other[0].image, first[0].image)


def test_synthetic_rates_zero_and_one() -> None:
    clean = collect(open_source(SyntheticCamera(width=32, height=32, fps=0, frames=5, defect_rate=0.0)))
    broken = collect(open_source(SyntheticCamera(width=32, height=32, fps=0, frames=5, defect_rate=1.0)))
    assert not any(f.meta["defect"] for f in clean) and all(f.meta["defect"] for f in broken)


def test_describe_reports_connection() -> None:
    source = open_source(SyntheticCamera(width=32, height=32, fps=0, frames=2))
    source.open()
    list(source.frames())
    info = source.describe()
    assert info["connected"] is True and info["reconnects"] == 0 and info["frames"] == 2
    source.close()


def test_acquisition_does_not_import_torch() -> None:
    code = (
        "import sys, inspector.acquisition.folder, inspector.acquisition.video, inspector.acquisition.gentl, "
        "inspector.acquisition.synthetic, inspector.mqtt, inspector.spool, inspector.verdict, "
        "tdad.training.sample_data; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
