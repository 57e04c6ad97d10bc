"""Verdict model, defect regions from anomaly maps, mask PNG codec, PLC payload and the committed schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from inspector.verdict import (
    SCHEMA_PATH,
    Region,
    Verdict,
    decode_mask_png,
    encode_mask_png,
    new_run_id,
    regions_from_mask,
    reject_payload,
    verdict_schema_json,
    write_schema,
)


def make_verdict(frame_id: int = 7, ok: bool = False, **kw: object) -> Verdict:
    """A filled-in verdict for tests."""
    fields: dict[str, object] = {
        "frame_id": frame_id,
        "run_id": "20231114T221320Z-0a1b2c3d",
        "t_acquired": 1_700_000_000.25,
        "sku": "brick",
        "ok": ok,
        "score": 0.8,
        "threshold": 0.5,
        "regions": [] if ok else [Region(x=1, y=2, w=3, h=4, area_px=10, peak_score=0.9)],
        "latency_ms": {"queue": 0.1, "preprocess": 1.0, "infer": 20.0, "decide": 0.5, "total": 21.6},
        "engine": "onnxruntime",
        "line": "line1",
        "station": "station1",
    }
    fields.update(kw)
    return Verdict(**fields)


def test_verdict_json_round_trip() -> None:
    verdict = make_verdict(camera_ts=12.5, reason=None)
    again = Verdict.model_validate_json(verdict.model_dump_json())
    assert again == verdict
    assert again.schema_version == 2


def test_fail_safe_verdict_without_score() -> None:
    verdict = make_verdict(score=None, threshold=None, regions=[], reason="engine_error: boom")
    assert json.loads(verdict.model_dump_json())["reason"] == "engine_error: boom"


def test_a_non_finite_number_cannot_make_a_verdict() -> None:
    """pydantic would write NaN and infinity as null; a verdict holding one is refused where it is built."""
    for bad in ({"score": float("nan")}, {"threshold": float("inf")}, {"camera_ts": float("-inf")},
                {"latency_ms": {"total": float("nan")}},
                {"regions": [Region(x=1, y=2, w=3, h=4, area_px=10, peak_score=0.9).model_dump() | {
                    "peak_score": float("inf")}]}):
        with pytest.raises(ValidationError, match="finite number"):
            make_verdict(**bad)


def test_regions_sorted_filtered_and_peaks() -> None:
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 10:30] = 0.7  # 200 px
    heat[15, 15] = 0.95
    heat[40:45, 40:45] = 0.6  # 25 px
    heat[60, 60] = 0.9  # 1 px: below min area
    heat[50:52, 5:7] = 0.3  # below pixel threshold
    regions = regions_from_mask(heat, pixel_threshold=0.5, min_area_px=4)
    assert [(r.x, r.y, r.w, r.h, r.area_px) for r in regions] == [(10, 10, 20, 10, 200), (40, 40, 5, 5, 25)]
    assert regions[0].peak_score == np.float32(0.95)
    assert regions[1].peak_score == np.float32(0.6)


def test_regions_diagonal_pixels_are_one_region() -> None:
    heat = np.zeros((8, 8), np.float32)
    heat[1, 1] = heat[2, 2] = heat[3, 3] = 1.0
    assert len(regions_from_mask(heat, 0.5, 1)) == 1


def test_regions_mapped_to_frame_with_scale_and_roi_offset() -> None:
    heat = np.zeros((32, 32), np.float32)
    heat[4:8, 2:6] = 1.0
    (region,) = regions_from_mask(heat, 0.5, 1, scale_xy=(2.0, 3.0), offset_xy=(100, 50))
    assert (region.x, region.y, region.w, region.h, region.area_px) == (104, 62, 8, 12, 96)


def test_mask_png_round_trip() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.7
    png = encode_mask_png(mask)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_mask_png(png), mask)


def test_reject_payload_is_compact_and_carries_the_run() -> None:
    run = '"run_id":"20231114T221320Z-0a1b2c3d","t_acquired":1700000000.25'
    assert reject_payload(make_verdict(frame_id=3, ok=False)) == f'{{"frame_id":3,{run},"reject":1}}'.encode()
    assert reject_payload(make_verdict(frame_id=4, ok=True)) == f'{{"frame_id":4,{run},"reject":0}}'.encode()


def test_run_ids_are_sortable_by_start_time_and_distinct() -> None:
    first, second = new_run_id(), new_run_id()
    assert first != second and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", first)


def test_committed_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text() == verdict_schema_json(), "run `python -m inspector.verdict` and commit"


def test_write_schema_regenerates_the_file(tmp_path: Path) -> None:
    path = write_schema(tmp_path / "docs" / "verdict.schema.json")
    assert json.loads(path.read_text())["title"] == "Verdict"
    assert path.read_text() == verdict_schema_json()
