"""A SKU directory's files and their torch-free readers: what the ONNX/TensorRT runtimes and the daemon need.

Kept free of torch so a daemon on ONNX Runtime or TensorRT neither imports nor pays for it at start-up.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.schedule import Schedule
from engines.scoring import DEFAULT_TOP_K
from foundation.errors import ConfigError, DataError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


def preprocess(images_u8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 N x S x S x 3 RGB -> float32 N x 3 x S x S in [0, 1]: the one input transform of every backend."""
    if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[-1] != 3 or images_u8_nhwc.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x S x S x 3 images, got {images_u8_nhwc.dtype} {images_u8_nhwc.shape}")
    return np.ascontiguousarray(images_u8_nhwc.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(1.0 / 255.0)


@dataclass(frozen=True)
class ModelConfig:
    """Network hyper-parameters; the defaults fit 256 px at >= 5 frames/s on two CPU cores."""

    image_size: int = 256
    latent_channels: int = 4
    ae_channels: tuple[int, int, int] = (16, 32, 64)  # at S/2, S/4, S/8
    denoiser_channels: tuple[int, int, int] = (32, 64, 64)  # at latent h, h/2, h/4
    time_dim: int = 128
    cond_channels: int = 8
    fusion_channels: int = 32
    seg_channels: tuple[int, int, int, int] = (16, 32, 48, 64)  # decoder at strides 2, 4, 8, 16

    def __post_init__(self) -> None:
        """Image sizes must divide by 32 (8x latent down-sampling, then two more U-Net halvings)."""
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"image_size={self.image_size}: use a multiple of 32 (e.g. 128 or 256)")

    @property
    def latent_size(self) -> int:
        """Latent height/width (image_size / 8)."""
        return self.image_size // 8

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what meta.json stores under "model")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output (lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, capped, for one-line operator errors."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def read_meta(sku_dir: Path) -> dict[str, Any]:
    """meta.json of a SKU directory; DataError naming the file when missing or malformed."""
    path = sku_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
        ModelConfig.from_dict(meta["model"])
        Schedule.from_dict(meta["schedule"])
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train the SKU first (inspector train) or fix model_dir") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed SKU metadata ({first_line(exc)}); retrain the SKU") from None
    return meta



def score_top_k(sku_dir: Path) -> int:
    """top-k of the image score the SKU was trained with (meta.json "score"."top_k"), shared by all consumers."""
    meta = read_meta(sku_dir)
    try:
        return int(meta.get("score", {}).get("top_k", DEFAULT_TOP_K))
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{sku_dir / META_FILE}: score.top_k is not an integer; retrain the SKU") from None
