"""The Verdict published for every frame, defect regions from an anomaly map, and the mask/PLC codecs.

Identity: frame ids restart at 1 on every daemon start, so every verdict and reject message also carries the
`run_id` of the daemon run that acquired the frame; (run_id, frame_id) names one frame for ever and is the key
consumers de-duplicate on (delivery is at least once: after an outage or a restart a message may repeat).

Run `python -m inspector.verdict` to regenerate docs/verdict.schema.json after changing the model.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "verdict.schema.json"


class Region(BaseModel):
    """One connected defect region in original frame pixels (bounding box, area, peak anomaly score)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    x: int
    y: int
    w: int
    h: int
    area_px: int
    peak_score: float


class Verdict(BaseModel):
    """The OK/NG decision for one acquired frame; exactly one per frame, fail-safe ones carry a reason."""

    # every number finite: a NaN or infinite score, threshold, time or latency raises ValidationError where the
    # verdict is built (the pipeline then publishes the frame's fail-safe) instead of going out as JSON null
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    frame_id: int = Field(description="per daemon run, from 1; (run_id, frame_id) identifies a frame")
    run_id: str = Field(description="the daemon run that acquired the frame (new at every start); the "
                        "de-duplication key is (run_id, frame_id)")
    t_acquired: float = Field(description="host time.time() when the frame was acquired")
    camera_ts: float | None = Field(None, description="camera timestamp in seconds (device clock) if any")
    sku: str
    ok: bool
    score: float | None = Field(None, description="image anomaly score; None when no inference ran")
    threshold: float | None = Field(None, description="image threshold the score was compared with")
    regions: list[Region] = Field(default_factory=list, description="defect regions, largest first")
    reason: str | None = Field(
        None,
        description='None for a normal decision, else e.g. "engine_error: ...", "deadline_missed", '
        '"queue_full", "corrupt_frame: ..."',
    )
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="stage latencies: queue, preprocess, infer, decide, total"
    )
    engine: str = Field(description="inference backend")
    line: str
    station: str
    schema_version: int = 2


def regions_from_mask(
    map_f32_hw: np.ndarray,
    pixel_threshold: float,
    min_area_px: int,
    scale_xy: tuple[float, float] = (1.0, 1.0),
    offset_xy: tuple[int, int] = (0, 0),
) -> list[Region]:
    """Connected regions (8-connectivity) of map > pixel_threshold, largest first, in frame pixels.

    min_area_px filters at map resolution (where calibration measured it); boxes and areas are mapped back
    to the frame as frame = map * scale_xy + offset_xy (offset = ROI origin).
    """
    above = (np.asarray(map_f32_hw) > pixel_threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    sx, sy = scale_xy
    ox, oy = offset_xy
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area_px:
            continue
        peak = float(map_f32_hw[labels == label].max())
        regions.append(
            Region(
                x=round(x * sx) + ox,
                y=round(y * sy) + oy,
                w=max(1, round(w * sx)),
                h=max(1, round(h * sy)),
                area_px=max(1, round(area * sx * sy)),
                peak_score=peak,
            )
        )
    regions.sort(key=lambda r: r.area_px, reverse=True)
    return regions


def encode_mask_png(mask_bool_hw: np.ndarray) -> bytes:
    """Binary mask -> 8-bit greyscale PNG (0 good, 255 defect) for the /mask topic."""
    ok, png = cv2.imencode(".png", np.asarray(mask_bool_hw, dtype=bool).astype(np.uint8) * 255)
    if not ok:
        raise ValueError("PNG encoding of the mask failed")
    return png.tobytes()


def decode_mask_png(png: bytes) -> np.ndarray:
    """Inverse of encode_mask_png: PNG bytes -> bool HxW mask."""
    image = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("not a PNG mask")
    return image > 127


def new_run_id() -> str:
    """A daemon run's id: UTC start time (sortable) and 32 random bits, e.g. "20261125T101503Z-3f9a1c0b"."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def reject_payload(verdict: Verdict) -> bytes:
    """Compact PLC signal for /reject: JSON {"frame_id", "run_id", "t_acquired", "reject": 1 (NG) | 0 (OK)}."""
    body = {"frame_id": verdict.frame_id, "run_id": verdict.run_id, "t_acquired": verdict.t_acquired,
            "reject": 0 if verdict.ok else 1}
    return json.dumps(body, separators=(",", ":")).encode()


def verdict_schema_json() -> str:
    """The Verdict JSON schema as committed in docs/verdict.schema.json."""
    return json.dumps(Verdict.model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Regenerate the committed JSON schema file for consumers of the /verdict topic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verdict_schema_json())
    return path


if __name__ == "__main__":
    print(write_schema())
