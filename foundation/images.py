"""Image file decoding shared by the data sets (engines) and the folder camera (inspector)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from foundation.errors import DataError


def load_image_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB; DataError naming the file when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {path}: the file is missing, truncated or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding it; DataError naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return height, width
