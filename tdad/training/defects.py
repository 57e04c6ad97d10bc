"""Validation defects: a second synthetic defect family, unlike the training synthesis, to choose settings on.

tdad.training.synthesis teaches the segmenter one family (Perlin / irregular regions alpha-blended with foreign
texture), so settings tuned on that family would be flattered. This family imitates production defects of
other shapes and looks; it only VALIDATES settings (memory boost, ...) on held-out good images, never trains:

stroke  scratch / crack: a jittered 2-6 segment polyline or smoothed curve, 1-3 px wide, 25-60 % darker or
        lighter (darker: that share of the intensity; lighter: that share of the room up to white)
pit     1-4 clustered blowholes / dents: soft-edged ellipses of radius 1.5-5 px, dark core (light on dark surfaces)
stain   oil / discolouration: a blurred ellipse or polygon 4-15 % of the side across, 10-35 % brightness/colour shift
patch   misplaced material / wrong print: a rectangle or polygon 5-20 % of the side across, copied from elsewhere
        in the image, turned and/or mirrored, pasted hard-edged
blur    out of focus / smear: an ellipse 8-25 % of the side across, Gaussian-blurred with sigma 2-5 px
shift   wrong colour / material: an irregular polygon 6-20 % of the side across, hue/saturation or gamma shifted

Pixel sizes are at 128 px and scale with min(H, W). Defects are centred on the object's foreground (Otsu with
AnomalySynthesizer's guard) and clipped to it. The mask is exactly the pixels whose largest channel change is
at least MIN_CHANGE grey levels: every other pixel is the input's bit for bit, so no invisible fringe is claimed.
A defect that is tiny or mostly invisible (a blur on a flat surface) is redrawn, then replaced by a pit, which
never fails. Everything random comes from the rng argument: a seeded generator reproduces the output exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from tdad.training.synthesis import object_region

DEFECT_KINDS: tuple[str, ...] = ("stroke", "pit", "stain", "patch", "blur", "shift")
MIN_CHANGE = 8  # grey levels (largest channel) for a pixel to count as changed, i.e. to be in the mask
_REFERENCE = 128.0  # the image side the pixel sizes in the docstring refer to
_TRIES = 6  # draws of the asked kind, then as many pits, before the pit that cannot fail
_MIN_AREA = 5.0  # pixels a defect's mask needs at 128 px (scaled with the area, never under 4)
_MIN_FILL = 0.3  # the mask must cover this share of the defect's core (weight >= 0.5) in the foreground
_HEADROOM = 64.0  # grey levels a darker/lighter change needs, else it goes the other way
_SHIFT = 4  # fractional bits of the sub-pixel coordinates given to cv2's drawing functions


@dataclass(frozen=True)
class _Scene:
    """One image being given a defect: its pixels, where defects may go, and its size."""

    image: np.ndarray  # uint8 HxWx3
    pixels: np.ndarray  # float32 HxWx3
    gray: np.ndarray  # float32 HxW
    allowed: np.ndarray  # bool HxW
    spots: np.ndarray  # flat indices of the allowed pixels
    side: float  # min(H, W)

    @classmethod
    def of(cls, image: np.ndarray, allowed: np.ndarray) -> _Scene:
        """The scene of a uint8 HxWx3 image with a non-empty bool HxW foreground."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        return cls(image, image.astype(np.float32), gray, allowed, np.flatnonzero(allowed), float(min(gray.shape)))

    @property
    def scale(self) -> float:
        """Image side over the 128 px reference."""
        return self.side / _REFERENCE

    def canvas(self) -> np.ndarray:
        """An empty float32 HxW drawing canvas."""
        return np.zeros(self.gray.shape, np.float32)

    def point(self, rng: np.random.Generator) -> np.ndarray:
        """A random allowed pixel as float (x, y)."""
        y, x = np.divmod(int(self.spots[rng.integers(self.spots.size)]), self.gray.shape[1])
        return np.array([x, y], np.float64)

    def level(self, weight: np.ndarray) -> float:
        """Mean grey level under a weight map."""
        return float((self.gray * weight).sum() / max(float(weight.sum()), 1e-6))

    def apply(self, candidate: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """(image, mask, big enough): candidate pixels where weight > 0, allowed and changed by >= MIN_CHANGE."""
        painted = cv2.convertScaleAbs(candidate)  # rounded, saturated to uint8 (candidates are >= 0)
        diff = cv2.absdiff(painted, self.image)
        changed = np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2]) >= MIN_CHANGE
        mask = changed & (weight > 0) & self.allowed
        out = cv2.copyTo(painted, mask.view(np.uint8), self.image.copy())
        area = int(np.count_nonzero(mask))
        core = int(np.count_nonzero((weight >= 0.5) & self.allowed))
        return out, mask, area >= max(4.0, _MIN_AREA * self.scale**2, _MIN_FILL * core)


