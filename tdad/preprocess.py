"""The model's input path, shared by training, calibration, INT8 streams and every runtime backend, so
training and serving feed the networks identical tensors for the same image:

    image uint8 H x W x 3  --resize_to_model-->  uint8 S x S x 3  --preprocess-->  float32 3 x S x S in [0, 1]

The daemon crops its ROI before resize_to_model; data sets resize whole images. How a frame that is not
square becomes S x S is the SKU's `resize` mode (stored in its manifest, so training, eval and the daemon
agree):

stretch    resize both sides to S (the aspect ratio is not kept; the default and the original behaviour)
letterbox  scale the longer side to S, keep the aspect ratio and pad the shorter side evenly with black
crop       scale the shorter side to S, keep the aspect ratio and cut the longer side to its centre S px

Ground-truth masks go through the same geometry with nearest-neighbour sampling (padding is defect-free).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import cv2
import numpy as np

ResizeMode = Literal["stretch", "letterbox", "crop"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)


@dataclass(frozen=True)
class Geometry:
    """Where an H x W source lands in the S x S model input: resized to `resized_hw`, then placed with its
    top-left corner at `offset_xy` model pixels (positive: padding, negative: the part cut away)."""

    size: int
    resized_hw: tuple[int, int]
    offset_xy: tuple[int, int]

    @staticmethod
    def fit(h: int, w: int, size: int, mode: ResizeMode = "stretch") -> Geometry:
        """The geometry of `mode` for an h x w source and an S x S model input."""
        if mode == "stretch":
            return Geometry(size, (size, size), (0, 0))
        if mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
        scale = size / (max(h, w) if mode == "letterbox" else min(h, w))
        rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
        return Geometry(size, (rh, rw), ((size - rw) // 2, (size - rh) // 2))

    def frame_scale_xy(self, h: int, w: int) -> tuple[float, float]:
        """Source pixels per model pixel along x and y."""
        return w / self.resized_hw[1], h / self.resized_hw[0]

    def frame_origin_xy(self, h: int, w: int) -> tuple[int, int]:
        """The source coordinates (rounded) of model pixel (0, 0): source = model * scale + origin."""
        sx, sy = self.frame_scale_xy(h, w)
        return round(-self.offset_xy[0] * sx), round(-self.offset_xy[1] * sy)

    def place(self, resized: np.ndarray) -> np.ndarray:
        """Pad (zeros) or cut the resized array to S x S at offset_xy."""
        ox, oy = self.offset_xy
        rh, rw = self.resized_hw
        if (rh, rw) == (self.size, self.size):
            return np.ascontiguousarray(resized)
        out = np.zeros((self.size, self.size, *resized.shape[2:]), dtype=resized.dtype)
        dst_x, dst_y, src_x, src_y = max(ox, 0), max(oy, 0), max(-ox, 0), max(-oy, 0)
        w, h = min(rw - src_x, self.size - dst_x), min(rh - src_y, self.size - dst_y)
        out[dst_y : dst_y + h, dst_x : dst_x + w] = resized[src_y : src_y + h, src_x : src_x + w]
        return out


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize to h x w: INTER_AREA when shrinking both sides (no aliasing), INTER_LINEAR otherwise."""
    h, w = image.shape[:2]
    if (h, w) == hw:
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if w > hw[1] and h > hw[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (hw[1], hw[0]), interpolation=interp)


def resize_to_model(image_u8_hwc: np.ndarray, size: int, mode: ResizeMode = "stretch") -> np.ndarray:
    """An H x W x 3 image as the S x S x 3 model input, by the SKU's resize mode."""
    geometry = Geometry.fit(*image_u8_hwc.shape[:2], size, mode)
    return geometry.place(resize_image(image_u8_hwc, geometry.resized_hw))


def resize_mask_to_model(mask_hw: np.ndarray, size: int, mode: ResizeMode = "stretch") -> np.ndarray:
    """A bool H x W ground-truth mask through the same geometry as its image (nearest; padding is False)."""
    geometry = Geometry.fit(*mask_hw.shape[:2], size, mode)
    rh, rw = geometry.resized_hw
    resized = cv2.resize(mask_hw.astype(np.uint8), (rw, rh), interpolation=cv2.INTER_NEAREST) > 0
    return geometry.place(resized)


PIXEL_SCALE = np.float32(1.0 / 255.0)  # uint8 -> [0, 1]: one float32 multiply, the same on every device
_PIXEL_SCALE = float(PIXEL_SCALE)  # as a Python float: torch.compile would trace the numpy scalar as a tensor


def preprocess(images_u8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 N x S x S x 3 RGB -> float32 N x 3 x S x S in [0, 1]: the one input transform of every backend."""
    if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[-1] != 3 or images_u8_nhwc.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x S x S x 3 images, got {images_u8_nhwc.dtype} {images_u8_nhwc.shape}")
    x = np.ascontiguousarray(images_u8_nhwc.transpose(0, 3, 1, 2), dtype=np.float32)  # a new array: uint8 in
    x *= PIXEL_SCALE  # in place, so the per-frame path allocates one batch, not two
    return x


def preprocess_tensor(images_u8_nhwc: Any) -> Any:
    """`preprocess` on a torch uint8 N x S x S x 3 tensor where it lies (a GPU: a quarter of the bytes cross the
    bus), bit for bit the same float32 N x 3 x S x S (contiguous); torch is not imported here, so the ONNX path
    stays without it."""
    return images_u8_nhwc.permute(0, 3, 1, 2).contiguous().float().mul_(_PIXEL_SCALE)
