"""Pipeline: preprocessing, micro-batching, fail-safes (deadline, queue full, engine error, bad frames),
pause/resume, SKU swap and drain — one verdict per frame, always.

The engines here are small real implementations of our Engine protocol (a brightness map that can be slow,
fail or hang on demand), so timing and failure paths are exercised without training a model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from inspector.acquisition import Frame
from inspector.config import LineConfig, ServiceConfig
from inspector.decider import Decider
from inspector.pipeline import (
    CORRUPT_FRAME,
    DEADLINE,
    ENGINE_ERROR,
    INVALID_FRAME,
    QUEUE_FULL,
    SHUTDOWN,
    WRONG_SIZE,
    ActiveSku,
    FrameRejected,
    Pipeline,
    preprocess,
)
from inspector.verdict import Verdict
from tdad.manifest import TilingRecord
from tests.test_decider import make_calibration
from tests.waiting import holds_for, wait_until


class BrightnessEngine:
    """Engine whose anomaly map is the red channel / 255: a white patch on black is a defect."""

    backend = "test"

    def __init__(self, image_size: int = 32, delay_s: float = 0.0, fail_calls: int = 0,
                 gate: threading.Event | None = None) -> None:
        self.image_size = image_size
        self.delay_s = delay_s
        self.fail_calls = fail_calls
        self.gate = gate
        self.batches: list[int] = []
        self.closed = False

    def load(self, sku_dir: Any) -> None:
        """Nothing to load."""

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """Red channel as the map; optionally sleep, wait for a gate, or raise for the first calls."""
        assert not self.closed, "infer on a closed engine"
        self.batches.append(len(images_u8_nhwc))
        if self.gate is not None:
            self.gate.wait()
        time.sleep(self.delay_s)
        if len(self.batches) <= self.fail_calls:
            raise RuntimeError("simulated engine failure")
        return images_u8_nhwc[..., 0].astype(np.float32) / 255.0

    def warmup(self) -> None:
        """Nothing to warm."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "image_size": self.image_size}

    def close(self) -> None:
        """Mark the engine closed: an infer after it fails the test's frames."""
        self.closed = True


class ListSource:
    """Source over prepared images (None = corrupt), paced by `interval_s`, ids from 1."""

    def __init__(self, images: list[np.ndarray | None], interval_s: float = 0.0) -> None:
        self.images = images
        self.interval_s = interval_s
        self.produced = 0
        self._stop = threading.Event()

    def open(self) -> None:
        """Nothing to open."""

    def frames(self) -> Iterator[Frame]:
        for i, image in enumerate(self.images, start=1):
            if self._stop.is_set():
                return
            self.produced = i
            yield Frame(i, time.time(), image, {"error": "broken.png: cannot decode"} if image is None else {})
            if self.interval_s and self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Nothing to close."""

    def describe(self) -> dict[str, Any]:
        return {"type": "list", "connected": True, "frames": self.produced}


def part(h: int = 64, w: int = 64, defect_xywh: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A black part, with a white rectangle where the defect is."""
    image = np.zeros((h, w, 3), np.uint8)
    if defect_xywh is not None:
        x, y, dw, dh = defect_xywh
        image[y:y + dh, x:x + dw] = 255
    return image


def active(engine: BrightnessEngine, name: str = "a", roi: tuple[int, int, int, int] | None = None) -> ActiveSku:
    cal = make_calibration(image_threshold=0.5, pixel_threshold=0.5, min_defect_area_px=2)
    return ActiveSku(name=name, engine=engine, decider=Decider(cal, top_k=4, publish_mask="ng"), roi=roi)


def run_pipeline(images: list[np.ndarray | None], engine: BrightnessEngine, **kwargs: Any
                 ) -> tuple[list[tuple[Verdict, bytes | None]], Pipeline]:
    """Run a finite ListSource through a pipeline to completion; return the published verdicts."""
    published: list[tuple[Verdict, bytes | None]] = []
    interval = kwargs.pop("interval_s", 0.0)
    sku = kwargs.pop("sku", None) or active(engine)
    service = ServiceConfig(**{k: kwargs.pop(k) for k in ("queue_depth", "frame_timeout_ms", "fail_safe")
                               if k in kwargs})
    pipeline = Pipeline(ListSource(images, interval), sku, lambda v, m: published.append((v, m)), service,
                        line=LineConfig(line_id="l1", station_id="s1"), **kwargs)
    pipeline.start()
    assert pipeline.wait(20), "pipeline did not finish"
    return published, pipeline


