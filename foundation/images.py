"""Image file decoding shared by the data sets (tdad.training), the folder camera and MJPG video (inspector).

An image is decoded only when it is intact, because decoders repair damage without an error: OpenCV decodes a
JPEG whose scan data is truncated, zeroed or overwritten into a picture with grey or smeared blocks and only
prints libjpeg's warning (Pillow catches some truncations, none of the rest), and libpng only warns about a
bad CRC of an ancillary chunk. So before OpenCV decodes the pixels (the decode training always used), the
bytes are checked by format:

- JPEG: libjpeg-turbo (simplejpeg) in strict mode, where every libjpeg warning ("Premature end of JPEG file",
  "Corrupt JPEG data: ... extraneous bytes before marker 0xd9", "premature end of data segment", "bad Huffman
  code", ...) is an error. JPEG has no checksum: damage the entropy decoder resynchronises from within a few
  bytes decodes without any warning and cannot be detected from the file.
- PNG: the CRC of every chunk but IEND's, and that IEND is there (Pillow); broken image data then fails
  OpenCV's decode (libpng errors). Not seen: IEND's CRC and extra data after the image, the pixels complete.
- Other formats Pillow reads (BMP, TIFF, ...): Pillow's full decode, which raises on a truncated or broken file.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from foundation.errors import DataError

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_image_rgb(path: Path) -> np.ndarray:
    """Decode an intact image file to uint8 HxWx3 RGB; DataError naming the file when it cannot be read or its
    decoder would have to repair it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image_rgb(data, f"image {path}")


def decode_image_rgb(data: bytes, name: str) -> np.ndarray:
    """Decode intact image bytes (`name`: what they are, for the error) to uint8 HxWx3 RGB with OpenCV.

    Samples deeper than 8 bits are refused, not scaled: OpenCV's 8-bit decode keeps a 16-bit sample's high byte,
    which turns a Mono12 image stored in 16 bits (0-4095) into a black one, and no scaling is known to match the
    8-bit frames the camera path delivers (Mono8, RGB8, BGR8, Bayer 8)."""
    check_intact(data, name)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data else None
    if image is None:
        raise DataError(f"cannot read {name}: empty, truncated or not an image")
    if image.dtype != np.uint8:
        raise DataError(f"cannot use {name}: its samples are {image.dtype} (values up to {image.max():g}), and "
                        "inspection reads 8-bit frames like the camera's Mono8/RGB8; save it as 8-bit, as the "
                        "station's camera delivers it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_intact(data: bytes, name: str) -> None:
    """DataError naming `name` and what the checker said when the image bytes are damaged or truncated, also
    damage that OpenCV's decode would repair silently; a format Pillow does not know passes."""
    try:
        if data.startswith(JPEG_SOI):
            # the smallest scale (1/8) still entropy-decodes every coefficient, where libjpeg's warnings come
            # from, but skips most of the inverse DCT: a third of a full-size decode (2.5 ms per 1-Mpixel JPEG)
            simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
        elif data.startswith(PNG_SIGNATURE):
            with PngImagePlugin.PngImageFile(io.BytesIO(data)) as png:
                png.verify()  # opening checks the CRCs up to the first IDAT, verify() the rest, to IEND
        else:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except UnidentifiedImageError:
        return  # not an image Pillow reads (or no image at all): OpenCV's decode decides
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {name}: damaged or truncated ({exc})") from None


def image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding it; DataError naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return height, width
