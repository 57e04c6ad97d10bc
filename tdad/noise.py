"""Gradient (Perlin) noise, single and multi-octave: the shape of synthetic anomaly masks and of built-in textures."""

from __future__ import annotations

import cv2
import numpy as np

_SQRT2 = np.float32(np.sqrt(2.0))


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise, float32 HxW in [-1, 1], with res[0] x res[1] lattice cells over the image.

    Vectorised by computing whole lattice rows at once: the image is tiled into ceil(H/ry) x ceil(W/rx)
    cells, every cell shares the same local coordinates, and the four corner gradients are repeated
    along x so each numpy op runs over full image rows.
    """
    h, w = shape
    ry, rx = res
    cy, cx = -(-h // ry), -(-w // rx)
    width = rx * cx
    angles = rng.uniform(0.0, 2.0 * np.pi, (ry + 1, rx + 1))
    grad_y = np.repeat(np.sin(angles).astype(np.float32), cx, axis=1)
    grad_x = np.repeat(np.cos(angles).astype(np.float32), cx, axis=1)
    fy = (np.arange(cy, dtype=np.float32) / cy)[None, :, None]
    fx = np.tile(np.arange(cx, dtype=np.float32) / cx, rx)[None, None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        gy = grad_y[oy : oy + ry, ox * cx : ox * cx + width][:, None, :]
        gx = grad_x[oy : oy + ry, ox * cx : ox * cx + width][:, None, :]
        return gy * (fy - oy) + gx * (fx - ox)

    sx = _fade(fx)
    top = corner(0, 0)
    top += sx * (corner(0, 1) - top)
    bottom = corner(1, 0)
    bottom += sx * (corner(1, 1) - bottom)
    top += _fade(fy) * (bottom - top)
    return np.clip(top.reshape(ry * cy, width)[:h, :w] * _SQRT2, -1.0, 1.0)


def fractal_perlin(
    size: int, rng: np.random.Generator, min_exp: int = 0, max_exp: int = 6, max_octaves: int = 3
) -> np.ndarray:
    """Sum of 1..max_octaves Perlin octaves (lattice doubling, amplitude halving), float32 size x size.

    The base lattice is 2**a x 2**b cells with a, b ~ U{min_exp..max_exp} independently per axis; no
    lattice is finer than 8 px per cell, so the highest octaves never degenerate into pixel noise.
    Coarse octaves are computed at 8 px per cell and upsampled bilinearly (the noise is smooth at that
    scale), which keeps the cost of a 256 px mask near one full-resolution octave.
    """
    finest = max(0, int(np.log2(max(size // 8, 1))))
    exps = rng.integers(min_exp, max_exp + 1, 2).clip(0, finest)
    noise = np.zeros((size, size), np.float32)
    amplitude = np.float32(1.0)
    for octave in range(int(rng.integers(1, max_octaves + 1))):
        ry, rx = (int(2 ** min(int(e) + octave, finest)) for e in exps)
        shape = (min(size, 8 * ry), min(size, 8 * rx))
        layer = perlin_noise(shape, (ry, rx), rng)
        if shape != (size, size):
            layer = cv2.resize(layer, (size, size), interpolation=cv2.INTER_LINEAR)
        noise += amplitude * layer
        amplitude *= np.float32(0.5)
    return noise