def test_preprocess_crops_roi_and_resizes_with_placement() -> None:
    image = part(200, 300)
    image[20:120, 50:150] = 7
    out, placement = preprocess(image, (50, 20, 100, 100), 50, None)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out == 7).all()
    assert placement.origin_xy == (50, 20) and placement.scale_xy == (2.0, 2.0)


@pytest.mark.parametrize(
    ("image", "roi", "expected", "reason"),
    [
        (None, None, None, CORRUPT_FRAME),
        (np.zeros((64, 64, 3), np.float32), None, None, INVALID_FRAME),
        (np.zeros((64, 64), np.uint8), None, None, INVALID_FRAME),
        (np.zeros((48, 64, 3), np.uint8), None, (64, 64), WRONG_SIZE),
        (np.zeros((64, 64, 3), np.uint8), (40, 40, 40, 40), None, WRONG_SIZE),
    ],
)
def test_preprocess_rejects_unusable_frames(image: Any, roi: Any, expected: Any, reason: str) -> None:
    with pytest.raises(FrameRejected) as info:
        preprocess(image, roi, 32, expected)
    assert info.value.reason == reason


def test_every_frame_gets_one_verdict_in_order_with_regions_in_frame_pixels() -> None:
    images = [part(), part(defect_xywh=(30, 10, 16, 8)), part(), None, part(48, 64), part()]
    published, pipeline = run_pipeline(images, BrightnessEngine(image_size=32))
    verdicts = [v for v, _ in published]
    assert [v.frame_id for v in verdicts] == [1, 2, 3, 4, 5, 6]
    assert [v.ok for v in verdicts] == [True, False, True, False, False, True]
    ng = verdicts[1]
    assert ng.reason is None and ng.score is not None and ng.score >= 0.5
    assert [(r.x, r.y, r.w, r.h) for r in ng.regions] == [(30, 10, 16, 8)]
    assert published[1][1] is not None and published[0][1] is None  # mask only for NG
    assert verdicts[3].reason.startswith(CORRUPT_FRAME) and "broken.png" in verdicts[3].reason
    assert verdicts[4].reason.startswith(WRONG_SIZE)
    assert set(ng.latency_ms) == {"queue", "preprocess", "infer", "decide", "total"}
    assert all(v.line == "l1" and v.station == "s1" and v.engine == "test" for v in verdicts)
    stats = pipeline.stats.snapshot()
    assert stats["frames"] == stats["acquired"] == 6 and stats["ng"] == 3 and stats["ok"] == 3
    assert stats["fail_safe"] == {CORRUPT_FRAME: 1, WRONG_SIZE: 1}
    assert stats["latency_p50_ms"] is not None and stats["latency_p99_ms"] >= stats["latency_p50_ms"]


def test_roi_offsets_regions_back_to_frame_coordinates() -> None:
    engine = BrightnessEngine(image_size=32)
    image = part(100, 200, defect_xywh=(120, 40, 20, 10))
    published, _ = run_pipeline([image], engine, sku=active(engine, roi=(100, 20, 64, 64)))
    (verdict, _), = published
    assert not verdict.ok
    assert [(r.x, r.y, r.w, r.h) for r in verdict.regions] == [(120, 40, 20, 10)]


