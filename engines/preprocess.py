"""The model's input path, shared by training, calibration, INT8 streams and every runtime backend, so
training and serving feed the networks identical tensors for the same image:

    image uint8 H x W x 3  --resize_to_model-->  uint8 S x S x 3  --preprocess-->  float32 3 x S x S in [0, 1]

The daemon crops its ROI before resize_to_model; data sets resize whole images.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_to_model(image_u8_hwc: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: INTER_AREA when shrinking both sides (no aliasing), INTER_LINEAR otherwise."""
    h, w = image_u8_hwc.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image_u8_hwc)
    interp = cv2.INTER_AREA if w > size and h > size else cv2.INTER_LINEAR
    return cv2.resize(image_u8_hwc, (size, size), interpolation=interp)


def preprocess(images_u8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 N x S x S x 3 RGB -> float32 N x 3 x S x S in [0, 1]: the one input transform of every backend."""
    if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[-1] != 3 or images_u8_nhwc.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x S x S x 3 images, got {images_u8_nhwc.dtype} {images_u8_nhwc.shape}")
    return np.ascontiguousarray(images_u8_nhwc.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(1.0 / 255.0)
