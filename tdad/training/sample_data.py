"""Synthetic parts and visible defects from scikit-image's bundled textures, for the demo, tests and benches.

Parts are random crops of a real texture (tinted, flipped, rotated), so a model sees natural statistics;
defects are drawn with an exact ground-truth mask (True exactly where a pixel was painted).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from foundation.errors import DataError

# name -> (skimage loader, RGB tint applied to grayscale textures)
_TEXTURES: dict[str, tuple[Callable[[], np.ndarray], tuple[float, float, float]]] = {
    "brick": (skimage.data.brick, (1.0, 0.72, 0.55)),
    "grass": (skimage.data.grass, (0.65, 1.0, 0.55)),
    "gravel": (skimage.data.gravel, (0.9, 0.9, 1.0)),
    "moon": (skimage.data.moon, (1.0, 1.0, 0.95)),
    "immunohistochemistry": (skimage.data.immunohistochemistry, (1.0, 1.0, 1.0)),
}
TEXTURES = tuple(_TEXTURES)
DEFECT_TYPES = ("scratch", "blob", "spot", "missing")


@cache
def texture_rgb(name: str) -> np.ndarray:
    """The full-size uint8 HxWx3 RGB texture (grayscale ones tinted so parts are colour images)."""
    if name not in _TEXTURES:
        raise DataError(f"unknown sample texture {name!r}: choose one of {', '.join(TEXTURES)}")
    loader, tint = _TEXTURES[name]
    image = loader()
    if image.ndim == 2:
        image = np.clip(image[..., None].astype(np.float32) * np.asarray(tint, np.float32), 0, 255)
    image = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    image.setflags(write=False)
    return image


def render_part(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A good part: random crop (50-100 % of the texture), flip and quarter turn, resized to uint8 size x size x 3."""
    source = texture_rgb(texture)
    h, w = source.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = np.rot90(source[y : y + side, x : x + side], k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)


def _contrast_colour(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour far from the mean under the mask (dark on bright parts, bright or saturated on dark ones)."""
    mean = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
    base = np.where(mean > 127, rng.integers(0, 40, 3), rng.integers(200, 256, 3))
    return tuple(int(v) for v in base)


def _scratch(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A thin bent line across a good part of the image."""
    size = mask.shape[0]
    n = int(rng.integers(2, 5))
    start = rng.uniform(0.1, 0.9, 2) * size
    steps = rng.normal(0.0, 0.25 * size, (n - 1, 2))
    points = np.clip(np.vstack([start, start + np.cumsum(steps, axis=0)]), 0, size - 1).astype(np.int32)
    cv2.polylines(mask, [points], False, 1, thickness=max(2, size // 64), lineType=cv2.LINE_8)


def _blob(mask: np.ndarray, rng: np.random.Generator) -> None:
    """An irregular filled polygon, 8-25 % of the side across."""
    size = mask.shape[0]
    centre = rng.uniform(0.2, 0.8, 2) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(6, 12))))
    radii = rng.uniform(0.04, 0.12, angles.size) * size
    points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    cv2.fillPoly(mask, [points.astype(np.int32)], 1)


def _spot(mask: np.ndarray, rng: np.random.Generator) -> None:
    """One to four small round stains."""
    size = mask.shape[0]
    for _ in range(int(rng.integers(1, 5))):
        centre = tuple(int(v) for v in rng.uniform(0.1, 0.9, 2) * size)
        cv2.circle(mask, centre, max(2, int(rng.uniform(0.02, 0.05) * size)), 1, thickness=-1)


def _missing(mask: np.ndarray, rng: np.random.Generator) -> None:
    """A rectangular chunk of material missing."""
    size = mask.shape[0]
    wh = (rng.uniform(0.08, 0.25, 2) * size).astype(int)
    xy = (rng.uniform(0.05, 0.95, 2) * size - wh / 2).astype(int)
    cv2.rectangle(mask, tuple(int(v) for v in xy), tuple(int(v) for v in xy + wh), 1, thickness=-1)


_DRAWERS: dict[str, Callable[[np.ndarray, np.random.Generator], None]] = {
    "scratch": _scratch,
    "blob": _blob,
    "spot": _spot,
    "missing": _missing,
}


