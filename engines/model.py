"""The TDAD model (autoencoder, denoiser, fusion, segmenter + schedule), its preprocessing and SKU files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from engines.nets.autoencoder import Decoder, Encoder
from engines.nets.denoiser import Denoiser
from engines.nets.fusion import Fusion
from engines.nets.segmenter import Segmenter
from engines.schedule import Schedule, two_stage_reconstruct
from engines.scoring import DEFAULT_TOP_K
from inspector.errors import ConfigError, DataError

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


class TDADModel(nn.Module):
    """Encoder, decoder, denoiser (EMA weights after training), fusion and segmenter plus the schedule."""

    def __init__(self, config: ModelConfig, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule or Schedule()
        c = config
        self.encoder = Encoder(c.ae_channels, c.latent_channels)
        self.decoder = Decoder(c.ae_channels, c.latent_channels)
        self.denoiser = Denoiser(c.latent_channels, c.cond_channels, c.denoiser_channels, c.time_dim)
        self.fusion = Fusion(c.latent_channels, c.cond_channels, c.fusion_channels)
        self.segmenter = Segmenter(c.image_size, c.seg_channels)

    @property
    def latent_scale(self) -> float:
        """Factor that brings the raw encoder output to ~unit std."""
        return float(self.encoder.latent_scale)

    def set_latent_scale(self, scale: float) -> None:
        """Store the latent scale in both encoder and decoder (so each exported graph carries it)."""
        self.encoder.latent_scale.fill_(scale)
        self.decoder.latent_scale.fill_(scale)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x_f32_nchw in [0, 1] -> scaled latents N x 4 x S/8 x S/8."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> x_rec_f32_nchw in [0, 1]."""
        return self.decoder(z)

    def denoise(self, z_t: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """The schedule's `denoise` callable: eps for z_t at integer timestep t."""
        return self.denoiser(z_t, torch.full((z_t.shape[0],), t, dtype=torch.int64, device=z_t.device), cond)

    def zero_cond(self, z: torch.Tensor) -> torch.Tensor:
        """The all-zero (unconditional) condition for latents z."""
        return z.new_zeros((z.shape[0], self.config.cond_channels, *z.shape[2:]))

    def reconstruct_latents(self, z0: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """Two-stage reconstruction of scaled latents with the schedule's fixed noise."""
        schedule = schedule or self.schedule
        noise1, noise2 = (torch.from_numpy(n).to(z0) for n in schedule.stage_noises(tuple(z0.shape[1:])))
        return two_stage_reconstruct(z0, self.denoise, self.fusion, self.zero_cond, schedule, noise1, noise2)

    def reconstruct(self, x: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """x_f32_nchw in [0, 1] -> its anomaly-free reconstruction (same shape)."""
        return self.decode(self.reconstruct_latents(self.encode(x), schedule))

    def anomaly_maps(self, images_f32_nchw: torch.Tensor, schedule: Schedule | None = None) -> torch.Tensor:
        """N x 3 x S x S in [0, 1] -> anomaly maps N x S x S in [0, 1]."""
        return self.segmenter(images_f32_nchw, self.reconstruct(images_f32_nchw, schedule))


def code_version() -> str:
    """The installed tdad-inspector version (recorded in meta.json)."""
    try:
        return version("tdad-inspector")
    except PackageNotFoundError:
        return "unknown"


def save_sku(model: TDADModel, sku_dir: Path, meta_extra: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + meta.json into sku_dir (created if needed); returns sku_dir."""
    sku_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(sku_dir / WEIGHTS_FILE))
    meta: dict[str, Any] = {
        "image_size": model.config.image_size,
        "latent_channels": model.config.latent_channels,
        "latent_scale": model.latent_scale,
        "schedule": model.schedule.to_dict(),
        "model": model.config.to_dict(),
        "code_version": code_version(),
        "train_hash": "",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "score": {"top_k": DEFAULT_TOP_K},
        **(meta_extra or {}),
    }
    (sku_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return sku_dir


def _first_line(exc: BaseException) -> str:
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
        raise DataError(f"{path}: malformed SKU metadata ({_first_line(exc)}); retrain the SKU") from None
    return meta


def load_sku(sku_dir: Path, device: str | torch.device = "cpu") -> TDADModel:
    """Load a trained SKU directory into an eval-mode TDADModel on `device`."""
    meta = read_meta(sku_dir)
    model = TDADModel(ModelConfig.from_dict(meta["model"]), Schedule.from_dict(meta["schedule"]))
    path = sku_dir / WEIGHTS_FILE
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train the SKU first (inspector train) or fix model_dir") from None
    except (SafetensorError, RuntimeError, OSError) as exc:
        reason = _first_line(exc)
        raise DataError(f"{path}: unreadable or not matching {META_FILE} ({reason}); retrain the SKU") from None
    return model.to(device).eval()
