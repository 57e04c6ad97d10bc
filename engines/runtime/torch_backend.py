"""The torch reference backend: the trained model run as is, the yardstick of the parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.model import TDADModel, load_sku
from engines.preprocess import preprocess
from engines.runtime.config import TorchSettings
from foundation.errors import DataError, EngineError


class TorchEngine:
    """Engine backed by TDADModel under torch.inference_mode (fp32, CPU or one CUDA device)."""

    backend = "torch"

    def __init__(self, settings: TorchSettings, *, schedule_override: dict[str, Any] | None = None,
                 chunk: int = 8) -> None:
        """chunk: frames per forward pass; larger inputs are split to bound memory."""
        if settings.precision != "fp32":
            raise EngineError(f"engine.precision={settings.precision!r}: this build's torch engine runs fp32 only")
        self.settings = settings
        self.device = torch.device(f"cuda:{settings.device_id}" if settings.device == "cuda" else "cpu")
        self.threads = settings.threads
        self.schedule_override = schedule_override or {}
        self.chunk = chunk
        self.image_size = 0
        self.model: TDADModel | None = None
        self.sku_dir: Path | None = None

    def load(self, sku_dir: Path) -> None:
        """Load model.safetensors + meta.json; EngineError naming the file when the SKU is unusable."""
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            model = load_sku(Path(sku_dir), self.device)
            model.schedule = model.schedule.with_overrides(**self.schedule_override)
        except DataError as exc:
            raise EngineError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise EngineError(f"schedule override {self.schedule_override}: {exc}; fix [skus.*] t1/t2/steps") from None
        self.model, self.sku_dir, self.image_size = model, Path(sku_dir), model.config.image_size

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 RGB -> float32 N x S x S anomaly maps in [0, 1]."""
        if self.model is None:
            raise EngineError("torch engine: load(sku_dir) must be called before infer()")
        expected = (self.image_size, self.image_size, 3)
        if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[1:] != expected:
            raise EngineError(f"torch engine: expected N x {expected} frames, got {images_u8_nhwc.shape}")
        x = torch.from_numpy(preprocess(images_u8_nhwc)).to(self.device)
        with torch.inference_mode():
            maps = [self.model.anomaly_maps(chunk) for chunk in x.split(self.chunk)]
        return torch.cat(maps).float().cpu().numpy()

    def warmup(self) -> None:
        """One dummy frame through the whole graph (allocations, oneDNN/cuDNN kernel selection)."""
        self.infer(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def describe(self) -> dict[str, Any]:
        """Backend, device, threads, image size, schedule and SKU for status messages and logs."""
        model = self.model
        return {
            "backend": self.backend,
            "device": str(self.device),
            "precision": "fp32",
            "threads": torch.get_num_threads(),
            "image_size": self.image_size,
            "schedule": model.schedule.to_dict() if model else None,
            "sku_dir": str(self.sku_dir) if self.sku_dir else None,
            "torch": torch.__version__,
        }
