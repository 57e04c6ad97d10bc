"""Tiled inspection geometry (tdad/tiling.py): tile origins, coverage of every pixel, exact stitching, edge
tiles, frames smaller than a tile, scaling of images and masks, random training crops; and chunked inference
over the tiles (engines/tiled.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engines.tiled import infer_tiled
from tdad.manifest import TilingRecord
from tdad.tiling import (
    TilePlan,
    random_crop,
    scale_image,
    scale_mask,
    scaled_hw,
    tent_window,
    tile_origins,
)


class RedChannelEngine:
    """An engine whose map is a tile's red channel / 255: a stitched map must equal the frame's own red channel.
    Records the batch sizes it was called with."""

    backend = "red"

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.batches: list[int] = []

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        assert images_u8_nhwc.shape[1:] == (self.image_size, self.image_size, 3)
        self.batches.append(len(images_u8_nhwc))
        return images_u8_nhwc[..., 0].astype(np.float32) / 255.0

    def load(self, sku_dir: Any) -> None: ...
    def warmup(self) -> None: ...
    def describe(self) -> dict[str, Any]:
        return {}


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB frame."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("length", "size", "overlap", "expected"), [
    (128, 128, 0.0, (0,)),  # frame == S: one tile
    (100, 128, 0.25, (0,)),  # smaller than S: one (padded) tile
    (512, 128, 0.0, (0, 128, 256, 384)),  # a multiple of S: no overlap needed
    (612, 128, 0.0, (0, 121, 242, 363, 484)),  # not a multiple: 5 evenly spaced, the last on the edge
    (256, 128, 0.25, (0, 64, 128)),  # 32 px wanted: stride 96 needs 3 tiles, spaced 64
    (129, 128, 0.0, (0, 1)),
])
def test_tile_origins_cover_the_length_with_the_last_on_the_edge(length: int, size: int, overlap: float,
                                                                  expected: tuple[int, ...]) -> None:
    origins = tile_origins(length, size, overlap)
    assert origins == expected
    if length > size:
        steps = np.diff(origins)
        assert origins[-1] == length - size and (size - steps >= round(overlap * size)).all()


def test_a_line_frame_at_a_quarter_scale_is_5_by_4_tiles_of_128() -> None:
    h, w = scaled_hw(2048, 2448, 0.25)
    plan = TilePlan.fit(h, w, 128)
    assert (h, w) == (512, 612) and (len(plan.ys), len(plan.xs)) == (4, 5) and len(plan) == 20


@pytest.mark.parametrize(("h", "w", "size", "overlap"), [
    (128, 128, 128, 0.0), (300, 517, 64, 0.0), (300, 517, 64, 0.3), (65, 64, 64, 0.49), (1000, 70, 64, 0.1),
])
def test_every_pixel_is_covered_and_stitching_a_known_map_is_exact(h: int, w: int, size: int, overlap: float) -> None:
    image = frame(h, w)
    plan = TilePlan.fit(h, w, size, overlap)
    tiles = plan.tile(image)
    assert tiles.shape == (len(plan), size, size, 3) and tiles.dtype == np.uint8
    covered = np.zeros((h, w), dtype=int)
    for (y, x), t in zip(plan.origins, tiles, strict=True):
        covered[y : y + size, x : x + size] += 1
        assert np.array_equal(t, image[y : y + size, x : x + size])  # no padding in a frame at least S large
    assert covered.min() >= 1
    truth = image[..., 1].astype(np.float32) / 255.0
    maps = np.stack([truth[y : y + size, x : x + size] for y, x in plan.origins])
    np.testing.assert_allclose(plan.stitch(maps), truth, rtol=0, atol=1e-6)


def test_overlaps_are_blended_towards_the_tile_that_sees_a_pixel_nearer_its_centre() -> None:
    plan = TilePlan.fit(64, 96, 64, 0.0)  # two tiles, x = 0 and 32, sharing columns 32..63
    stitched = plan.stitch(np.stack([np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32)]))
    assert (stitched[:, :32] == 0).all() and (stitched[:, 64:] == 1).all()
    assert np.all(np.diff(stitched[10, 32:64]) > 0)  # a smooth ramp, no seam
    window = tent_window(64)
    assert window.min() > 0 and window.max() == 1.0


@pytest.mark.parametrize(("h", "w"), [(1, 1), (10, 40), (63, 200), (200, 5)])
def test_frames_smaller_than_a_tile_are_reflect_padded_and_cropped_back(h: int, w: int) -> None:
    image = frame(h, w, seed=3)
    plan = TilePlan.fit(h, w, 64)
    tiles = plan.tile(image)
    assert tiles.shape[1:] == (64, 64, 3)
    first = tiles[0]
    assert np.array_equal(first[: min(h, 64), : min(w, 64)], image[:64, :64])
    if h < 64:  # the padding mirrors the frame, never black
        assert np.array_equal(first[h : min(2 * h, 64), : min(w, 64)], image[::-1][: min(h, 64 - h), :64])
    truth = image[..., 0].astype(np.float32) / 255.0
    stitched = infer_tiled(RedChannelEngine(64), [image], TilingRecord(scale=1.0), batch=4)[0]
    assert stitched.shape == (h, w)
    np.testing.assert_allclose(stitched, truth, atol=1e-6)


def test_a_plan_refuses_a_frame_of_another_size_and_maps_of_another_count() -> None:
    plan = TilePlan.fit(100, 100, 64)
    with pytest.raises(ValueError, match="tile plan is for 100x100"):
        plan.tile(frame(90, 100))
    with pytest.raises(ValueError, match="expected 4 maps of 64x64"):
        plan.stitch(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        TilePlan.fit(100, 100, 64, 0.5)


def test_scaling_resizes_once_with_area_averaging_and_thin_mask_lines_survive() -> None:
    image = frame(2048, 2448)
    scaled = scale_image(image, 0.25)
    assert scaled.shape == (512, 612, 3)
    block = image[:4, :4].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(scaled[0, 0], block, atol=1)  # INTER_AREA: the mean of each 4 x 4 block
    mask = np.zeros((400, 400), dtype=bool)
    mask[:, 201] = True  # a 1 px vertical crack
    mask[37, 37] = True  # a single defect pixel
    small = scale_mask(mask, 0.25)
    assert small.shape == (100, 100) and small[:, 50].all() and small[9, 9]
    assert small.sum() == 101  # nothing else lights up
    assert np.array_equal(scale_mask(mask, 1.0), mask)
    assert scale_mask(mask, 2.0).sum() == 4 * mask.sum()


def test_random_crops_are_s_by_s_windows_of_the_scaled_image_and_pad_small_ones() -> None:
    image = frame(90, 300, seed=5)
    rng = np.random.default_rng(0)
    xs = set()
    for _ in range(50):
        crop = random_crop(image, 64, rng)
        assert crop.shape == (64, 64, 3)
        hits = [(y, x) for y in range(90 - 63) for x in range(300 - 63)
                if np.array_equal(image[y, x], crop[0, 0]) and np.array_equal(image[y : y + 64, x : x + 64], crop)]
        assert hits
        xs.add(hits[0][1])
    assert len(xs) > 10  # placed uniformly, not always the same window
    tiny = random_crop(frame(20, 30), 64, rng)
    assert tiny.shape == (64, 64, 3)


def test_infer_tiled_chunks_tiles_to_the_engine_batch_across_frames_and_stitches_each() -> None:
    engine = RedChannelEngine(64)
    images = [frame(130, 200, seed=1), frame(64, 64, seed=2), frame(100, 70, seed=4)]
    maps = infer_tiled(engine, images, TilingRecord(scale=1.0, overlap=0.25), batch=4)
    counts = [len(TilePlan.fit(*im.shape[:2], 64, 0.25)) for im in images]
    assert sum(engine.batches) == sum(counts) and max(engine.batches) <= 4
    for image, stitched in zip(images, maps, strict=True):
        np.testing.assert_allclose(stitched, image[..., 0] / 255.0, atol=1e-6)
