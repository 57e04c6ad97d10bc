"""Anomaly synthesis for training from good images only: noise/region masks filled with foreign texture.

One call turns a good uint8 HxWx3 image into (augmented image, float32 HxW mask in {0, 1}):

mask     multi-scale Perlin noise (random power-of-two lattice per axis and octave, summed, rotated,
         thresholded) or, with probability ``region_prob``, 1-3 large irregular regions (polygons and
         ellipses whose border is roughened with noise); intersected with the object's foreground.
texture  a random image of a texture bank: ``texture_dir`` (DTD-style, any folder of images) when given,
         else the built-in offline bank (tdad.training.textures.BuiltinTextures: procedural textures and
         scikit-image's bundled photos) unless ``textures="self"``; or the image itself cut into shuffled,
         turned patches; or a plain colour ramp; then a random per-channel tone curve.
blend    ``out = (1 - beta) * image + beta * texture`` inside the mask, opacity beta ~ U(beta_range);
         outside the mask the output is the input bit for bit, so the mask is exactly where pixels
         may differ, and it is all zero when no anomaly was drawn (probability ``1 - anomaly_prob``).

Foreground ``"otsu"`` thresholds a blurred grayscale with Otsu and takes the class that does NOT
dominate the image border as the object (parts are imaged on a background that reaches the frame
edge); when the "object" is tiny or reaches much of the border (a full-frame texture, where Otsu only
splits the texture) the whole frame is used; pass ``"none"`` for texture SKUs to skip the guess. ``"none"``
uses the whole frame; a bool HxW array is a fixed per-SKU region. A mask whose overlap with the
foreground is tiny is redrawn up to ``max_tries`` times, then replaced by a small blob centred on a
random foreground pixel, so an anomaly, once drawn, is never empty.

Everything random comes from the ``rng`` passed in, so a seeded generator reproduces the output exactly.
Without one, the synthesizer's own generator (from ``seed``) is used; DataLoader workers each get a copy
of it and would repeat each other, so training passes a per-item generator, e.g.
``np.random.default_rng((seed, epoch, index))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import cv2
import numpy as np

from foundation.errors import ConfigError
from tdad.noise import fractal_perlin, perlin_noise
from tdad.training.textures import BuiltinTextures, TextureBank

Foreground = Literal["otsu", "none"] | np.ndarray
TextureSource = Literal["texture", "self", "plain"]
# the texture bank without a texture_dir: the built-in offline bank, or none (self-patches and plain only)
TextureMix = Literal["builtin", "self"]
TEXTURE_MIXES: tuple[str, ...] = get_args(TextureMix)

def rotate(field: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a 2-D field about its centre, reflecting at the border so no empty corners appear."""
    h, w = field.shape
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(field, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def perlin_mask(size: int, rng: np.random.Generator, min_exp: int = 0, max_exp: int = 6) -> np.ndarray:
    """Bool size x size mask: rotated fractal Perlin noise above a random threshold (1-2 std)."""
    noise = rotate(fractal_perlin(size, rng, min_exp, max_exp), float(rng.uniform(-90.0, 90.0)))
    std = float(noise.std()) or 1.0
    return noise > np.float32(rng.uniform(1.0, 2.0) * std)


def region_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool size x size mask of 1-3 large irregular regions: jagged polygons and ellipses, noisy borders."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(0.15, 0.85, 2) * size
        if rng.random() < 0.5:
            axes = tuple(int(v) for v in rng.uniform(0.06, 0.3, 2) * size + 1)
            cv2.ellipse(canvas, (int(centre[0]), int(centre[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, int(rng.integers(5, 14))))
            radii = rng.uniform(0.05, 0.3, angles.size) * size
            points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
            cv2.fillPoly(canvas, [points.astype(np.int32)], 1)
    k = max(3, (size // 10) | 1)
    soft = cv2.stackBlur(canvas * np.uint8(255), (k, k))
    finest = max(0, int(np.log2(max(size // 8, 1))))
    res = int(2 ** min(3, finest))
    roughness = np.float32(rng.uniform(0.2, 0.5) * 255.0)
    return soft + roughness * perlin_noise((size, size), (res, res), rng) > np.float32(127.5)


def _border(mask: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of a 2-D array, flattened."""
    return np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])


def otsu_foreground(image_u8_hwc: np.ndarray) -> np.ndarray:
    """Bool HxW object mask: Otsu on box-blurred grayscale, object = the class that does not own the border."""
    h, w = image_u8_hwc.shape[:2]
    gray = cv2.cvtColor(image_u8_hwc, cv2.COLOR_RGB2GRAY)
    k = max(3, (min(h, w) // 32) | 1)
    _, binary = cv2.threshold(cv2.blur(gray, (k, k)), 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if _border(binary).mean() > 0.5:
        binary = 1 - binary
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel).astype(bool)


def object_region(image_u8_hwc: np.ndarray) -> np.ndarray | None:
    """The Otsu object where anomalies may go, or None (the whole frame) when it is under 2 % of the frame or
    covers over 20 % of its border: a full-frame texture, where Otsu only splits the texture itself."""
    fg = otsu_foreground(image_u8_hwc)
    return fg if fg.mean() >= 0.02 and _border(fg).mean() <= 0.2 else None


def shuffled_patches(image_u8_hwc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image rolled, cut into a 2x2, 4x4 or 8x8 grid of square patches, shuffled and turned."""
    size = image_u8_hwc.shape[0]
    grid = int(rng.choice([g for g in (2, 4, 8) if size // g >= 4] or [1]))
    patch = size // grid
    side = grid * patch
    shift = (int(rng.integers(size)), int(rng.integers(size)))
    rolled = np.roll(image_u8_hwc, shift, axis=(0, 1))[:side, :side]
    tiles = rolled.reshape(grid, patch, grid, patch, 3).swapaxes(1, 2).reshape(grid * grid, patch, patch, 3)
    tiles = np.rot90(tiles[rng.permutation(grid * grid)], k=int(rng.integers(4)), axes=(1, 2))
    out = np.ascontiguousarray(tiles.reshape(grid, grid, patch, patch, 3).swapaxes(1, 2).reshape(side, side, 3))
    return out if side == size else cv2.resize(out, (size, size), interpolation=cv2.INTER_NEAREST)


def plain_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random colour with a linear brightness ramp in a random direction (paint, stains, missing material)."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    coarse = np.clip(colour + np.float32(rng.uniform(0, 60)) * field[..., None], 0, 255).astype(np.uint8)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)


def random_tone_curve(rng: np.random.Generator) -> np.ndarray:
    """A 256-entry uint8 LUT composing 1-3 of gamma, contrast/brightness, invert, solarize, posterize."""
    x = np.arange(256, dtype=np.float32)
    for op in rng.permutation(5)[: int(rng.integers(1, 4))]:
        if op == 0:
            x = 255.0 * (x / 255.0) ** np.float32(rng.uniform(0.5, 2.0))
        elif op == 1:
            x = (x - 128.0) * np.float32(rng.uniform(0.6, 1.6)) + 128.0 + np.float32(rng.uniform(-40, 40))
        elif op == 2:
            x = 255.0 - x
        elif op == 3:
            x = np.where(x >= rng.uniform(64, 192), 255.0 - x, x)
        else:
            step = np.float32(2 ** int(rng.integers(4, 7)))
            x = np.floor(np.clip(x, 0, 255) / step) * step
        x = np.clip(x, 0, 255)
    return x.astype(np.uint8)


def check_textures(textures: str, texture_dir: Path | None) -> None:
    """ConfigError for an unknown texture mix, or for a texture_dir with textures='self' (which excludes banks)."""
    if textures not in TEXTURE_MIXES:
        raise ConfigError(f"textures={textures!r}: use one of {', '.join(TEXTURE_MIXES)}")
    if textures == "self" and texture_dir is not None:
        raise ConfigError(f"textures='self' uses no texture bank, but texture_dir={texture_dir} was given: drop one")


class AnomalySynthesizer:
    """Turns good image_size x image_size RGB images into (pseudo-anomalous image, mask) training pairs."""

    def __init__(
        self,
        image_size: int,
        texture_dir: Path | None = None,
        foreground: Foreground = "otsu",
        seed: int = 0,
        anomaly_prob: float = 0.5,
        region_prob: float = 0.3,
        beta_range: tuple[float, float] = (0.2, 1.0),
        source_weights: dict[TextureSource, float] | None = None,
        perlin_exp_range: tuple[int, int] = (0, 6),
        min_area_frac: float = 0.002,
        max_tries: int = 3,
        textures: TextureMix = "builtin",
    ) -> None:
        if not 0.0 <= anomaly_prob <= 1.0:
            raise ConfigError(f"anomaly_prob must be in [0, 1], got {anomaly_prob}")
        check_textures(textures, texture_dir)
        self.image_size = image_size
        self.anomaly_prob = anomaly_prob
        self.region_prob = region_prob
        self.beta_range = beta_range
        self.perlin_exp_range = perlin_exp_range
        self.min_area = max(4, int(min_area_frac * image_size * image_size))
        self.max_tries = max_tries
        self.textures: TextureBank | BuiltinTextures | None = None
        if texture_dir is not None:
            self.textures = TextureBank(texture_dir, image_size)
        elif textures == "builtin":
            self.textures = BuiltinTextures(image_size)
        weights = source_weights or {"texture": 0.5, "self": 0.35, "plain": 0.15}
        if self.textures is None:
            weights = {k: v for k, v in weights.items() if k != "texture"}
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(
                f"source_weights need a positive weight for an available source, got {weights} "
                "(the 'texture' source needs texture_dir or textures='builtin')"
            )
        self.sources: tuple[TextureSource, ...] = tuple(weights)
        self.source_p = np.asarray([weights[s] for s in self.sources], np.float64) / total
        self.fixed_foreground = self._fixed_foreground(foreground)
        self.foreground = foreground if isinstance(foreground, str) else "fixed"
        self.rng = np.random.default_rng(seed)

    def _fixed_foreground(self, foreground: Foreground) -> np.ndarray | None:
        """A per-SKU bool mask resized (nearest) to image_size, or None for the otsu/none modes."""
        if isinstance(foreground, str):
            if foreground not in ("otsu", "none"):
                raise ConfigError(f"foreground must be 'otsu', 'none' or a bool HxW array, got {foreground!r}")
            return None
        size = (self.image_size, self.image_size)
        mask = cv2.resize(np.asarray(foreground).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        if not mask.any():
            raise ConfigError("the fixed foreground mask is empty: anomalies would have nowhere to go")
        return mask

    def foreground_mask(self, image_u8_hwc: np.ndarray) -> np.ndarray | None:
        """Where anomalies may go for this image (None = everywhere).

        An Otsu object under 2 % of the frame, or one covering over 20 % of the frame border, means the
        image is a full-frame texture (Otsu split the texture itself), so the whole frame is used.
        """
        if self.fixed_foreground is not None:
            return self.fixed_foreground
        if self.foreground == "none":
            return None
        return object_region(image_u8_hwc)

    def draw_mask(self, rng: np.random.Generator, foreground: np.ndarray | None) -> np.ndarray:
        """A non-empty bool anomaly mask inside the foreground (redrawn if tiny, then a blob on the object)."""
        size = self.image_size
        for _ in range(self.max_tries):
            if rng.random() < self.region_prob:
                mask = region_mask(size, rng)
            else:
                mask = perlin_mask(size, rng, *self.perlin_exp_range)
            if foreground is not None:
                mask &= foreground
            if mask.sum() >= self.min_area:
                return mask
        if foreground is None:
            y, x = (int(v) for v in rng.integers(size, size=2))
        else:
            ys, xs = np.nonzero(foreground)
            pick = int(rng.integers(ys.size))
            y, x = int(ys[pick]), int(xs[pick])
        blob = np.zeros((size, size), np.uint8)
        cv2.circle(blob, (x, y), max(2, int(rng.uniform(0.03, 0.08) * size)), 1, -1)
        mask = blob.astype(bool)
        return mask & foreground if foreground is not None else mask

    def texture(self, image_u8_hwc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uint8 texture the size of the image from a randomly chosen source, with a random tone curve."""
        source = self.sources[int(rng.choice(len(self.sources), p=self.source_p))]
        if source == "texture" and self.textures is not None:
            texture = self.textures.sample(rng)
        elif source == "self":
            texture = shuffled_patches(image_u8_hwc, rng)
        else:
            texture = plain_texture(self.image_size, rng)
        return cv2.LUT(texture, random_tone_curve(rng))

    def __call__(
        self, image_u8_hwc: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(augmented uint8 HxWx3, float32 HxW mask in {0,1}); pixels outside the mask are the input's."""
        expected = (self.image_size, self.image_size, 3)
        if image_u8_hwc.shape != expected or image_u8_hwc.dtype != np.uint8:
            raise ValueError(f"expected a uint8 {expected} image, got {image_u8_hwc.dtype} {image_u8_hwc.shape}")
        rng = self.rng if rng is None else rng
        if rng.random() >= self.anomaly_prob:
            return image_u8_hwc.copy(), np.zeros(expected[:2], np.float32)
        mask = self.draw_mask(rng, self.foreground_mask(image_u8_hwc))
        texture = self.texture(image_u8_hwc, rng)
        beta = float(rng.uniform(*self.beta_range))
        blended = cv2.addWeighted(image_u8_hwc, 1.0 - beta, texture, beta, 0.0)
        out = cv2.copyTo(blended, np.ascontiguousarray(mask).view(np.uint8), image_u8_hwc.copy())
        return out, mask.astype(np.float32)