def draw_defect(image: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one clearly visible defect on a copy of uint8 HxWx3 image; returns (image, bool HxW mask).

    The mask is True exactly where pixels were painted; kind is random from DEFECT_TYPES unless given.
    """
    kind = kind or DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
    if kind not in _DRAWERS:
        raise DataError(f"unknown defect kind {kind!r}: choose one of {', '.join(DEFECT_TYPES)}")
    mask_u8 = np.zeros(image.shape[:2], np.uint8)
    while not mask_u8.any():
        _DRAWERS[kind](mask_u8, rng)
    mask = mask_u8.astype(bool)
    colour = (0, 0, 0) if kind == "missing" else _contrast_colour(image, mask, rng)
    out = image.copy()
    out[mask] = colour
    return out, mask


def _write_image(path: Path, image_u8: np.ndarray) -> None:
    """Write an RGB (HxWx3) or single-channel image; DataError when the folder is not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.cvtColor(image_u8, cv2.COLOR_RGB2BGR) if image_u8.ndim == 3 else image_u8
    if not cv2.imwrite(str(path), data):
        raise DataError(f"cannot write {path}: check the folder exists and is writable")


def write_good_folder(directory: Path, n: int, size: int, texture: str = "brick", seed: int = 0) -> Path:
    """Write n good parts as <directory>/good_000.png ... (a FolderDataset)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        _write_image(Path(directory) / f"good_{i:03d}.png", render_part(texture, size, rng))
    return Path(directory)


@dataclass(frozen=True)
class SamplePart:
    """One generated part of a sample data set: its split, defect kind ("good" if none), image and mask."""

    split: str
    kind: str
    index: int
    image: np.ndarray
    mask: np.ndarray | None


def sample_parts(
    category: str, n_train: int, n_test_good: int, n_test_bad: int, size: int, seed: int, texture: str | None
) -> Iterator[SamplePart]:
    """Good train parts, good test parts, then test parts with one defect each (kinds cycle DEFECT_TYPES).

    The texture defaults to the category name when it is one of TEXTURES, else brick.
    """
    texture = texture or (category if category in _TEXTURES else "brick")
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        yield SamplePart("train", "good", i, render_part(texture, size, rng), None)
    for i in range(n_test_good):
        yield SamplePart("test", "good", i, render_part(texture, size, rng), None)
    for i in range(n_test_bad):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        image, mask = draw_defect(render_part(texture, size, rng), rng, kind)
        yield SamplePart("test", kind, i, image, mask)


def write_mvtec_tree(
    root: Path,
    category: str = "brick",
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_bad: int = 4,
    size: int = 64,
    seed: int = 0,
    texture: str | None = None,
) -> Path:
    """Write an MVTec AD style category (defect folders named by DEFECT_TYPES, exact masks); returns root."""
    base = Path(root) / category
    for part in sample_parts(category, n_train, n_test_good, n_test_bad, size, seed, texture):
        _write_image(base / part.split / part.kind / f"{part.index:03d}.png", part.image)
        if part.mask is not None:
            mask_path = base / "ground_truth" / part.kind / f"{part.index:03d}_mask.png"
            _write_image(mask_path, part.mask.astype(np.uint8) * 255)
    return Path(root)


def write_visa_tree(
    root: Path,
    category: str = "brick",
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_bad: int = 4,
    size: int = 64,
    seed: int = 0,
    texture: str | None = None,
) -> Path:
    """Write a VisA style category (JPG images, PNG masks, rows merged into split_csv/1cls.csv); returns root."""
    root = Path(root)
    data = root / category / "Data"
    rows: list[dict[str, str]] = []
    for part in sample_parts(category, n_train, n_test_good, n_test_bad, size, seed, texture):
        normal = part.mask is None
        name = f"{part.split}_{part.index:04d}" if normal else f"{part.index:03d}"
        image_path = data / "Images" / ("Normal" if normal else "Anomaly") / f"{name}.JPG"
        _write_image(image_path, part.image)
        mask_rel = ""
        if part.mask is not None:
            mask_path = data / "Masks" / "Anomaly" / f"{name}.png"
            _write_image(mask_path, part.mask.astype(np.uint8))
            mask_rel = mask_path.relative_to(root).as_posix()
        rows.append(
            {
                "object": category,
                "split": part.split,
                "label": "normal" if normal else "anomaly",
                "image": image_path.relative_to(root).as_posix(),
                "mask": mask_rel,
            }
        )

    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["object"] != category] + rows
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return root
