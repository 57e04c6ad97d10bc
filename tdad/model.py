"""The TDAD model (autoencoder, denoiser, fusion, segmenter + schedule), its preprocessing and SKU files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from foundation.errors import DataError, first_line
from tdad.manifest import (
    MANIFEST_FILE,
    RECONSTRUCTIONS,
    WEIGHTS_FILE,
    ModelConfig,
    Reconstruction,
    new_manifest,
    read_manifest,
    write_manifest,
)
from tdad.nets.autoencoder import Decoder, Encoder
from tdad.nets.denoiser import Denoiser
from tdad.nets.fusion import Fusion
from tdad.nets.segmenter import Segmenter
from tdad.schedule import Schedule, residual_reconstruction, stage1_reconstruct, two_stage_reconstruct


class TDADModel(nn.Module):
    """Encoder, decoder, denoiser (EMA weights after training), fusion and segmenter plus the schedule.

    `reconstruction` is what the segmenter was trained to compare the input with (the manifest's record):
    anomaly_maps uses it unless told another mode, which is how eval's ablation measures each part.
    """

    def __init__(self, config: ModelConfig, schedule: Schedule | None = None,
                 reconstruction: Reconstruction = "two_stage") -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule or Schedule()
        self.reconstruction: Reconstruction = reconstruction
        c = config
        self.encoder = Encoder(c.ae_channels, c.latent_channels)
        self.decoder = Decoder(c.ae_channels, c.latent_channels)
        self.denoiser = Denoiser(c.latent_channels, c.cond_channels, c.denoiser_channels, c.time_dim)
        self.fusion = Fusion(c.latent_channels, c.cond_channels, c.fusion_channels)
        self.segmenter = Segmenter(c.image_size, c.seg_channels, c.memory_size, c.memory_boost, c.fine_memory_size,
                                   c.fine_boost, c.memory_profile)

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

    def reconstruct_latents(self, z0: torch.Tensor, schedule: Schedule | None = None,
                            noises: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Two-stage reconstruction of scaled latents with the schedule's fixed noise (or `noises`, already on
        z0's device: a CUDA graph cannot capture the host-to-device copy)."""
        schedule = schedule or self.schedule
        if noises is None:
            noises = tuple(torch.from_numpy(n).to(z0) for n in schedule.stage_noises(tuple(z0.shape[1:])))
        return two_stage_reconstruct(z0, self.denoise, self.fusion, self.zero_cond, schedule, *noises)

    def stage1_latents(self, z0: torch.Tensor, schedule: Schedule | None = None,
                       noise1: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1 alone on scaled latents, with the schedule's fixed stage-1 noise (or `noise1`): what stage 2
        is conditioned on, at run time and in training."""
        schedule = schedule or self.schedule
        if noise1 is None:
            noise1 = torch.from_numpy(schedule.stage_noises(tuple(z0.shape[1:]))[0]).to(z0)
        return stage1_reconstruct(z0, self.denoise, self.zero_cond, schedule, noise1)

    def reconstruct(self, x: torch.Tensor, schedule: Schedule | None = None,
                    mode: Reconstruction = "two_stage",
                    noises: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_f32_nchw in [0, 1] -> its reconstruction by `mode` (same shape): "two_stage" (the product),
        "stage1" (stage 1 alone), "autoencoder" (decode(encode(x)), no diffusion), "none" (x). A residual SKU
        (config.residual) returns x + decode(z_rec) - decode(z0) instead of decode(z_rec), so its
        "autoencoder" mode is x itself. `noises`: the two stages' fixed noises already on x's device (for CUDA
        graph capture)."""
        if mode == "none":
            return x
        if mode not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {mode!r}: use one of {', '.join(RECONSTRUCTIONS)}")
        z0 = self.encode(x)
        z = z0
        if mode == "stage1":
            z = self.stage1_latents(z0, schedule, noises[0] if noises is not None else None)
        elif mode == "two_stage":
            z = self.reconstruct_latents(z0, schedule, noises)
        if not self.config.residual:
            return self.decode(z)
        decoded, decoded_input = self.decode(torch.cat([z, z0])).chunk(2)  # one decoder call for both
        return residual_reconstruction(x, decoded, decoded_input)

    def anomaly_maps(self, images_f32_nchw: torch.Tensor, schedule: Schedule | None = None,
                     mode: Reconstruction | None = None,
                     noises: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """N x 3 x S x S in [0, 1] -> anomaly maps N x S x S in [0, 1], reconstructing by `mode` (default: the
        mode the segmenter was trained with)."""
        if self.config.memory_only:  # a quick SKU: its reconstruction and decoder have nothing to add
            return self.segmenter.memory_map(images_f32_nchw)
        rec = self.reconstruct(images_f32_nchw, schedule, mode or self.reconstruction, noises)
        return self.segmenter(images_f32_nchw, rec)


def save_sku(model: TDADModel, sku_dir: Path, **records: Any) -> Path:
    """Write model.safetensors + meta.json into sku_dir (created if needed); returns sku_dir.

    records: manifest fields beside the model's own (train_hash, data_hash, train, note).
    """
    save_weights(model, sku_dir)
    write_manifest(sku_dir, new_manifest(model.config, model.schedule, model.latent_scale,
                                         reconstruction=model.reconstruction, **records))
    return sku_dir


def save_weights(model: TDADModel, sku_dir: Path) -> Path:
    """Write the model's tensors to sku_dir/model.safetensors (sku_dir created if needed); returns the file."""
    sku_dir.mkdir(parents=True, exist_ok=True)
    path = sku_dir / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_sku(sku_dir: Path, device: str | torch.device = "cpu") -> TDADModel:
    """Load a trained SKU directory into an eval-mode TDADModel on `device`."""
    manifest = read_manifest(sku_dir)
    model = TDADModel(manifest.model, manifest.schedule, manifest.reconstruction)
    path = sku_dir / WEIGHTS_FILE
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train the SKU first (inspector train) or fix model_dir") from None
    except (SafetensorError, RuntimeError, OSError) as exc:
        reason = first_line(exc)
        raise DataError(f"{path}: unreadable or not matching {MANIFEST_FILE} ({reason}); retrain the SKU") from None
    return model.to(device).eval()