def test_a_tiled_sku_inspects_a_large_frame_in_batch_sized_tile_chunks_with_regions_in_frame_pixels() -> None:
    engine = BrightnessEngine(image_size=32)
    sku = active(engine, roi=(8, 4, 400, 200))
    sku.tiling = TilingRecord(scale=0.5, overlap=0.25)  # 400 x 200 ROI -> 200 x 100 -> 4 x 8 tiles of 32
    image = part(220, 420, defect_xywh=(360, 150, 24, 12))  # in the far bottom-right tile
    published, _ = run_pipeline([image, part(220, 420)], engine, sku=sku, batch=4)
    (ng, _), (ok, _) = published
    assert not ng.ok and ok.ok and ok.score == 0.0
    assert [(r.x, r.y, r.w, r.h) for r in ng.regions] == [(360, 150, 24, 12)]
    assert max(engine.batches) <= 4 and sum(engine.batches) == 2 * 32  # chunks never exceed the engine batch
    scaled, placement = preprocess(image, sku.roi, 32, None, tiling=sku.tiling)
    assert scaled.shape == (100, 200, 3) and placement.origin_xy == (8, 4) and placement.scale_xy == (2.0, 2.0)


def test_micro_batching_takes_what_is_queued_up_to_batch_and_never_waits() -> None:
    engine = BrightnessEngine(delay_s=0.05)
    published, _ = run_pipeline([part() for _ in range(20)], engine, batch=4, queue_depth=32)
    assert len(published) == 20
    assert max(engine.batches) == 4 and sum(engine.batches) == 20
    single = BrightnessEngine()
    run_pipeline([part()], single, batch=8)
    assert single.batches == [1]


def test_deadline_missed_frames_fail_safe() -> None:
    published, pipeline = run_pipeline([part() for _ in range(6)], BrightnessEngine(delay_s=0.15),
                                       frame_timeout_ms=100, queue_depth=16)
    reasons = [v.reason for v, _ in published]
    assert len(published) == 6 and reasons[0] is None
    assert any(r and r.startswith(DEADLINE) for r in reasons)
    assert all(not v.ok for v, _ in published if v.reason)
    assert pipeline.stats.snapshot()["fail_safe"][DEADLINE] >= 1


def test_full_queue_is_a_fail_safe_not_a_drop() -> None:
    published, pipeline = run_pipeline([part() for _ in range(12)], BrightnessEngine(delay_s=0.1),
                                       queue_depth=1)
    assert sorted(v.frame_id for v, _ in published) == list(range(1, 13))
    assert pipeline.stats.snapshot()["fail_safe"].get(QUEUE_FULL, 0) >= 1


def test_engine_error_fails_the_batch_safe_and_the_loop_recovers() -> None:
    published, _ = run_pipeline([part(), part()], BrightnessEngine(fail_calls=1), interval_s=0.05)
    first, second = (v for v, _ in published)
    assert first.reason.startswith(ENGINE_ERROR) and "simulated" in first.reason and not first.ok
    assert second.reason is None and second.ok


def test_fail_safe_ok_policy_passes_uninspectable_frames() -> None:
    published, _ = run_pipeline([None], BrightnessEngine(), fail_safe="ok")
    (verdict, _), = published
    assert verdict.ok and verdict.reason.startswith(CORRUPT_FRAME) and verdict.score is None


def test_pause_stops_pulling_frames_and_resume_continues() -> None:
    published: list[Verdict] = []
    source = ListSource([part() for _ in range(50)], interval_s=0.02)
    pipeline = Pipeline(source, active(BrightnessEngine()), lambda v, m: published.append(v))
    pipeline.start()
    assert wait_until(lambda: len(published) >= 5)
    pipeline.pause()
    held = source.produced
    assert holds_for(lambda: source.produced <= held + 1, 0.3) and pipeline.paused
    pipeline.resume()
    assert pipeline.wait(10)
    assert [v.frame_id for v in published] == list(range(1, 51))


def test_sku_swap_between_batches_loses_nothing() -> None:
    published: list[Verdict] = []
    gate = threading.Event()
    engine_a = BrightnessEngine(gate=gate)
    pipeline = Pipeline(ListSource([part() for _ in range(40)], interval_s=0.01), active(engine_a, "a"),
                        lambda v, m: published.append(v))
    pipeline.start()
    assert wait_until(lambda: len(engine_a.batches) > 0)  # the first batch is inside engine a
    pipeline.swap_sku(active(BrightnessEngine(), "b"))
    gate.set()
    assert pipeline.wait(10)
    names = [v.sku for v in published]
    assert [v.frame_id for v in published] == list(range(1, 41))
    assert names[0] == "a" and names[-1] == "b" and names == sorted(names)


