"""GenTL source against the real viky.cti producer shipped in the genicam wheel, plus buffer conversions."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import cv2
import genicam
import numpy as np
import pytest

from foundation.errors import ConfigError, DataError, InspectorError
from inspector.acquisition import open_source
from inspector.acquisition.gentl import PIXEL_FORMATS, GenTLSource, buffer_to_rgb
from inspector.config import GenTLCamera

VIKY = Path(genicam.__file__).parent / "viky.cti"


def viky(**kw: object) -> GenTLCamera:
    """Camera config for the viky producer (serials "0", "1", "2"; RGBa8 or Mono8, 400x400)."""
    fields: dict[str, object] = {"cti": VIKY, "timeout_s": 1.0, "reconnect_min_s": 0.05, "reconnect_max_s": 0.4}
    fields.update(kw)
    return GenTLCamera(**fields)


def test_bayer_rggb_red_stays_red() -> None:
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2] = 255  # R sites of an RG/GB pattern
    rgb = buffer_to_rgb(mosaic.reshape(-1), 8, 8, "BayerRG8")
    assert rgb.shape == (8, 8, 3) and tuple(rgb[4, 4]) == (255, 0, 0)


@pytest.mark.parametrize(
    ("fmt", "pixel"),
    [("Mono8", [7]), ("RGB8", [1, 2, 3]), ("BGR8", [3, 2, 1]), ("RGBa8", [1, 2, 3, 9]), ("BGRa8", [3, 2, 1, 9])],
)
def test_buffer_to_rgb_formats(fmt: str, pixel: list[int]) -> None:
    data = np.tile(np.array(pixel, np.uint8), 6 * 4)
    rgb = buffer_to_rgb(data, 6, 4, fmt)
    expected = (7, 7, 7) if fmt == "Mono8" else (1, 2, 3)
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8 and tuple(rgb[2, 3]) == expected
    assert not np.shares_memory(rgb, data)


def test_bayer_formats_all_known_to_opencv() -> None:
    for fmt in ("BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8"):
        assert buffer_to_rgb(np.zeros(16, np.uint8), 4, 4, fmt).shape == (4, 4, 3)
    assert PIXEL_FORMATS["BayerBG8"][1] == cv2.COLOR_BayerBGGR2RGB


def test_unsupported_pixel_format_names_it() -> None:
    with pytest.raises(DataError, match=r"Mono12p.*camera\.pixel_format"):
        buffer_to_rgb(np.zeros(32, np.uint8), 4, 4, "Mono12p")


def take(source: GenTLSource, n: int) -> list:
    """The next n frames of an open source."""
    frames = []
    for frame in source.frames():
        frames.append(frame)
        if len(frames) == n:
            break
    return frames


@pytest.mark.integration
@pytest.mark.parametrize("select", [{"serial": "1"}, {"index": 2}])
def test_viky_frames_by_serial_and_index(select: dict[str, object]) -> None:
    source = open_source(viky(**select))
    source.open()
    try:
        frames = take(source, 3)
        info = source.describe()
    finally:
        source.close()
    assert [f.id for f in frames] == [1, 2, 3]
    for frame in frames:
        assert frame.image is not None and frame.image.shape == (400, 400, 3) and frame.image.dtype == np.uint8
        assert frame.meta["pixel_format"] == "RGBa8"
    assert info["connected"] is True and info["reconnects"] == 0


@pytest.mark.integration
def test_viky_mono8_pixel_format_is_applied() -> None:
    source = open_source(viky(serial="0", pixel_format="Mono8"))
    source.open()
    try:
        (frame,) = take(source, 1)
    finally:
        source.close()
    assert frame.meta["pixel_format"] == "Mono8" and frame.image is not None
    assert np.array_equal(frame.image[..., 0], frame.image[..., 2])


def waiting_error(cfg: GenTLCamera) -> str:
    """open() a source whose camera is not there: it must not raise, and must say why it waits."""
    source = GenTLSource(cfg)
    source.open()
    try:
        info = source.describe()
    finally:
        source.close()
    assert info["state"] == "waiting" and info["connected"] is False
    return str(info["last_error"])


@pytest.mark.integration
def test_missing_cti_is_waited_for_and_names_the_fix(tmp_path: Path) -> None:
    error = waiting_error(viky(cti=tmp_path / "nope.cti"))
    assert re.search(r"camera\.cti = .*nope\.cti does not exist.*GenTL producer", error)


@pytest.mark.integration
def test_unknown_serial_is_waited_for_and_lists_the_cameras() -> None:
    assert re.search(r"camera\.serial = 'XYZ' not found.*\['0', '1', '2'\]", waiting_error(viky(serial="XYZ")))
    assert re.search(r"camera\.index = 7 but .* sees 3", waiting_error(viky(index=7)))


@pytest.mark.integration
def test_a_late_camera_clears_the_error_it_was_waiting_on_once_connected(tmp_path: Path) -> None:
    cti = tmp_path / "vendor" / "viky.cti"  # the producer is installed only after the start
    source = GenTLSource(viky(cti=cti, serial="0"))
    source.open()
    try:
        assert "viky.cti does not exist" in str(source.describe()["last_error"])
        cti.parent.mkdir()
        shutil.copy(VIKY, cti)
        first = next(source.frames())
        info = source.describe()
    finally:
        source.close()
    assert first.image is not None and info["state"] == "connected" and info["reconnects"] == 0
    assert info["last_error"] is None


@pytest.mark.integration
def test_a_pixel_format_the_camera_rejects_is_an_operator_error_at_open() -> None:
    with pytest.raises(ConfigError, match=r"camera\.pixel_format.*allowed: RGBa8, Mono8"):
        open_source(viky(pixel_format="Mono16")).open()


@pytest.mark.integration
def test_a_producer_removed_mid_run_is_named_as_such(tmp_path: Path) -> None:
    cti = Path(shutil.copy(VIKY, tmp_path / "viky.cti"))
    source = GenTLSource(viky(cti=cti, serial="0"))
    source.open()
    try:
        frames = source.frames()
        next(frames)
        cti.unlink()
        source._ia.destroy()  # the camera drops out, and its producer is gone too
        threading.Timer(1.0, source.stop).start()
        assert list(frames) == []
        info = source.describe()
    finally:
        source.close()
    assert info["state"] == "reconnecting" and "viky.cti does not exist" in info["last_error"]
    assert "another program" not in info["last_error"]


@pytest.mark.integration
def test_software_trigger_without_trigger_nodes_is_refused() -> None:
    with pytest.raises(InspectorError, match=r"camera\.trigger = 'software'.*free_run"):
        open_source(viky(trigger="software")).open()


@pytest.mark.integration
def test_camera_lost_under_the_source_reconnects() -> None:
    source = open_source(viky(serial="2"))
    assert isinstance(source, GenTLSource)
    source.open()
    try:
        frames = source.frames()
        first = next(frames)
        source._ia.destroy()  # the camera vanishes between two frames
        second = next(frames)
        source._harvester.reset()  # and the whole transport layer with it
        third = next(frames)
        info = source.describe()
    finally:
        source.close()
    assert (first.id, second.id, third.id) == (1, 2, 3)
    assert third.image is not None and third.image.shape == (400, 400, 3)
    assert info["connected"] is True and info["reconnects"] == 2 and info["last_error"] is None


@pytest.mark.integration
def test_stop_interrupts_reconnect_back_off() -> None:
    source = GenTLSource(viky(serial="0", reconnect_min_s=30.0, reconnect_max_s=60.0))
    source.open()
    frames = source.frames()
    next(frames)
    source._ia.destroy()
    threading.Timer(0.3, source.stop).start()
    start = time.monotonic()
    assert list(frames) == []
    assert time.monotonic() - start < 5.0
    assert source.describe()["connected"] is False
    source.close()
