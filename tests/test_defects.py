"""Validation defects (tdad.training.defects): exact masks, foreground placement, determinism, sizes and shapes per
kind, the fallback on surfaces where a kind changes nothing, and the argument checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tdad.training.defects import DEFECT_KINDS, MIN_CHANGE, ValidationDefects, _pit, _Scene

SHAPES = [(128, 128), (192, 256)]
SEEDS = range(5)


def _grain(h: int, w: int, seed: int) -> np.ndarray:
    """Unit-variance smooth noise, float32 HxW: the grain of a cast or machined surface."""
    noise = cv2.GaussianBlur(np.random.default_rng(seed).normal(0.0, 1.0, (h, w)).astype(np.float32), (0, 0), 1.5)
    return noise / noise.std()


def disc_part(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured grey disc (a part) on a dark flat background; returns (uint8 HxWx3 image, bool disc mask)."""
    yy, xx = np.indices((h, w))
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.35 * min(h, w)) ** 2
    grey = np.where(disc, 150.0 + 25.0 * _grain(h, w, seed), 25.0)
    return np.clip(grey[..., None] * np.array([1.0, 0.97, 0.9]), 0, 255).astype(np.uint8), disc


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A full-frame tinted texture: oblique machining stripes over grain (no background to find)."""
    yy, xx = np.indices((h, w))
    grey = 120.0 + 18.0 * _grain(h, w, seed) + 15.0 * np.sin(0.5 * xx + 0.15 * yy)
    return np.clip(grey[..., None] * np.array([1.0, 0.9, 0.75]), 0, 255).astype(np.uint8)


def _largest_half_width(mask: np.ndarray) -> float:
    """The largest distance from a mask pixel to the nearest pixel outside (about half the widest part)."""
    return float(cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5).max())


def _extent(mask: np.ndarray) -> int:
    """The longer side of the mask's bounding box, in pixels."""
    ys, xs = np.nonzero(mask)
    return int(max(np.ptp(ys), np.ptp(xs))) + 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_every_kind_changes_exactly_its_mask_inside_the_part(kind: str, shape: tuple[int, int]) -> None:
    defects = ValidationDefects()
    part, disc = disc_part(*shape)
    foreground = defects.foreground_mask(part)
    assert (foreground & disc).sum() / (foreground | disc).sum() > 0.95  # the Otsu guess is the disc
    for image, where in ((part, foreground), (texture(*shape), np.ones(shape, bool))):
        before = image.copy()
        for seed in SEEDS:
            out, mask = defects(image, np.random.default_rng(seed), kind)
            assert out.dtype == np.uint8 and out.shape == image.shape and out is not image
            assert mask.dtype == bool and mask.shape == shape and mask.any()
            assert np.array_equal(out[~mask], image[~mask])
            change = cv2.absdiff(out, image).max(axis=2)
            assert change[mask].min() >= MIN_CHANGE  # every mask pixel visibly changed
            assert not (mask & ~where).any()
        assert np.array_equal(image, before)


def test_full_frame_textures_and_foreground_none_use_the_whole_frame() -> None:
    part, disc = disc_part(128, 128)
    assert ValidationDefects().foreground_mask(texture(128, 128)).all()
    anywhere = ValidationDefects(foreground="none")
    assert anywhere.foreground_mask(part).all()
    outside = [(anywhere(part, np.random.default_rng(seed), "pit")[1] & ~disc).any() for seed in range(30)]
    assert any(outside)


def test_same_seed_same_defect_other_seed_other_defect() -> None:
    defects = ValidationDefects()
    image = texture(192, 256)
    for seed in range(12):
        out, mask = defects(image, np.random.default_rng(seed))
        again, mask_again = defects(image, np.random.default_rng(seed))
        other, _ = defects(image, np.random.default_rng(seed + 100))
        assert np.array_equal(out, again) and np.array_equal(mask, mask_again)
        assert not np.array_equal(out, other)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_strokes_are_thin_lines_and_pits_small_spots(shape: tuple[int, int]) -> None:
    side = min(shape)
    scale = side / 128
    image = texture(*shape)
    strokes = ValidationDefects(kinds=("stroke",))  # kind None: drawn from the configured kinds
    for seed in range(10):
        _, mask = strokes(image, np.random.default_rng(seed))
        assert _largest_half_width(mask) <= 2.0 * scale + 2.0
        assert _extent(mask) <= 0.45 * side
        _, pits = ValidationDefects()(image, np.random.default_rng(seed), "pit")
        count, _ = cv2.connectedComponents(pits.astype(np.uint8))
        assert count - 1 <= 4
        assert _largest_half_width(pits) <= 5.0 * scale + 1.0
        assert _extent(pits) <= 0.3 * side


@pytest.mark.parametrize("kind", ["stain", "patch", "blur", "shift"])
def test_area_defects_are_local_and_grow_with_the_image(kind: str) -> None:
    defects = ValidationDefects()
    areas = {}
    for shape in SHAPES:
        image = texture(*shape)
        masks = [defects(image, np.random.default_rng(seed), kind)[1] for seed in range(10)]
        assert all(_extent(mask) <= 0.3 * min(shape) for mask in masks)
        areas[shape] = np.median([mask.sum() for mask in masks])
    assert areas[SHAPES[1]] > 1.5 * areas[SHAPES[0]]  # 1.5x the side: about 2.25x the area


@pytest.mark.parametrize("level", [0, 128, 255])
def test_flat_surfaces_still_get_a_visible_defect(level: int) -> None:
    image = np.full((96, 128, 3), level, np.uint8)  # nothing to blur or move: the fallback pit
    defects = ValidationDefects()
    for kind in DEFECT_KINDS:
        out, mask = defects(image, np.random.default_rng(0), kind)
        assert mask.any() and np.array_equal(out[~mask], image[~mask])
        assert cv2.absdiff(out, image).max(axis=2)[mask].min() >= MIN_CHANGE


def test_the_last_resort_pit_always_changes_the_foreground() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 32] = 255  # a bright 1 px foreground line on black: the pit's mean surface is dark, its centre white
    allowed = np.zeros((64, 64), bool)
    allowed[:, 32] = True
    scene = _Scene.of(image, allowed)
    for seed in range(30):
        _, mask, _ = scene.apply(*_pit(scene, np.random.default_rng(seed), per_pixel=True))
        assert mask.any() and not (mask & ~allowed).any()


def test_unknown_kinds_and_bad_images_are_refused() -> None:
    defects = ValidationDefects()
    image = texture(64, 64)
    with pytest.raises(ValueError, match=r"'dent'.*stroke, pit, stain, patch, blur, shift"):
        defects(image, np.random.default_rng(0), "dent")
    with pytest.raises(ValueError, match=r"'dent'.*stroke, pit"):
        ValidationDefects(kinds=("pit", "dent"))
    with pytest.raises(ValueError, match="no defect kinds"):
        ValidationDefects(kinds=())
    with pytest.raises(ValueError, match="foreground"):
        ValidationDefects(foreground="auto")  # type: ignore[arg-type]
    for bad in (image.astype(np.float32), image[..., 0], np.dstack([image, image[..., :1]])):
        with pytest.raises(ValueError, match="uint8 HxWx3"):
            defects(bad, np.random.default_rng(0))