def test_a_swap_closes_the_retired_engine_after_its_last_batch_and_an_overtaken_one_at_once() -> None:
    published: list[Verdict] = []
    gate = threading.Event()
    engine_a, engine_b, engine_c = BrightnessEngine(gate=gate), BrightnessEngine(), BrightnessEngine()
    pipeline = Pipeline(ListSource([part() for _ in range(20)], interval_s=0.01), active(engine_a, "a"),
                        lambda v, m: published.append(v))
    pipeline.start()
    assert wait_until(lambda: len(engine_a.batches) > 0)  # a batch is inside engine a
    pipeline.swap_sku(active(engine_b, "b"))
    pipeline.swap_sku(active(engine_c, "c"))  # overtakes b before any batch used it
    assert engine_b.closed and not engine_a.closed
    gate.set()
    assert pipeline.wait(10)
    assert engine_a.closed and not engine_c.closed and engine_b.batches == []
    assert published[0].sku == "a" and {v.sku for v in published} == {"a", "c"}
    assert all(v.reason is None for v in published)


def test_stop_with_a_hung_engine_fail_safes_in_flight_and_queued_frames() -> None:
    gate = threading.Event()
    published: list[Verdict] = []
    pipeline = Pipeline(ListSource([part() for _ in range(5)]), active(BrightnessEngine(gate=gate)),
                        lambda v, m: published.append(v), ServiceConfig(queue_depth=8))
    pipeline.start()
    assert wait_until(lambda: pipeline.stats.snapshot()["acquired"] == 5)
    assert not pipeline.stop(drain_timeout_s=0.5)
    gate.set()
    assert wait_until(lambda: len(published) >= 5)
    assert sorted(v.frame_id for v in published) == [1, 2, 3, 4, 5]
    assert all(v.reason and v.reason.startswith(SHUTDOWN) for v in published)


def test_stop_drains_in_flight_frames_to_verdicts() -> None:
    published: list[Verdict] = []
    source = ListSource([part() for _ in range(1000)], interval_s=0.02)
    pipeline = Pipeline(source, active(BrightnessEngine(delay_s=0.005)), lambda v, m: published.append(v))
    pipeline.start()
    assert wait_until(lambda: len(published) >= 5)
    assert pipeline.stop(drain_timeout_s=5)
    stats = pipeline.stats.snapshot()
    assert 0 < stats["acquired"] < 1000
    assert [v.frame_id for v in published] == list(range(1, stats["acquired"] + 1))
    assert all(v.reason is None for v in published)


class DeafSource(ListSource):
    """A source whose frames() blocks after its images and ignores stop(), like a wedged camera driver."""

    def frames(self) -> Iterator[Frame]:
        yield from super().frames()
        threading.Event().wait(30)


def test_stop_with_a_wedged_source_still_publishes_what_was_acquired() -> None:
    published: list[Verdict] = []
    pipeline = Pipeline(DeafSource([part() for _ in range(3)]), active(BrightnessEngine()),
                        lambda v, m: published.append(v))
    pipeline.start()
    assert wait_until(lambda: len(published) == 3)
    t0 = time.monotonic()
    pipeline.stop(drain_timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0
    assert [v.frame_id for v in published] == [1, 2, 3] and pipeline.finished.is_set()


class BrokenSource(ListSource):
    """A source whose camera fails after its images."""

    def frames(self) -> Iterator[Frame]:
        yield from super().frames()
        raise OSError("camera unplugged")


def test_a_failing_source_ends_the_run_with_its_error_after_the_last_verdict() -> None:
    published: list[Verdict] = []
    pipeline = Pipeline(BrokenSource([part(), part()]), active(BrightnessEngine()), lambda v, m: published.append(v))
    pipeline.start()
    assert pipeline.wait(10)
    assert [v.frame_id for v in published] == [1, 2]
    assert pipeline.source_error == "OSError: camera unplugged"
