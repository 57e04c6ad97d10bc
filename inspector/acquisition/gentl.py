"""GenICam/GenTL industrial cameras through harvesters: configure, fetch, convert to RGB, survive drop-outs.

Trigger modes: `free_run` streams at the camera's own rate; `software` fires TriggerSoftware once per frame
pulled from frames() (the consumer sets the pace); `hardware` arms TriggerMode=On on FrameStart with
TriggerSource=Line0 (wire the part sensor there) and treats fetch timeouts as an idle line, not a fault.

A camera that is not there (producer file missing, camera not found, cannot be opened) is waited for with
back-off, at start-up exactly as after a drop-out mid-run: open() returns and describe() says "waiting"
until it appears, so a late-booting camera never fails the service. A camera that is there but rejects the
configuration (pixel format, trigger, exposure) is an operator error at open().
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from foundation.errors import ConfigError, DataError, InspectorError
from foundation.log import get_logger
from inspector.acquisition.base import Frame, PacedSource
from inspector.config import GenTLCamera

log = get_logger(__name__)

# PFNC pixel format -> (channels in the buffer, OpenCV conversion to RGB or None when already RGB)
PIXEL_FORMATS: dict[str, tuple[int, int | None]] = {
    "Mono8": (1, cv2.COLOR_GRAY2RGB),
    "RGB8": (3, None),
    "RGB8Packed": (3, None),
    "BGR8": (3, cv2.COLOR_BGR2RGB),
    "BGR8Packed": (3, cv2.COLOR_BGR2RGB),
    "RGBa8": (4, cv2.COLOR_RGBA2RGB),
    "RGBA8Packed": (4, cv2.COLOR_RGBA2RGB),
    "BGRa8": (4, cv2.COLOR_BGRA2RGB),
    "BGRA8Packed": (4, cv2.COLOR_BGRA2RGB),
    "BayerRG8": (1, cv2.COLOR_BayerRGGB2RGB),
    "BayerGR8": (1, cv2.COLOR_BayerGRBG2RGB),
    "BayerGB8": (1, cv2.COLOR_BayerGBRG2RGB),
    "BayerBG8": (1, cv2.COLOR_BayerBGGR2RGB),
}

# consecutive fetch timeouts of a free-running or software-triggered camera that count as a drop-out
MAX_TIMEOUTS = 3


class CameraUnavailable(InspectorError):
    """The camera or its GenTL producer cannot be reached now; it may still boot, be plugged in or installed."""


def buffer_to_rgb(data_u8: np.ndarray, width: int, height: int, pixel_format: str) -> np.ndarray:
    """Convert a raw 8-bit camera buffer to a new uint8 HxWx3 RGB array (never a view of the buffer)."""
    if pixel_format not in PIXEL_FORMATS:
        raise DataError(
            f"pixel format {pixel_format!r} is not supported; set camera.pixel_format to one of "
            f"{', '.join(PIXEL_FORMATS)}"
        )
    channels, code = PIXEL_FORMATS[pixel_format]
    need = width * height * channels
    flat = np.asarray(data_u8, dtype=np.uint8).reshape(-1)
    if flat.size < need:
        raise DataError(f"camera buffer holds {flat.size} bytes, {pixel_format} {width}x{height} needs {need}")
    image = flat[:need].reshape((height, width, channels) if channels > 1 else (height, width))
    return image.copy() if code is None else cv2.cvtColor(image, code)


class GenTLSource(PacedSource):
    """One GenTL camera selected by serial number or index; reconnects with back-off when it drops out."""

    def __init__(self, cfg: GenTLCamera) -> None:
        super().__init__(0.0)
        self._cfg = cfg
        self._harvester: Any = None
        self._ia: Any = None
        self._pixel_format: str | None = None
        self._reconnects = 0
        self._ever_connected = False
        self._last_error: str | None = None

    def open(self) -> None:
        """Connect and start streaming; a camera that is not there yet is waited for by frames() (back-off)."""
        try:
            self._connect()
        except CameraUnavailable as exc:
            self._last_error = str(exc)
            log.warning("camera_waiting", error=self._last_error, retry_in_s=self._cfg.reconnect_min_s)

    def _connect(self) -> None:
        """Create a harvester and an image acquirer for the configured camera; start acquisition."""
        from harvesters.core import Harvester

        cfg = self._cfg
        if not Path(cfg.cti).is_file():
            raise CameraUnavailable(
                f"camera.cti = {cfg.cti} does not exist (the GenTL producer is not installed or was removed); "
                "install the camera vendor's GenTL producer and point camera.cti at its .cti file"
            )
        harvester = Harvester()
        try:
            harvester.add_file(str(cfg.cti), check_existence=True, check_validity=True)
            harvester.update()
            devices = harvester.device_info_list
            if cfg.serial is not None:
                serials = [d.serial_number for d in devices]
                if cfg.serial not in serials:
                    raise CameraUnavailable(
                        f"camera.serial = {cfg.serial!r} not found through {cfg.cti}; cameras seen: "
                        f"{serials or 'none'}; fix camera.serial or check the camera's power and cable"
                    )
                ia = harvester.create({"serial_number": cfg.serial})
            else:
                if not 0 <= cfg.index < len(devices):
                    raise CameraUnavailable(
                        f"camera.index = {cfg.index} but {cfg.cti} sees {len(devices)} camera(s); "
                        "fix camera.index or set camera.serial"
                    )
                ia = harvester.create(cfg.index)
            try:
                self._configure(ia.remote_device.node_map)
                ia.start()
            except BaseException:
                ia.destroy()
                raise
        except InspectorError:
            harvester.reset()
            raise
        except Exception as exc:
            harvester.reset()
            raise CameraUnavailable(
                f"camera via camera.cti = {cfg.cti} cannot be opened ({type(exc).__name__}: {exc}); check the "
                "camera's power and cable, and that no other program has it open"
            ) from exc
        self._harvester, self._ia = harvester, ia
        self._ever_connected = True
        self._last_error = None  # what kept it away is over: the status must not show it for a connected camera
        log.info("camera_connected", cti=str(cfg.cti), serial=cfg.serial, pixel_format=self._pixel_format)

    def _configure(self, node_map: Any) -> None:
        """Apply pixel format, exposure, gain and trigger mode where configured and the camera has the node."""
        cfg = self._cfg
        if cfg.pixel_format is not None:
            self._set_node(node_map, "PixelFormat", cfg.pixel_format, "camera.pixel_format")
        self._pixel_format = str(node_map.PixelFormat.value) if node_map.has_node("PixelFormat") else "Mono8"
        if self._pixel_format not in PIXEL_FORMATS:
            raise ConfigError(
                f"the camera streams {self._pixel_format!r}, which is not supported; set camera.pixel_format "
                f"to one of {', '.join(PIXEL_FORMATS)}"
            )
        if cfg.exposure_us is not None:
            self._set_node(node_map, "ExposureTime", float(cfg.exposure_us), "camera.exposure_us")
        if cfg.gain_db is not None:
            self._set_node(node_map, "Gain", float(cfg.gain_db), "camera.gain_db")
        if cfg.trigger == "free_run":
            if node_map.has_node("TriggerMode"):
                self._set_node(node_map, "TriggerMode", "Off", "camera.trigger")
            return
        if not node_map.has_node("TriggerMode"):
            raise ConfigError(f"camera.trigger = {cfg.trigger!r} but the camera has no TriggerMode; use free_run")
        if node_map.has_node("TriggerSelector"):
            self._set_node(node_map, "TriggerSelector", "FrameStart", "camera.trigger")
        self._set_node(node_map, "TriggerMode", "On", "camera.trigger")
        source = "Software" if cfg.trigger == "software" else "Line0"
        self._set_node(node_map, "TriggerSource", source, "camera.trigger")

    @staticmethod
    def _set_node(node_map: Any, name: str, value: Any, key: str) -> None:
        """Write one GenICam node; a missing node is logged and skipped, a rejected value names the key."""
        if not node_map.has_node(name):
            log.warning("camera_node_missing", node=name, key=key)
            return
        node = node_map.get_node(name)
        try:
            node.value = value
        except Exception as exc:
            allowed = getattr(node, "symbolics", None)
            raise ConfigError(
                f"{key}: the camera rejects {name} = {value!r} ({exc})"
                + (f"; allowed: {', '.join(allowed)}" if allowed else "; pick a value in the camera's range")
            ) from exc

    def frames(self) -> Iterator[Frame]:
        """Yield frames until stop(); drop-outs close the camera and reconnect with exponential back-off."""
        self._start_run()
        timeouts = 0
        while not self._stop.is_set():
            if self._ia is None and not self._reconnect():
                return
            try:
                raw = self._fetch()
            except Exception as exc:
                if type(exc).__name__ == "TimeoutException":
                    timeouts += 1
                    if self._cfg.trigger == "hardware" or timeouts < MAX_TIMEOUTS:
                        continue
                    exc = TimeoutError(f"{timeouts} fetches timed out after {self._cfg.timeout_s} s each")
                self._drop(exc)
                timeouts = 0
                continue
            timeouts = 0
            yield self._to_frame(*raw)

    def _fetch(self) -> tuple[np.ndarray, int, int, str, float | None]:
        """Fetch one buffer and copy its pixels out before the buffer goes back to the producer."""
        if self._cfg.trigger == "software":
            self._ia.remote_device.node_map.TriggerSoftware.execute()
        with self._ia.fetch(timeout=self._cfg.timeout_s) as buffer:
            component = buffer.payload.components[0]
            data = np.array(component.data, dtype=np.uint8, copy=True)
            try:
                stamp_ns = buffer.timestamp_ns
            except Exception:
                stamp_ns = 0
            return data, component.width, component.height, component.data_format, stamp_ns / 1e9 or None

    def _to_frame(self, data: np.ndarray, width: int, height: int, fmt: str, camera_ts: float | None) -> Frame:
        """Convert a copied buffer into a Frame; a conversion failure gives image=None with the reason."""
        meta: dict[str, Any] = {"source": "gentl", "pixel_format": fmt}
        if camera_ts is not None:
            meta["camera_ts"] = camera_ts
        image: np.ndarray | None
        try:
            image = buffer_to_rgb(data, width, height, fmt)
        except Exception as exc:  # DataError, or OpenCV/numpy refusing a malformed buffer
            image, meta["error"] = None, f"{type(exc).__name__}: {exc}"
        return Frame(self._next_id(), time.time(), image, meta)

    def _drop(self, exc: BaseException) -> None:
        """Record a drop-out and release the camera so that the next frames() pass reconnects."""
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning("camera_lost", error=self._last_error, reconnects=self._reconnects)
        self._release()

    def _reconnect(self) -> bool:
        """Retry _connect with back-off from reconnect_min_s to reconnect_max_s; False once stop() is called."""
        delay = self._cfg.reconnect_min_s
        first = not self._ever_connected
        while not self._stop.wait(delay):
            try:
                self._connect()
            except Exception as exc:
                self._last_error = str(exc) if isinstance(exc, InspectorError) else f"{type(exc).__name__}: {exc}"
                delay = min(delay * 2, self._cfg.reconnect_max_s)
                log.warning("camera_waiting" if first else "camera_reconnect_failed", error=self._last_error,
                            retry_in_s=delay)
                continue
            if not first:
                self._reconnects += 1
                log.info("camera_reconnected", reconnects=self._reconnects)
            return True
        return False

    def _release(self) -> None:
        """Stop and destroy the acquirer and reset the harvester, ignoring errors from a vanished device."""
        ia, harvester = self._ia, self._harvester
        self._ia = self._harvester = None
        for action in (getattr(ia, "stop", None), getattr(ia, "destroy", None), getattr(harvester, "reset", None)):
            if action is None:
                continue
            try:
                action()
            except Exception as exc:
                log.debug("camera_release_error", error=str(exc))

    def close(self) -> None:
        """Stop streaming and release the camera and the producer."""
        self.stop()
        self._release()

    def describe(self) -> dict[str, Any]:
        """Connection state, reconnect count and the camera selection for the status topic."""
        return {
            "type": "gentl",
            "cti": str(self._cfg.cti),
            "serial": self._cfg.serial,
            "index": self._cfg.index,
            "pixel_format": self._pixel_format,
            "trigger": self._cfg.trigger,
            "connected": self._ia is not None,
            "state": "connected" if self._ia is not None else "reconnecting" if self._ever_connected else "waiting",
            "reconnects": self._reconnects,
            "frames": self.frames_produced,
            "last_error": self._last_error,
        }