def _points(points: np.ndarray) -> np.ndarray:
    """Float (x, y) points as the fixed-point int32 array cv2 draws with shift=_SHIFT."""
    return np.rint(points * (1 << _SHIFT)).astype(np.int32)


def _polygon(centre: np.ndarray, extent: float, rng: np.random.Generator, irregular: float) -> np.ndarray:
    """Vertices of a random star-shaped polygon about extent across: 6-11 jittered angles, radii cut by irregular."""
    n = int(rng.integers(6, 12))
    angles = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * (2.0 * np.pi / n) + rng.uniform(0.0, 2.0 * np.pi)
    radii = 0.5 * extent * rng.uniform(1.0 - irregular, 1.0, n)
    return centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]


def _fill(canvas: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """The canvas with the polygon filled with 1, hard-edged."""
    return cv2.fillPoly(canvas, [_points(polygon)], 1.0, cv2.LINE_8, _SHIFT)


def _ellipse(canvas: np.ndarray, centre: np.ndarray, extent: float, rng: np.random.Generator) -> np.ndarray:
    """The canvas with a filled ellipse of major axis extent (minor 40-100 % of it) at a random angle."""
    box = ((float(centre[0]), float(centre[1])), (extent, extent * rng.uniform(0.4, 1.0)), rng.uniform(0.0, 180.0))
    return cv2.ellipse(canvas, box, 1.0, -1)


def _shade(pixels: np.ndarray, weight: np.ndarray, light: bool | np.ndarray, amount: float | np.ndarray) -> np.ndarray:
    """Darken by amount * weight of the intensity, or lighten by amount * weight of the room up to white."""
    target = np.where(np.asarray(light)[..., None], np.float32(255.0), np.float32(0.0))
    return pixels + weight[..., None] * np.asarray(amount, np.float32) * (target - pixels)


def _light(scene: _Scene, weight: np.ndarray, rng: np.random.Generator) -> bool:
    """Lighter or darker at random, turned round where the surface under weight lacks _HEADROOM for it."""
    light = bool(rng.random() < 0.5)
    level = scene.level(weight)
    return light != ((255.0 - level if light else level) < _HEADROOM)


def _chaikin(points: np.ndarray, rounds: int) -> np.ndarray:
    """An open polyline smoothed by Chaikin corner cutting; the end points stay."""
    for _ in range(rounds):
        cuts = np.stack([0.75 * points[:-1] + 0.25 * points[1:], 0.25 * points[:-1] + 0.75 * points[1:]], axis=1)
        points = np.vstack([points[:1], cuts.reshape(-1, 2), points[-1:]])
    return points


def _stroke(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A scratch or crack: a jittered polyline or smooth curve through the foreground, thin, darker or lighter."""
    n = int(rng.integers(2, 7))
    steps = rng.uniform(0.5, 1.5, n)
    steps *= rng.uniform(0.1, 0.4) * scene.side / steps.sum()
    heading = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(rng.normal(0.0, 0.45, n))
    moves = np.stack([np.cos(heading), np.sin(heading)], axis=1) * steps[:, None]
    points = np.vstack([np.zeros((1, 2)), np.cumsum(moves, axis=0)]) + rng.normal(0.0, 0.01 * scene.side, (n + 1, 2))
    if rng.random() < 0.5:
        points = _chaikin(points, 3)
    points += scene.point(rng) - points[len(points) // 2]  # centred on the foreground pixel
    thickness = max(1, round(rng.uniform(1.0, 3.0) * scene.scale))
    weight = cv2.polylines(scene.canvas(), [_points(points)], False, 1.0, thickness, cv2.LINE_AA, _SHIFT)
    return _shade(scene.pixels, weight, _light(scene, weight, rng), rng.uniform(0.25, 0.6)), weight


def _pit(scene: _Scene, rng: np.random.Generator, per_pixel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """1-4 clustered pits: soft ellipses with a dark core, light on dark surfaces (per pixel: cannot fail)."""
    weight = scene.canvas()
    h, w = weight.shape
    first = scene.point(rng)
    count = int(rng.integers(1, 5))
    centres = first + np.vstack([np.zeros((1, 2)), rng.normal(0.0, 0.05 * scene.side, (count - 1, 2))])
    np.clip(centres, 0, [w - 1, h - 1], out=centres)
    for cx, cy in centres:
        a = rng.uniform(1.5, 5.0) * scene.scale
        b = a * rng.uniform(0.6, 1.0)
        theta = rng.uniform(0.0, np.pi)
        cos, sin = np.cos(theta), np.sin(theta)
        r = int(np.ceil(a)) + 1
        rows = slice(max(round(cy) - r, 0), min(round(cy) + r + 1, h))
        cols = slice(max(round(cx) - r, 0), min(round(cx) + r + 1, w))
        dy = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] - np.float32(cy)
        dx = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] - np.float32(cx)
        radius = np.sqrt(((dx * cos + dy * sin) / a) ** 2 + ((dy * cos - dx * sin) / b) ** 2)
        core = np.clip(2.0 - 2.0 * radius, 0.0, 1.0)  # 1 within half the radius, 0 at the rim
        np.maximum(weight[rows, cols], core * core * (3.0 - 2.0 * core), out=weight[rows, cols])
    light = scene.gray < 128.0 if per_pixel else scene.level(weight) < _HEADROOM
    return _shade(scene.pixels, weight, light, rng.uniform(0.45, 0.85)), weight


def _stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Oil or discolouration: a blurred ellipse or polygon shifting brightness and colour by 10-35 %."""
    extent = rng.uniform(0.04, 0.15) * scene.side
    centre = scene.point(rng)
    if rng.random() < 0.5:
        blob = _ellipse(scene.canvas(), centre, extent, rng)
    else:
        blob = _fill(scene.canvas(), _polygon(centre, extent, rng, 0.4))
    weight = cv2.GaussianBlur(blob, (0, 0), 0.2 * extent + 0.5)
    weight /= max(float(weight.max()), 1e-6)
    tint = rng.uniform(0.0, 0.6)
    amount = rng.uniform(0.1, 0.35) * ((1.0 - tint) + tint * 3.0 * rng.dirichlet(np.ones(3)))
    return _shade(scene.pixels, weight, _light(scene, weight, rng), amount), weight


def _distant(scene: _Scene, target: np.ndarray, extent: float, rng: np.random.Generator) -> np.ndarray:
    """A random (x, y) at least extent from target: an allowed pixel if one is that far, else any pixel."""
    w = scene.gray.shape[1]

    def far(pool: np.ndarray) -> np.ndarray:
        """The pixels of pool (flat indices) at least extent from target."""
        ys, xs = np.divmod(pool, w)
        return pool[(xs - target[0]) ** 2 + (ys - target[1]) ** 2 >= extent**2]

    candidates = far(scene.spots)
    if not candidates.size:
        candidates = far(np.arange(scene.gray.size))
    y, x = np.divmod(int(candidates[rng.integers(candidates.size)]), w)
    return np.array([x, y], np.float64)


def _patch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Misplaced material or a wrong print: a piece from elsewhere in the image, turned and/or mirrored, pasted."""
    h, w = scene.gray.shape
    extent = rng.uniform(0.05, 0.2) * scene.side
    target = scene.point(rng)
    if rng.random() < 0.5:
        box = ((float(target[0]), float(target[1])), (extent, extent * rng.uniform(0.5, 1.0)), rng.uniform(0.0, 180.0))
        weight = _fill(scene.canvas(), cv2.boxPoints(box).astype(np.float64))
    else:
        weight = _fill(scene.canvas(), _polygon(target, extent, rng, 0.3))
    source = _distant(scene, target, extent, rng)
    mode = int(rng.integers(3))  # 0 turned, 1 mirrored, 2 both
    angle = np.deg2rad(rng.uniform(20.0, 340.0)) if mode != 1 else 0.0
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if mode:
        axis = 2.0 * rng.uniform(0.0, np.pi)
        matrix = matrix @ np.array([[np.cos(axis), np.sin(axis)], [np.sin(axis), -np.cos(axis)]])
    inverse = np.hstack([matrix, (source - matrix @ target)[:, None]])  # pasted pixel -> source pixel
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    moved = cv2.warpAffine(scene.image, inverse, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT_101)
    return moved.astype(np.float32), weight


def _blur(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Out of focus or smeared: an ellipse with a slightly soft edge, Gaussian-blurred with sigma 2-5 px."""
    weight = _ellipse(scene.canvas(), scene.point(rng), rng.uniform(0.08, 0.25) * scene.side, rng)
    weight = cv2.GaussianBlur(weight, (0, 0), scene.scale)
    blurred = cv2.GaussianBlur(scene.image, (0, 0), rng.uniform(2.0, 5.0) * scene.scale).astype(np.float32)
    return scene.pixels + weight[..., None] * (blurred - scene.pixels), weight


def _shift(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Wrong colour or material: an irregular polygon, hard-edged, with a hue/saturation or a gamma shift."""
    weight = _fill(scene.canvas(), _polygon(scene.point(rng), rng.uniform(0.06, 0.2) * scene.side, rng, 0.5))
    if rng.random() < 0.5:
        gamma = np.exp(rng.choice([-1.0, 1.0]) * rng.uniform(np.log(1.5), np.log(2.5)))
        lut = np.rint(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
        return cv2.LUT(scene.image, lut).astype(np.float32), weight
    hsv = cv2.cvtColor(scene.pixels / 255.0, cv2.COLOR_RGB2HSV)  # float: hue in degrees, S and V in [0, 1]
    hsv[..., 0] = (hsv[..., 0] + rng.choice([-1.0, 1.0]) * rng.uniform(30.0, 150.0)) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5) + rng.uniform(0.15, 0.4), 0.0, 1.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0, weight


_DRAW: dict[str, Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "stroke": _stroke,
    "pit": _pit,
    "stain": _stain,
    "patch": _patch,
    "blur": _blur,
    "shift": _shift,
}


def _check_kinds(kinds: tuple[str, ...]) -> None:
    """ValueError unless kinds is a non-empty tuple of DEFECT_KINDS."""
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown or not kinds:
        named = f"unknown defect kind(s) {', '.join(map(repr, unknown))}" if unknown else "no defect kinds given"
        raise ValueError(f"{named}: use {', '.join(DEFECT_KINDS)}")


class ValidationDefects:
    """Gives good uint8 RGB images one realistic defect of the validation family, with its exact mask."""

    def __init__(self, foreground: Literal["otsu", "none"] = "otsu", kinds: tuple[str, ...] = DEFECT_KINDS) -> None:
        if foreground not in ("otsu", "none"):
            raise ValueError(f"foreground must be 'otsu' or 'none', got {foreground!r}")
        _check_kinds(tuple(kinds))
        self.foreground = foreground
        self.kinds = tuple(kinds)

    def foreground_mask(self, image_u8_hwc: np.ndarray) -> np.ndarray:
        """Bool HxW: where defects may go (AnomalySynthesizer.foreground_mask's Otsu guard; all True for "none")."""
        fg = object_region(image_u8_hwc) if self.foreground == "otsu" else None
        return np.ones(image_u8_hwc.shape[:2], bool) if fg is None else fg

    def __call__(
        self, image_u8_hwc: np.ndarray, rng: np.random.Generator, kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(defective uint8 HxWx3 copy, bool HxW mask); kind None: drawn from rng."""
        if image_u8_hwc.ndim != 3 or image_u8_hwc.shape[2] != 3 or image_u8_hwc.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image_u8_hwc.dtype} {image_u8_hwc.shape}")
        if kind is not None:
            _check_kinds((kind,))
        scene = _Scene.of(image_u8_hwc, self.foreground_mask(image_u8_hwc))
        kind = kind or self.kinds[int(rng.integers(len(self.kinds)))]
        for name in (kind,) * _TRIES + ("pit",) * _TRIES:
            out, mask, big_enough = scene.apply(*_DRAW[name](scene, rng))
            if big_enough:
                return out, mask
        out, mask, _ = scene.apply(*_pit(scene, rng, per_pixel=True))
        return out, mask
