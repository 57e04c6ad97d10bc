"""Train one SKU's TDAD model in three phases: autoencoder, then denoiser + fusion, then segmenter.

One config, one loop, explicit checkpoints. Every random draw of a step (images, synthetic anomalies,
timesteps, noise) comes from a numpy Generator seeded by (seed, phase, step), so a resumed run replays
exactly the batches an uninterrupted one would have seen; the checkpoint only has to hold weights,
optimizer state and the (phase, step) to continue from.

    inspector train --data DIR --out SKU_DIR --preset tiny

Under torchrun each process is one rank of a DistributedDataParallel run (tdad.training.distributed, docs/gpu.md).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from foundation.errors import ConfigError, DataError, first_line
from foundation.files import write_text_atomic
from foundation.gpu import torch_cuda_device
from foundation.log import configure_logging, get_logger
from tdad.manifest import RECONSTRUCTIONS, PreprocessRecord, Reconstruction, TilingRecord, TrainRecord
from tdad.model import ModelConfig, TDADModel, save_sku
from tdad.nets.segmenter import FINE_BOOST, MEMORY_BOOST, PROFILE_ROWS, nearest_distance
from tdad.preprocess import RESIZE_MODES, ResizeMode, preprocess
from tdad.schedule import Schedule, add_noise, predict_x0
from tdad.tiling import TilePlan, random_crop
from tdad.training.data import content_digests, file_list_hash, open_dataset
from tdad.training.distributed import ALONE, Ranks
from tdad.training.synthesis import AnomalySynthesizer, TextureMix, check_textures

log = get_logger(__name__)

PHASES = ("autoencoder", "diffusion", "segmenter")
# the phases a segmenter trained on each reconstruction needs (the others are skipped, their networks stay random)
PHASES_FOR = {"none": ("segmenter",), "autoencoder": ("autoencoder", "segmenter"), "stage1": PHASES,
              "two_stage": PHASES}
STATE_DIR = "train_state"
SELECTION_HOLDOUT = 0.2  # the validation slice inspector train holds out to choose settings on
DEFAULT_FINE_MEMORY = 16384  # fine-memory entries a run stores for setting selection to weigh (docs/accuracy.md)
# lowest stage-2 training timestep: below it restoring a defect needs an epsilon of 1 / sqrt(1 - alpha_bar) > 10x
# the latent difference, and stage 2's DDIM steps (t2 / steps2 apart) never go there
STAGE2_T_MIN = 20
# seconds per step of each phase relative to an autoencoder step (the small preset at 128 px, 2 threads on an idle
# 2-core CPU: 0.17 / 0.24 / 0.70 s; docs/accuracy.md): how the remaining time of phases not yet started is
# estimated from the phase running now
STEP_COST = {"autoencoder": 1.0, "diffusion": 1.4, "segmenter": 4.1}
PROGRESS_EVERY_S = 60.0  # a train_progress log line at most this often (the bar shows it on a terminal)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 64, "batch_size": 8, "ae_steps": 300, "diffusion_steps": 600, "seg_steps": 300},
    "small": {"image_size": 128, "batch_size": 8, "memory": 16384, "inference_memory": 65536, "ae_steps": 1500,
              "diffusion_steps": 3000, "seg_steps": 1500},
    "full": {"image_size": 256, "batch_size": 16, "memory": 16384, "ae_steps": 5000, "diffusion_steps": 20000,
             "seg_steps": 8000},
    # twice the channels (four times the compute) and twice the batch: a GPU run of minutes, hours on a CPU
    "gpu": {"image_size": 256, "batch_size": 32, "width": 2.0, "memory": 32768, "ae_steps": 8000,
            "diffusion_steps": 30000, "seg_steps": 12000},
}


@dataclass
class TrainConfig:
    """Every training knob, named once."""

    data: Path  # data set root
    out: Path  # SKU directory written at the end (checkpoints under out/train_state)
    dataset: str = "folder"  # folder | mvtec | visa
    category: str | None = None  # mvtec/visa category
    image_size: int = 128
    width: float = 1.0  # network widths times this (ModelConfig.widened): capacity, at width^2 the compute
    seg_width: float | None = None  # the segmenter decoder's widths times this instead (None: width)
    batch_size: int = 8
    ae_steps: int = 1500
    diffusion_steps: int = 3000
    seg_steps: int = 1500
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    edge_weight: float = 0.5  # autoencoder: weight of the image-gradient L1 term (keeps edges sharp)
    cond_dropout: float = 0.2  # diffusion: probability of training the conditioned branch with cond = 0
    restore_from_rec1: float = 0.5  # diffusion: share of stage-2 samples noised from the stage-1 reconstruction
    train_t_max: int = 500  # diffusion: timesteps drawn from [0, train_t_max]; covers t1/t2 overrides
    seg_scale_weights: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # segmenter loss at strides 8, 4, 2, 1
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op and OpenCV threads of the main process (0 = CPUs left by the workers)
    amp: bool = True  # bf16 autocast, CUDA only
    texture_dir: Path | None = None  # anomaly textures (e.g. DTD), replacing the built-in bank
    textures: TextureMix = "builtin"  # without texture_dir: built-in offline bank, or "self" (own patches + plain)
    foreground: str = "otsu"  # where synthetic anomalies go: otsu | none
    num_workers: int = 0  # batch-synthesis worker processes (1 torch + 1 OpenCV thread each)
    resize: ResizeMode = "stretch"  # how non-square images become S x S (tdad.preprocess)
    reconstruction: Reconstruction = "two_stage"  # the segmenter's second input (tdad.manifest)
    residual: bool = True  # that input as x + decode(z_rec) - decode(z0), not decode(z_rec) (docs/accuracy.md)
    memory: int = 0  # normal patch descriptors kept for the segmenter's memory prior (0 = none)
    # entries the SKU stores and inference searches (at least memory): a larger fresh sample after training,
    # whose per-step search cost stays memory-sized (docs/accuracy.md)
    inference_memory: int = 0
    # logit per unit of memory distance inference adds to the learnt gain (the SKU's model.memory_boost): how far
    # inference trusts the prior over the decoder's reconstruction evidence, per SKU (docs/accuracy.md)
    memory_boost: float = MEMORY_BOOST
    # an inference-only second memory on a grid twice as fine (0 = none; capped at the training set's cells),
    # stored after training, and the logit per unit of its distance that inference adds (docs/accuracy.md)
    fine_memory: int = 0
    fine_boost: float = FINE_BOOST
    tile_scale: float | None = None  # tiled SKU: model px per source px; each image is scaled, then cropped
    tile_overlap: float = 0.0  # tiled SKU: share of a tile its neighbours overlap at inspection time
    # the smallest defect the line must catch, in camera px (operator input): it set tile_scale / tile_overlap
    # (tdad.tiling.scale_for_defect); None: whole images at the model size
    min_defect_px: float | None = None
    # share of the good images held out of every phase (and the memory) as the validation slice that setting
    # selection measures false positives and synthetic defects on (0 = train on all; fewer than 10 images: none;
    # inspector train holds out SELECTION_HOLDOUT when it chooses settings)
    holdout: float = 0.0
    # the memory prior alone, in seconds: no network is trained, the segmenter's learnt logits are zeroed so the
    # map is sigmoid(memory_boost * (distance - 1) + fine_boost * (fine distance - 1)); the same export, engines,
    # calibration and manifest as a full SKU, so a line inspects while the full model trains
    quick: bool = False
    checkpoint_every: int = 500
    stop_after: int | None = None  # stop with a checkpoint after this many steps in total (time-boxed runs)
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse unknown resize, reconstruction or texture modes and bad tiling before any data is read."""
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize={self.resize!r}: use one of {', '.join(RESIZE_MODES)}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"reconstruction={self.reconstruction!r}: use one of {', '.join(RECONSTRUCTIONS)}")
        if self.tile_scale is not None and self.resize != "stretch":
            raise ConfigError(f"resize={self.resize!r} does not apply to a tiled SKU (tile_scale={self.tile_scale}): "
                              "tiles keep the image's aspect; drop one of them")
        if not math.isfinite(self.memory_boost) or self.memory_boost < 0:
            raise ConfigError(f"memory_boost={self.memory_boost}: use a finite value >= 0 (0 = the learnt gain alone)")
        if not math.isfinite(self.fine_boost) or self.fine_boost < 0:
            raise ConfigError(f"fine_boost={self.fine_boost}: use a finite value >= 0")
        if self.quick and not self.memory:
            raise ConfigError("quick=True needs a memory prior (memory > 0): the quick model is the memory alone")
        if self.fine_memory < 0:
            raise ConfigError(f"fine_memory={self.fine_memory}: use 0 (none) or a number of entries, e.g. 16384")
        if not 0.0 <= self.holdout <= 0.5:
            raise ConfigError(f"holdout={self.holdout}: use a share of the good images in [0, 0.5] (0 = none)")
        self.tiling()  # validates tile_scale and tile_overlap
        check_textures(self.textures, self.texture_dir)

    def tiling(self) -> TilingRecord | None:
        """The SKU's tiling record (None: whole images); ConfigError naming the knob when out of range."""
        if self.tile_scale is None:
            return None
        try:
            return TilingRecord(scale=self.tile_scale, overlap=self.tile_overlap)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(f"tile_{first['loc'][0]}={first['input']}: {first['msg'].lower()}") from None

    def phases(self) -> tuple[str, ...]:
        """The phases the run goes through: the reconstruction mode's, or for a quick SKU the segmenter's alone,
        which fills its memory and takes no step."""
        return ("segmenter",) if self.quick else PHASES_FOR[self.reconstruction]

    def steps(self, phase: str) -> int:
        """Number of optimisation steps of a phase (0 for a phase the run does not go through, and for every phase
        of a quick SKU)."""
        if self.quick or phase not in self.phases():
            return 0
        return {"autoencoder": self.ae_steps, "diffusion": self.diffusion_steps, "segmenter": self.seg_steps}[phase]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict` output."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs.setdefault("textures", "self")  # checkpoints from before the built-in bank trained without one
        kwargs.setdefault("residual", False)  # checkpoints from before the residual reconstruction decoded plainly
        kwargs.setdefault("holdout", 0.0)  # checkpoints from before the validation slice trained on every image
        for key in ("data", "out", "texture_dir"):
            if kwargs.get(key) is not None:
                kwargs[key] = Path(kwargs[key])
        if "seg_scale_weights" in kwargs:
            kwargs["seg_scale_weights"] = tuple(kwargs["seg_scale_weights"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------- batches


TrainImages = np.ndarray | list[np.ndarray]  # N x S x S x 3, or a tiled SKU's scaled images of any size


def draw_images(images: TrainImages, indices: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 N x S x S x 3 training inputs: the images at `indices`, or for a tiled SKU a random S x S crop
    of each (tdad.tiling.random_crop), so the model learns at the scale it inspects."""
    if isinstance(images, np.ndarray):
        return images[indices]
    return np.stack([random_crop(images[i], size, rng) for i in indices])


def square_images(images: TrainImages, size: int, seed: int) -> np.ndarray:
    """One S x S input per training image: the images themselves, or for a tiled SKU a seeded random crop of
    each; what the latent scale and the segmenter's memory prior are fitted on."""
    if isinstance(images, np.ndarray):
        return images
    return draw_images(images, np.arange(len(images)), size, np.random.default_rng([seed, len(PHASES)]))


class StepBatches(Dataset):
    """batch = f(seed, phase, step): good images (or crops of them) and their synthetic-anomaly versions
    (preprocessed, float32 N x 3 x S x S), masks and, for diffusion, the noise, timesteps and their alpha_bar."""

    def __init__(self, cfg: TrainConfig, images_u8_nhwc: TrainImages, phase: str, schedule: Schedule) -> None:
        self.cfg, self.images, self.phase, self.schedule = cfg, images_u8_nhwc, phase, schedule
        self.synth = AnomalySynthesizer(cfg.image_size, cfg.texture_dir, cfg.foreground, seed=cfg.seed,  # type: ignore[arg-type]
                                        textures=cfg.textures)

    def __len__(self) -> int:
        return self.cfg.steps(self.phase)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """The step's batch as numpy arrays (the DataLoader turns them into tensors)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, PHASES.index(self.phase), step])
        source = rng.integers(len(self.images), size=cfg.batch_size)
        clean = draw_images(self.images, source, cfg.image_size, rng)
        pairs = [self.synth(image, rng) for image in clean]
        batch = {"clean": preprocess(clean), "anom": preprocess(np.stack([p[0] for p in pairs])),
                 "mask": np.stack([p[1] for p in pairs])[:, None], "source": source}
        if self.phase == "diffusion":
            n, h = cfg.batch_size, cfg.image_size // 8
            shape = (n, ModelConfig().latent_channels, h, h)
            for name in ("noise_u", "noise_c"):
                batch[name] = rng.standard_normal(shape, dtype=np.float32)
            batch["t_u"] = rng.integers(0, cfg.train_t_max + 1, size=n)
            batch["t_c"] = rng.integers(STAGE2_T_MIN, cfg.train_t_max + 1, size=n)
            batch["keep_cond"] = (rng.random(n) >= cfg.cond_dropout).astype(np.float32)
            batch["from_rec1"] = (rng.random(n) < cfg.restore_from_rec1).astype(np.float32).reshape(n, 1, 1, 1)
            batch["alpha_bar_u"] = self.schedule.alpha_bars(batch["t_u"])
            batch["alpha_bar_c"] = self.schedule.alpha_bars(batch["t_c"])
        return batch


# ----------------------------------------------------------------------------- losses


def autoencoder_loss(model: TDADModel, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """L1 reconstruction + edge_weight * L1 of the horizontal/vertical image gradients."""
    x = batch["anom"]
    rec = model.decode(model.encode(x))

    def grads(im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return im[..., 1:, :] - im[..., :-1, :], im[..., :, 1:] - im[..., :, :-1]

    edge = sum(F.l1_loss(a, b) for a, b in zip(grads(rec), grads(x), strict=True))
    return F.l1_loss(rec, x) + cfg.edge_weight * edge


def diffusion_loss(model: TDADModel, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Unconditional eps-MSE on noised clean latents + stage 2 trained the way it runs.

    Stage 2 as at run time: z_rec1 is the real stage-1 reconstruction of the ANOMALOUS latent (the schedule's
    fixed noise, steps1 DDIM steps, the current denoiser) and cond = fusion(z_anom, z_rec1). The conditioned
    branch sees z_rec1 noised to t_c (or, with p = 1 - restore_from_rec1, the clean latent noised, which is
    where the DDIM path ends up) and learns to restore the CLEAN latent: an x0-MSE, because the epsilon that
    maps a noised anomalous latent to a clean one explodes as t -> 0. cond is zeroed with p = cond_dropout.
    """
    with torch.no_grad():  # float32 latents: under CUDA's bf16 autocast the encoder and denoiser return bf16
        z_clean = model.encode(batch["clean"]).float()
        z_anom = model.encode(batch["anom"]).float()
        z_rec1 = model.stage1_latents(z_anom).float()
    z_u = add_noise(z_clean, batch["noise_u"], batch["alpha_bar_u"])
    loss_u = F.mse_loss(model.denoiser(z_u, batch["t_u"], model.zero_cond(z_u)), batch["noise_u"])
    cond = model.fusion(z_anom, z_rec1) * batch["keep_cond"][:, None, None, None]
    z_c = add_noise(torch.lerp(z_clean, z_rec1, batch["from_rec1"]), batch["noise_c"], batch["alpha_bar_c"])
    loss_c = F.mse_loss(predict_x0(z_c, model.denoiser(z_c, batch["t_c"], cond), batch["alpha_bar_c"]), z_clean)
    return loss_u + loss_c


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on logits with (soft) targets in [0, 1]."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1.0 - p) * (1.0 - target)
    return ((1.0 - p_t) ** gamma * bce).mean()


def downsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """N x 1 x S x S soft mask -> N x 1 x size x size, each cell the mean of its block (S a multiple of size).
    avg_pool2d, not interpolate(mode="area"): CUDA torch 2.11 returns zeros for the latter on these masks, which
    trained every GPU segmenter against all-normal targets at strides 8, 4 and 2 (2026-11-26, H100)."""
    factor = mask.shape[-1] // size
    return mask if factor == 1 else F.avg_pool2d(mask, factor)


def segmenter_loss(model: TDADModel, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Focal + smooth-L1 against the synthetic mask at strides 8, 4, 2, 1, comparing the input with its
    reconstruction by cfg.reconstruction ("none": the input itself, so the segmenter learns from x alone)."""
    x = batch["anom"]
    with torch.no_grad():
        rec = model.reconstruct(x, mode=cfg.reconstruction)
    loss = x.new_zeros(())
    # a training image never matches its own memory entries: served frames are not in the memory either
    logits_per_scale = model.segmenter.logits(x, rec, exclude=batch["source"])
    for weight, logits in zip(cfg.seg_scale_weights, logits_per_scale, strict=True):
        mask = downsample_mask(batch["mask"], logits.shape[-1])
        loss = loss + weight * (focal_loss(logits, mask) + F.smooth_l1_loss(torch.sigmoid(logits), mask))
    return loss


LOSSES: dict[str, Callable[[TDADModel, dict[str, torch.Tensor], TrainConfig], torch.Tensor]] = {
    "autoencoder": autoencoder_loss, "diffusion": diffusion_loss, "segmenter": segmenter_loss}


class PhaseLoss(nn.Module):
    """A phase's loss as a module's forward: what DistributedDataParallel wraps (its forward prepares the averaging
    of the gradients the backward pass computes)."""

    def __init__(self, model: TDADModel, phase: str, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.phase, self.cfg = model, phase, cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return LOSSES[self.phase](self.model, batch, self.cfg)


def phase_modules(model: TDADModel, phase: str) -> list[nn.Module]:
    """The modules a phase trains (everything else is frozen and in eval mode)."""
    return {"autoencoder": [model.encoder, model.decoder], "diffusion": [model.denoiser, model.fusion],
            "segmenter": [model.segmenter]}[phase]


def set_phase(model: TDADModel, phase: str) -> list[nn.Parameter]:
    """Freeze all but the phase's modules; return the parameters to optimise."""
    model.eval().requires_grad_(False)
    params: list[nn.Parameter] = []
    for module in phase_modules(model, phase):
        module.train().requires_grad_(True)
        params += [p for n, p in module.named_parameters() if not n.startswith("backbone.")]
    model.segmenter.backbone.requires_grad_(False)
    return params


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_step(model: TDADModel, phase: str, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], lr: float, cfg: TrainConfig, amp: bool,
               loss_of: nn.Module | None = None) -> torch.Tensor:
    """One optimisation step of a phase at learning rate lr (bf16 autocast when amp); returns the loss (loss_of: the
    phase's PhaseLoss as Ranks.wrap returns it; None: the model's own)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(batch["anom"].device.type, dtype=torch.bfloat16, enabled=amp):
        loss = LOSSES[phase](model, batch, cfg) if loss_of is None else loss_of(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return loss


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


@torch.no_grad()
def fit_latent_scale(model: TDADModel, images_u8_nhwc: np.ndarray, device: torch.device, batch: int) -> float:
    """1 / std of the raw latents of (up to 512) training images, so diffusion sees ~unit-std latents."""
    model.set_latent_scale(1.0)
    zs = [model.encode(torch.from_numpy(preprocess(images_u8_nhwc[i : i + batch])).to(device))
          for i in range(0, min(len(images_u8_nhwc), 512), batch)]
    scale = 1.0 / max(float(torch.cat(zs).std()), 1e-6)
    model.set_latent_scale(scale)
    return scale


def memory_images(images: TrainImages, size: int, overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """What the memory prior samples patches from, and each row's source image: the S x S training images, or
    for a tiled SKU every tile inspection cuts from each scaled image (all of a good part is remembered, not
    one random crop of it)."""
    if isinstance(images, np.ndarray):
        return images, np.arange(len(images))
    tiles = [TilePlan.fit(*image.shape[:2], size, overlap).tile(image) for image in images]
    return np.concatenate(tiles), np.repeat(np.arange(len(images)), [len(t) for t in tiles])


# a memory profile's tensors (Segmenter), measured anew with every memory, so a checkpoint from before may lack them
PROFILE_BUFFERS = ("_center", "_spread", "profile_rows", "profile_owner", "fine_memory_owner")


@torch.no_grad()
def sample_descriptors(describe: Callable[[torch.Tensor], torch.Tensor], images_u8_nhwc: np.ndarray, cell: int,
                       count: int, rng: np.random.Generator, device: torch.device, batch: int,
                       owners: np.ndarray | None, ranks: Ranks = ALONE, cached: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random sample of `count` patch descriptors of the images (describe: N x 3 x S x S -> N x D x S/cell
    x S/cell) and up to 4096 probe descriptors, each with its source image (`owners`, one per row; default: each
    row its own): (sample, its owners, probes, their owners). The sample is drawn before any feature is
    computed, so only the chosen patches are kept (a tiled SKU's tiles have millions of patches). Among ranks each
    describes its share of the image batches and every rank gets the whole sample. cached: every row's
    descriptors already computed (N * S/cell * S/cell x D, row by row; RowDescriptors), taken instead of describe."""
    per_row = (images_u8_nhwc.shape[1] // cell) * (images_u8_nhwc.shape[2] // cell)
    total = len(images_u8_nhwc) * per_row
    pick = rng.choice(total, count, replace=False)
    probe = rng.choice(total, min(4096, total), replace=False)
    wanted = np.union1d(pick, probe)  # sorted: the order the loop below meets them in
    if cached is not None:
        feats = cached[torch.from_numpy(wanted)].to(device)
    else:
        starts = range(0, len(images_u8_nhwc), batch)
        kept = {}
        for i in ranks.mine(starts):
            x = torch.from_numpy(preprocess(images_u8_nhwc[i : i + batch])).to(device)
            f = describe(x)
            rows = wanted[(wanted >= i * per_row) & (wanted < (i + len(x)) * per_row)] - i * per_row
            kept[i] = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])[torch.from_numpy(rows).to(device)]
        every = ranks.gather(kept)
        feats = torch.cat([every[i].to(device) for i in starts])
    sources = np.arange(len(images_u8_nhwc)) if owners is None else np.asarray(owners)
    feat_owners = torch.from_numpy(sources[wanted // per_row]).to(device)
    at_pick = torch.from_numpy(np.searchsorted(wanted, pick)).to(device)
    at_probe = torch.from_numpy(np.searchsorted(wanted, probe)).to(device)
    return feats[at_pick], feat_owners[at_pick], feats[at_probe], feat_owners[at_probe]


def leave_one_out_scale(memory: torch.Tensor, memory_owners: torch.Tensor, probes: torch.Tensor,
                        probe_owners: torch.Tensor) -> float:
    """Mean distance of the probes to their nearest memory entry of another source image: the scale that makes
    a normal patch read ~1."""
    one = memory.new_ones(())
    distances = torch.cat([
        nearest_distance(chunk[:, :, None, None], memory, one, memory_owners[None, None, :] == owners[:, None, None])
        .flatten() for chunk, owners in zip(probes.split(512), probe_owners.split(512), strict=True)])
    return max(float(distances[torch.isfinite(distances)].mean()), 1e-6)


def cached_rows(kept_u8: np.ndarray, rows_u8: np.ndarray, cached: torch.Tensor, grid: int) -> torch.Tensor | None:
    """The descriptors of the kept rows (k x S x S x 3), found by content among rows_u8 (N x S x S x 3) whose
    descriptors `cached` holds (N * grid^2 x D, row by row, as sample_descriptors takes them), as k x D x grid x
    grid; None when a kept row is not among them."""
    where = {row.tobytes(): i for i, row in enumerate(rows_u8)}
    found = [where.get(row.tobytes()) for row in kept_u8]
    if any(i is None for i in found):
        return None
    per_row = cached.view(len(rows_u8), grid, grid, -1)
    return per_row[torch.as_tensor(found)].permute(0, 3, 1, 2)


@torch.no_grad()
def measure_profile(model: TDADModel, which: str, batch: int = 8,
                    described: tuple[np.ndarray, torch.Tensor] | None = None) -> None:
    """Measure a memory's profile (which: "memory" or "fine") on the segmenter's kept good rows: the mean and
    standard deviation at each cell of the rows' distances to the nearest entry of another source image, locally
    averaged over 3 x 3 cells against sampling noise, spreads floored at half their median (a cell every good part
    shows alike must not turn noise into evidence). Called whenever the memory changes (filled, taught). With
    fewer than two rows that have another image's entries the profile is neutral (centre 1, spread 1).
    described: (the rows the memory was filled from, their descriptors under this memory's features, cached), so
    that a refill from cached descriptors (setting selection's folds) runs no backbone pass for the profile."""
    seg = model.segmenter
    keep = seg.profile_owner >= 0
    rows, owners = seg.profile_rows[keep].cpu().numpy(), seg.profile_owner[keep]
    describe = seg.memory_features if which == "memory" else seg.fine_features
    memory, memory_owner, scale = ((seg.memory, seg.memory_owner, seg.memory_scale) if which == "memory" else
                                   (seg.fine_memory, seg.fine_memory_owner, seg.fine_memory_scale))
    center, spread = getattr(seg, f"{which}_center"), getattr(seg, f"{which}_spread")
    queries = cached_rows(rows, described[0], described[1], center.shape[-1]) if described is not None else None

    def of(i: int) -> torch.Tensor:
        if queries is not None:
            return queries[i : i + batch].to(memory.device)
        return describe(torch.from_numpy(preprocess(rows[i : i + batch])).to(memory.device))

    distances = torch.cat([memory.new_zeros(0, 1, *center.shape[-2:]), *(
        nearest_distance(of(i), memory, scale, memory_owner[None, None, :] == owners[i : i + batch, None, None])
        for i in range(0, len(rows), batch))])
    distances = distances[torch.isfinite(distances).flatten(1).all(1)]
    if len(distances) < 2:
        log.warning("memory_profile_neutral", memory=which, rows=len(rows),
                    reason="fewer than two good rows with another image's entries")
        center.fill_(1.0)
        spread.fill_(1.0)
        return
    mean, std = (F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
                 for t in (distances.mean(0, keepdim=True), distances.std(0, keepdim=True)))
    center.copy_(mean)
    spread.copy_(std.clamp_min(0.5 * float(std.median())))


def keep_profile_rows(model: TDADModel, images_u8_nhwc: np.ndarray, owners: np.ndarray | None,
                      rng: np.random.Generator) -> None:
    """Keep up to PROFILE_ROWS random rows of the images (and their source images) in the segmenter, the good
    parts its memory profiles are measured on."""
    seg = model.segmenter
    picked = np.sort(rng.choice(len(images_u8_nhwc), min(PROFILE_ROWS, len(images_u8_nhwc)), replace=False))
    sources = np.arange(len(images_u8_nhwc)) if owners is None else np.asarray(owners)
    seg.profile_rows.zero_()
    seg.profile_owner.fill_(-1)
    seg.profile_rows[: len(picked)] = torch.from_numpy(images_u8_nhwc[picked]).to(seg.profile_rows.device)
    seg.profile_owner[: len(picked)] = torch.from_numpy(sources[picked]).to(seg.profile_owner.device)


def fill_memory(model: TDADModel, images_u8_nhwc: np.ndarray, device: torch.device, batch: int, seed: int,
                owners: np.ndarray | None = None, ranks: Ranks = ALONE, cached: torch.Tensor | None = None) -> float:
    """Fill the segmenter's memory with a seeded random sample of the images' stride-8 patch descriptors, each
    tagged with its source image (`owners`), set memory_scale by leave_one_out_scale and, where the SKU keeps
    a profile, keep its good rows (drawn after the sample, which is the same either way) and measure it; returns
    the scale. cached: the rows' descriptors, already computed (sample_descriptors)."""
    seg = model.segmenter
    rng = np.random.default_rng([seed, len(PHASES)])
    memory, memory_owners, probes, probe_owners = sample_descriptors(
        seg.memory_features, images_u8_nhwc, 8, seg.memory_size, rng, device, batch, owners,
        ranks, cached)
    seg.memory.copy_(memory)
    seg.memory_owner.copy_(memory_owners)
    scale = leave_one_out_scale(memory, memory_owners, probes, probe_owners)
    seg.memory_scale.fill_(scale)
    if seg.memory_profile:
        keep_profile_rows(model, images_u8_nhwc, owners, rng)
        measure_profile(model, "memory", batch, None if cached is None else (images_u8_nhwc, cached))
    return scale


def store_fine_memory(model: TDADModel, remembered: np.ndarray, owners: np.ndarray | None, cfg: TrainConfig,
                      device: torch.device, ranks: Ranks = ALONE, cached: torch.Tensor | None = None) -> None:
    """Give the trained segmenter its fine memory (cfg.fine_memory entries of Segmenter.fine_features, capped at
    the images' cells, scaled like fill_memory's) and cfg.fine_boost; nothing when cfg.fine_memory is 0.
    cached: the rows' fine descriptors, already computed (sample_descriptors)."""
    if not cfg.fine_memory:
        return
    seg = model.segmenter
    size = min(cfg.fine_memory, len(remembered) * (cfg.image_size // 4) ** 2)
    seg.resize_fine_memory(size)
    seg.fine_boost = cfg.fine_boost
    rng = np.random.default_rng([cfg.seed, len(PHASES) + 1])
    memory, memory_owners, probes, probe_owners = sample_descriptors(
        seg.fine_features, remembered, 4, size, rng, device, cfg.batch_size, owners, ranks, cached)
    seg.fine_memory.copy_(memory)
    scale = leave_one_out_scale(memory, memory_owners, probes, probe_owners)
    seg.fine_memory_scale.fill_(scale)
    if seg.memory_profile:  # on the rows fill_memory kept
        seg.fine_memory_owner.copy_(memory_owners)
        measure_profile(model, "fine", cfg.batch_size, None if cached is None else (remembered, cached))
    model.config = dataclasses.replace(model.config, fine_memory_size=size, fine_boost=cfg.fine_boost)
    log.info("fine_memory_stored", entries=size, scale=scale, boost=cfg.fine_boost)


@torch.no_grad()
def remember_all(model: TDADModel, cfg: TrainConfig) -> int:
    """Refill a trained SKU's memory (and its fine memory, where it kept one) from every training image, the
    validation slice included, as a training on all of them would fill it; returns the images remembered.

    Called once the settings are chosen: the slice was held out so that choosing measured unseen good parts;
    after that it is only more good parts, and a memory that covers more normal variation rejects fewer of them.
    """
    images = all_training_images(cfg)
    remember(model, cfg, images)
    return len(images)


def all_training_images(cfg: TrainConfig) -> TrainImages:
    """Every training image, the validation slice included, decoded as load_images does."""
    return load_images(dataclasses.replace(cfg, holdout=0.0))[0]


CACHE_BYTES = 1 << 30  # RowDescriptors of a set larger than this are not kept: each fold describes its rows again


@dataclass(frozen=True)
class RowDescriptors:
    """Every memory and fine-memory patch descriptor of the rows memory_images makes of a set of training images,
    computed once, so that setting selection's folds refill their memories by indexing (remember(described=...))
    instead of running the backbone over the same rows once per fold."""

    owners: np.ndarray  # the source image of each row
    memory: torch.Tensor  # rows x (S/8)^2 x D
    fine: torch.Tensor | None  # rows x (S/4)^2 x D, None for a SKU without a fine memory

    @classmethod
    @torch.no_grad()
    def of(cls, model: TDADModel, cfg: TrainConfig, images: TrainImages) -> RowDescriptors | None:
        """The descriptors of `images` under the model's backbone; None when they would take over CACHE_BYTES."""
        seg, size = model.segmenter, cfg.image_size
        rows, owners = memory_images(images, size, cfg.tile_overlap)
        width = seg.memory.shape[1]
        cells = (size // 8) ** 2 + ((size // 4) ** 2 if model.config.fine_memory_size else 0)
        if len(rows) * cells * width * 4 > CACHE_BYTES:
            return None
        device = next(model.parameters()).device
        memory, fine = [], []
        for i in range(0, len(rows), cfg.batch_size):
            x = torch.from_numpy(preprocess(rows[i : i + cfg.batch_size])).to(device)
            memory.append(seg.memory_features(x).flatten(2).transpose(1, 2))
            if model.config.fine_memory_size:
                fine.append(seg.fine_features(x).flatten(2).transpose(1, 2))
        return cls(owners, torch.cat(memory), torch.cat(fine) if fine else None)

    def rows_of(self, keep: np.ndarray | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The memory and fine descriptors (flat, row by row) of the rows of the images at the sorted indices
        `keep` (all: None), in the order memory_images gives those images' rows."""
        mask = torch.ones(len(self.owners), dtype=torch.bool) if keep is None else torch.from_numpy(
            np.isin(self.owners, keep))
        memory = self.memory[mask].reshape(-1, self.memory.shape[-1])
        return memory, None if self.fine is None else self.fine[mask].reshape(-1, self.fine.shape[-1])


@torch.no_grad()
def remember(model: TDADModel, cfg: TrainConfig, images: TrainImages, keep: np.ndarray | None = None,
             described: RowDescriptors | None = None) -> None:
    """Refill the memory (and the fine memory, where the SKU kept one) from the training images `images`, or only
    those at the sorted indices `keep` (setting selection's folds); described: RowDescriptors.of(images), so the
    backbone is not run again."""
    cached_memory, cached_fine = described.rows_of(keep) if described is not None else (None, None)
    if keep is not None:
        images = images[keep] if isinstance(images, np.ndarray) else [images[i] for i in keep.tolist()]
    remembered, owners = memory_images(images, cfg.image_size, cfg.tile_overlap)
    device = next(model.parameters()).device
    refill_memory(model, remembered, owners, cfg, device, memory_size_for(cfg, len(remembered), inference=True),
                  cached=cached_memory)
    if model.config.fine_memory_size:  # at the size training chose, with the boost the SKU has now
        store_fine_memory(model, remembered, owners, dataclasses.replace(cfg, fine_boost=model.segmenter.fine_boost),
                          device, cached=cached_fine)


@torch.no_grad()
def memory_only(model: TDADModel) -> None:
    """Switch the segmenter's learnt evidence off (heads and memory gain zero), so its final logit is the memory
    terms alone, and mark the model memory_only so that its map skips what has nothing to add (the untrained
    reconstruction and decoder): a quick SKU."""
    seg = model.segmenter
    for head in seg.heads:
        head.weight.zero_()
        head.bias.zero_()
    seg.memory_gain.zero_()
    model.config = dataclasses.replace(model.config, memory_only=True)


def memory_size_for(cfg: TrainConfig, n_rows: int, inference: bool = False) -> int:
    """The memory's entry count in training (cfg.memory) or in the SKU (the larger of cfg.inference_memory and
    cfg.memory), capped at the patch count of the n_rows S x S images it samples."""
    entries = max(cfg.inference_memory, cfg.memory) if inference else cfg.memory
    return min(entries, n_rows * (cfg.image_size // 8) ** 2)


def store_inference_memory(model: TDADModel, remembered: np.ndarray, owners: np.ndarray | None, cfg: TrainConfig,
                           device: torch.device, ranks: Ranks = ALONE) -> None:
    """Refill a trained memory segmenter with the SKU's inference-sized sample (fill_memory at that size: a new
    scale, so a normal patch still reads ~1 to the gain it learnt); nothing when the sizes agree."""
    size = memory_size_for(cfg, len(remembered), inference=True)
    if not model.config.memory_size or size == model.config.memory_size:
        return
    refill_memory(model, remembered, owners, cfg, device, size, ranks)


def refill_memory(model: TDADModel, remembered: np.ndarray, owners: np.ndarray | None, cfg: TrainConfig,
                  device: torch.device, size: int, ranks: Ranks = ALONE, cached: torch.Tensor | None = None) -> None:
    """Give the memory segmenter `size` entries, filled by fill_memory from the remembered rows (the model config's
    entry count follows; cached: their descriptors, already computed)."""
    model.segmenter.resize_memory(size)
    model.config = dataclasses.replace(model.config, memory_size=size)
    log.info("memory_stored", entries=size, rows=len(remembered),
             scale=fill_memory(model, remembered, device, cfg.batch_size, cfg.seed, owners, ranks, cached))


# ----------------------------------------------------------------------------- checkpoints


class Run:
    """Everything a checkpoint holds: model, EMA copies, current optimizer, and where to continue."""

    def __init__(self, cfg: TrainConfig, model: TDADModel) -> None:
        self.cfg, self.model = cfg, model
        self.ema = nn.ModuleDict({"denoiser": copy.deepcopy(model.denoiser), "fusion": copy.deepcopy(model.fusion)})
        self.ema.requires_grad_(False)
        self.phase = 0  # index into PHASES of the phase to run next
        self.step = 0  # completed steps of that phase
        self.optimizer: torch.optim.Optimizer | None = None
        self.losses: dict[str, float] = {}

    @property
    def state_dir(self) -> Path:
        return self.cfg.out / STATE_DIR

    def save(self) -> None:
        """Write weights (safetensors), optimizer state and state.json; state.json last, atomically."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.state_dir / "weights.safetensors"))
        torch.save(self.optimizer.state_dict() if self.optimizer else {}, self.state_dir / "optimizer.pt")
        state = {"phase": self.phase, "step": self.step, "losses": self.losses, "config": self.cfg.to_dict()}
        write_text_atomic(self.state_dir / "state.json", json.dumps(state, indent=2) + "\n")
        log.info("checkpoint_saved", dir=str(self.state_dir), phase=PHASES[min(self.phase, 2)], step=self.step)

    def load(self) -> dict[str, Any]:
        """Restore weights and (phase, step); returns the saved optimizer state for the current phase."""
        path = self.state_dir / "state.json"
        if not path.exists():
            raise DataError(f"{path}: no checkpoint to resume; start without --resume")
        try:
            state = json.loads(path.read_text())
            tensors = load_file(str(self.state_dir / "weights.safetensors"), device=str(self.cfg.device))
            missing, unexpected = self.model.load_state_dict(
                {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
            if unexpected or any(not k.endswith(PROFILE_BUFFERS) for k in missing):  # older runs have no profile
                raise RuntimeError(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            self.phase, self.step, self.losses = state["phase"], state["step"], state["losses"]
            return torch.load(self.state_dir / "optimizer.pt", map_location=self.cfg.device, weights_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
            reason = first_line(exc)
            raise DataError(f"{self.state_dir}: corrupt checkpoint ({reason}); delete it and retrain") from None


def read_checkpoint_config(out: Path) -> TrainConfig:
    """The TrainConfig a checkpoint under out/train_state was started with (for --resume)."""
    path = out / STATE_DIR / "state.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text())["config"])
    except FileNotFoundError:
        raise DataError(f"{path}: no checkpoint to resume; start without --resume") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: corrupt checkpoint state ({exc}); delete {path.parent} and retrain") from None


def checkpoint_finished(out: Path) -> bool:
    """Whether the run checkpointed under out/train_state went through every phase (not stopped part-way)."""
    path = out / STATE_DIR / "state.json"
    try:
        return json.loads(path.read_text())["phase"] >= len(PHASES)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable checkpoint state ({exc}); delete {path.parent} and retrain") from None


class StopFlag:
    """Turns the first Ctrl-C into 'checkpoint at the end of this step and exit'; a second one aborts."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------- the loop


MIN_HOLDOUT_IMAGES = 10  # below this many good images nothing is held out: every image is needed to train


def validation_indices(count: int, holdout: float) -> np.ndarray:
    """Indices (into the sorted file list) of the validation slice: every round(1 / holdout)-th image from the
    middle of the first stride, so it is spread over the set and the same on every run; none for small sets."""
    if holdout <= 0 or count < MIN_HOLDOUT_IMAGES:
        return np.zeros(0, dtype=np.int64)
    every = max(2, round(1.0 / holdout))
    return np.arange(every // 2, count, every)


def load_images(cfg: TrainConfig) -> tuple[TrainImages, str]:
    """The training images (the validation slice left out), decoded and resized once, as uint8 N x S x S x 3
    (for a tiled SKU, a list of the images scaled by tile_scale, cropped per step) plus the data set's
    file-list hash."""
    dataset = open_dataset(cfg.dataset, cfg.data, cfg.category, "train", cfg.image_size,  # type: ignore[arg-type]
                           cfg.resize, tile_scale=cfg.tile_scale)
    held = set(validation_indices(len(dataset), cfg.holdout).tolist())
    images = [dataset[i].image for i in range(len(dataset)) if i not in held]
    log.info("validation_slice", held_out=len(held), training=len(images))
    return (images if cfg.tile_scale is not None else np.stack(images)), file_list_hash(dataset)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(cfg: TrainConfig, processes: int = 1) -> int:
    """Give the main process `threads` torch intra-op and OpenCV threads (0: its share of the CPUs among the
    `processes` of the run on this machine, less its workers) and each DataLoader worker one of each
    (worker_threads), so a run keeps threads + num_workers cores busy per process."""
    threads = cfg.threads if cfg.threads > 0 else max(1, available_cpus() // processes - cfg.num_workers)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def worker_threads(worker_id: int) -> None:
    """DataLoader worker_init_fn: one torch and one OpenCV thread per synthesis worker."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def train_hash(cfg: TrainConfig, data_hash: str) -> str:
    """sha256 over the training files and every knob that changes the weights."""
    runtime_only = ("out", "data", "device", "threads", "num_workers", "checkpoint_every", "stop_after", "progress",
                    "memory_boost", "fine_memory", "fine_boost")  # inference-only: the same weights at any value
    knobs = {k: v for k, v in cfg.to_dict().items() if k not in runtime_only}
    return hashlib.sha256((data_hash + json.dumps(knobs, sort_keys=True)).encode()).hexdigest()


def training_device(name: str) -> torch.device:
    """The device a run trains on; CUDA checked first (a CPU-only torch, no driver or a bad index: one line with
    the fix, before any work) and its convolutions made deterministic."""
    device = torch.device(name)
    if device.type == "cuda":
        device = torch_cuda_device(device.index or 0, key="--device")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device


def untrained_model(cfg: TrainConfig, images: TrainImages,
                    squares: np.ndarray) -> tuple[TDADModel, np.ndarray, np.ndarray | None]:
    """The CPU model train_sku starts from (seeded by the caller's torch.manual_seed), and the images its memory
    prior samples patches from with each row's source image (None: each row its own)."""
    remembered, owners = memory_images(images, cfg.image_size, cfg.tile_overlap) if cfg.memory else (squares, None)
    memory_size = memory_size_for(cfg, len(remembered))
    widened = ModelConfig(image_size=cfg.image_size).widened(cfg.width, cfg.seg_width)
    boost = cfg.memory_boost if memory_size else 0.0
    # a quick SKU's map is the memory terms alone, and standardising them per cell (the profile) raised the
    # validation objective by +0.067 on magnetic_tile (cookies -0.005). Full SKUs keep distance - 1: their
    # validation rose too (+0.006, +0.011), but their test rows lost image AUROC on both sets, a choice that read
    # the test split (docs/accuracy.md, "The memory profile")
    config = dataclasses.replace(widened, memory_size=memory_size, memory_boost=boost, residual=cfg.residual,
                                 memory_profile=bool(memory_size) and cfg.quick)
    return TDADModel(config, reconstruction=cfg.reconstruction), remembered, owners


def remaining_seconds(cfg: TrainConfig, phase_idx: int, steps_left: int, seconds_per_step: float) -> float:
    """Estimated seconds to the end of training: this phase's steps left at its measured pace, later phases' steps
    at that pace scaled by STEP_COST."""
    phase = PHASES[phase_idx]
    later = sum(cfg.steps(p) * STEP_COST[p] / STEP_COST[phase] for p in PHASES[phase_idx + 1 :])
    return (steps_left + later) * seconds_per_step


def train_sku(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) the three training phases and write the SKU directory; returns cfg.out.

    Raises KeyboardInterrupt after writing a checkpoint when interrupted (resume with resume=True);
    returns early with a checkpoint (no SKU files) when cfg.stop_after is reached. Started by torchrun with
    WORLD_SIZE > 1, this process is one rank of the run (train_ranks); cfg.batch_size is the global batch.
    """
    ranks = Ranks.from_env()
    device = training_device(ranks.device_name(cfg.device))
    with ranks.joined(device, cfg.batch_size):
        return train_ranks(cfg, resume, ranks, device)


def train_ranks(cfg: TrainConfig, resume: bool, ranks: Ranks, device: torch.device) -> Path:
    """train_sku as this rank of `ranks` on `device`: each step trains on its slice of the global batch in
    DistributedDataParallel; rank 0 alone logs, shows progress, keeps the EMA, checkpoints and writes the SKU."""
    if not ranks.lead:
        configure_logging("error")
    threads = configure_threads(cfg, ranks.local_world)
    torch.manual_seed(cfg.seed)
    images, data_hash = load_images(cfg)
    squares = square_images(images, cfg.image_size, cfg.seed)
    model, remembered, owners = untrained_model(cfg, images, squares)
    model.to(device)
    run = Run(cfg, model)
    run.ema.to(device)
    if ranks.lead and not resume and (run.state_dir / "state.json").exists():
        log.warning("checkpoint_overwritten", dir=str(run.state_dir), hint="pass --resume to continue it")
    opt_state = run.load() if resume else {}
    use_amp = cfg.amp and device.type == "cuda"
    done_steps = sum(cfg.steps(p) for p in PHASES[: run.phase]) + run.step
    log.info("train_start", out=str(cfg.out), images=len(images), device=str(device), resume=resume,
             phase=PHASES[min(run.phase, 2)], step=run.step, threads=threads, workers=cfg.num_workers,
             ranks=ranks.world, reconstruction=cfg.reconstruction, residual=cfg.residual, resize=cfg.resize,
             tile_scale=cfg.tile_scale,
             textures=str(cfg.texture_dir) if cfg.texture_dir is not None else cfg.textures)

    with StopFlag() as stop:
        for phase_idx in range(run.phase, len(PHASES)):
            phase, total = PHASES[phase_idx], cfg.steps(PHASES[phase_idx])
            if phase not in cfg.phases():
                log.info("phase_skipped", phase=phase, reconstruction=cfg.reconstruction, quick=cfg.quick)
                continue
            start = run.step if phase_idx == run.phase else 0
            run.phase, run.step = phase_idx, start
            if phase == "segmenter" and start == 0 and model.config.memory_size:
                log.info("memory_filled", entries=model.config.memory_size,
                         scale=fill_memory(model, remembered, device, cfg.batch_size, cfg.seed, owners, ranks))
            params = set_phase(model, phase)
            loss_of = ranks.wrap(PhaseLoss(model, phase, cfg), device)
            run.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            if opt_state and start > 0:
                run.optimizer.load_state_dict(opt_state)
            opt_state = {}
            steps = range(start, total)
            loader = DataLoader(StepBatches(cfg, images, phase, model.schedule), batch_size=None,
                                sampler=ranks.mine(steps), num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda", worker_init_fn=worker_threads)
            drawn = ({k: v.to(device, non_blocking=True) for k, v in batch_np.items()} for batch_np in loader)
            log.info("phase_start", phase=phase, steps=total, start=start, lr=cfg.lr, batch_size=cfg.batch_size)
            bar = tqdm(total=total, initial=start, desc=phase, disable=not cfg.progress or not ranks.lead,
                       dynamic_ncols=True)
            t0, loss_value = time.perf_counter(), float("nan")
            last_report = t0
            for step, batch in zip(steps, ranks.shares(drawn, steps, device), strict=True):
                loss = train_step(model, phase, params, run.optimizer, batch, lr_at(step, total, cfg), cfg, use_amp,
                                  loss_of)
                if phase == "diffusion" and ranks.lead:
                    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                    ema_update(run.ema["denoiser"], model.denoiser, decay)
                    ema_update(run.ema["fusion"], model.fusion, decay)
                loss_value, interrupted = ranks.mean_and_any(loss, stop.set)
                run.step, run.losses[phase], done_steps = step + 1, loss_value, done_steps + 1
                now = time.perf_counter()
                per_step = (now - t0) / (step + 1 - start)
                left = remaining_seconds(cfg, phase_idx, total - step - 1, per_step)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{cfg.batch_size / per_step:.1f}",
                                all_left=f"{left / 60:.0f}m")
                if now - last_report >= PROGRESS_EVERY_S:
                    last_report = now
                    log.info("train_progress", phase=phase, step=step + 1, steps=total, loss=round(loss_value, 5),
                             remaining_min=round(left / 60, 1))
                bar.update()
                stopping = interrupted or (cfg.stop_after is not None and done_steps >= cfg.stop_after)
                if ranks.lead and (stopping or run.step % cfg.checkpoint_every == 0):
                    run.save()
                if stopping:
                    bar.close()
                    if interrupted:
                        log.warning("train_interrupted", phase=phase, step=run.step, resume="--resume")
                        raise KeyboardInterrupt
                    return cfg.out
            bar.close()
            seconds = time.perf_counter() - t0
            log.info("phase_done", phase=phase, steps=total, loss=round(loss_value, 5), seconds=round(seconds, 1),
                     images_per_s=round((total - start) * cfg.batch_size / max(seconds, 1e-9), 1))
            if phase == "autoencoder":
                log.info("latent_scale", value=fit_latent_scale(model, squares, device, cfg.batch_size))
            elif phase == "diffusion" and ranks.lead:  # the next phase's wrap gives the EMA to the other ranks
                model.denoiser.load_state_dict(run.ema["denoiser"].state_dict())
                model.fusion.load_state_dict(run.ema["fusion"].state_dict())
            run.step = 0
        run.phase = len(PHASES)
        run.optimizer = None
        if ranks.lead:
            run.save()

    store_inference_memory(model, remembered, owners, cfg, device, ranks)
    store_fine_memory(model, remembered, owners, cfg, device, ranks)
    if not ranks.lead:
        return cfg.out
    if cfg.quick:
        memory_only(model)
    model.eval()
    split = open_dataset(cfg.dataset, cfg.data, cfg.category, "train", cfg.image_size,  # type: ignore[arg-type]
                         cfg.resize, tile_scale=cfg.tile_scale)
    save_sku(model, cfg.out, train_hash=train_hash(cfg, data_hash), data_hash=data_hash,
             train=TrainRecord(losses=run.losses, config=cfg.to_dict()),
             preprocess=PreprocessRecord(resize=cfg.resize), tiling=cfg.tiling(),
             trained_on=content_digests(split))  # the held-out slice too: selection remembers it
    log.info("train_done", sku_dir=str(cfg.out), losses=run.losses)
    return cfg.out
