"""The fixed-step two-stage DDIM schedule of TDAD, shared by training, export and every runtime.

Everything here is plain numpy plus one array-agnostic loop (`two_stage_reconstruct`) that only does
scalar * array arithmetic, so the torch reference, ONNX Runtime and TensorRT run the very same steps on
bit-identical noise (`fixed_noise`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

A = TypeVar("A")  # the backend's array type: np.ndarray or torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """Linear-beta DDPM noise levels and the two fixed DDIM passes (t1/steps1, then t2/steps2).

    t1=120 (alpha_bar ~0.87, noise std ~0.36 of a unit-std latent): stage 1 is a light, unconditional
    clean-up that keeps layout and fine texture, so its reconstruction is a faithful reference of the part.
    t2=350 (alpha_bar ~0.30, noise std ~0.84): stage 2 noises the stage-1 reconstruction hard enough to
    wash out defects of any size and restores normal appearance guided by the condition fused from the
    input and the stage-1 reconstruction. Five DDIM steps each keep the whole reconstruction at ten
    denoiser calls, inside the 5 frames/s CPU budget.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    t1: int = 120
    steps1: int = 5
    t2: int = 350
    steps2: int = 5
    noise_seed: int = 0

    def __post_init__(self) -> None:
        """Reject schedules the DDIM loop cannot run (caught where an override is parsed)."""
        for name, t, steps in (("t1", self.t1, self.steps1), ("t2", self.t2, self.steps2)):
            if not 0 < t < self.num_train_timesteps:
                raise ValueError(f"schedule {name}={t} must be in 1..{self.num_train_timesteps - 1}")
            if not 0 < steps <= t:
                raise ValueError(f"schedule steps for {name} must be in 1..{t}, got {steps}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what meta.json stores under "schedule")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Rebuild from `to_dict` output, ignoring keys this version does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_overrides(self, **overrides: Any) -> Schedule:
        """A copy with the given fields replaced; None values (unset config overrides) are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """alpha_bar[t] = prod_{s<=t} (1 - beta_s) for t in 0..T-1, float64."""
        betas = np.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=np.float64)
        return np.cumprod(1.0 - betas)

    def alpha_bar(self, t: int) -> float:
        """alpha_bar at timestep t; t < 0 means the clean sample (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha_bars(self, t: np.ndarray) -> np.ndarray:
        """alpha_bar per sample for int timesteps t (N,), as float32 N x 1 x 1 x 1 to broadcast over latents."""
        return self.alphas_cumprod[np.asarray(t)].astype(np.float32).reshape(-1, 1, 1, 1)

    def ddim_timesteps(self, t_start: int, steps: int) -> list[int]:
        """`steps` descending timesteps from t_start, evenly spaced towards 0 (the clean sample)."""
        return [round(float(t)) for t in np.linspace(t_start, 0, steps + 1)[:-1]]

    def stage_noises(self, latent_shape_chw: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The two fixed noises (1 x C x h x w, broadcast over the batch) for stage 1 and stage 2."""
        shape = (1, *latent_shape_chw)
        return fixed_noise(shape, self.noise_seed), fixed_noise(shape, self.noise_seed + 1)


def fixed_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise from numpy's PCG64, bit-identical on every backend and machine."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(shape, dtype=np.float32)


def add_noise(z0: A, noise: A, alpha_bar: float | A) -> A:
    """q(z_t | z_0) = sqrt(alpha_bar) * z0 + sqrt(1 - alpha_bar) * noise: the one noising formula of training
    and every runtime. alpha_bar: one float (`Schedule.alpha_bar(t)`) or one per sample, N x 1 x 1 x 1 of z0's
    array type (`Schedule.alpha_bars(t)` during training)."""
    if isinstance(alpha_bar, float):
        return z0 * math.sqrt(alpha_bar) + noise * math.sqrt(1.0 - alpha_bar)
    return z0 * alpha_bar**0.5 + noise * (1.0 - alpha_bar) ** 0.5


def predict_x0(z_t: A, eps: A, alpha_bar: float | A) -> A:
    """The clean latent implied by an epsilon prediction: add_noise solved for z0. alpha_bar: one float
    (`Schedule.alpha_bar(t)`) or one per sample, N x 1 x 1 x 1 of z_t's array type (training)."""
    if isinstance(alpha_bar, float):
        return (z_t - eps * float(np.sqrt(1.0 - alpha_bar))) * float(1.0 / np.sqrt(alpha_bar))
    return (z_t - eps * (1.0 - alpha_bar) ** 0.5) / alpha_bar**0.5


def ddim_sample(z_t: A, denoise: Callable[[A, int, A], A], cond: A, schedule: Schedule, t_start: int,
                steps: int) -> A:
    """Deterministic DDIM (eta = 0) from z_t at t_start down to the clean latent in `steps` steps."""
    timesteps = schedule.ddim_timesteps(t_start, steps)
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        eps = denoise(z_t, t, cond)
        x0 = predict_x0(z_t, eps, schedule.alpha_bar(t))
        a_prev = schedule.alpha_bar(t_prev)
        z_t = x0 * float(np.sqrt(a_prev)) + eps * float(np.sqrt(1.0 - a_prev))
    return z_t


def stage1_reconstruct(z0: A, denoise: Callable[[A, int, A], A], zero_cond: Callable[[A], A], schedule: Schedule,
                       noise1: A) -> A:
    """Stage 1 alone: noise z0 to t1 with noise1 and DDIM-denoise steps1 steps unconditionally."""
    return ddim_sample(add_noise(z0, noise1, schedule.alpha_bar(schedule.t1)), denoise, zero_cond(z0), schedule,
                       schedule.t1, schedule.steps1)


def two_stage_reconstruct(z0: A, denoise: Callable[[A, int, A], A], fuse: Callable[[A, A], A],
                          zero_cond: Callable[[A], A], schedule: Schedule, noise1: A, noise2: A) -> A:
    """TDAD's two-stage reconstruction of latents z0 (N x C x h x w) on any array backend.

    Stage 1: noise z0 to t1 with noise1 and DDIM-denoise steps1 steps unconditionally
    (cond = zero_cond(z0), the all-zero condition the denoiser was trained to treat as "none").
    Stage 2: cond = fuse(z0, z_rec1); noise the stage-1 reconstruction z_rec1 (as in TDAD: stage 2
    refines stage 1's normal-looking estimate rather than re-noising the defective input) to t2 with
    noise2 and DDIM-denoise steps2 steps with cond. noise1/noise2 are 1 x C x h x w and broadcast.
    """
    z_rec1 = stage1_reconstruct(z0, denoise, zero_cond, schedule, noise1)
    cond = fuse(z0, z_rec1)
    return ddim_sample(add_noise(z_rec1, noise2, schedule.alpha_bar(schedule.t2)), denoise, cond, schedule,
                       schedule.t2, schedule.steps2)


def residual_reconstruction(x: A, decoded: A, decoded_input: A) -> A:
    """The segmenter's reconstruction as the diffusion's edit moved onto the sharp input:
    x + decode(z_rec) - decode(z0), clipped to [0, 1]. The autoencoder's own blur is in both decodes and
    cancels, so a part the diffusion left alone reads as x itself and only what it changed (a healed defect)
    differs; with decode(z_rec) alone every fine texture differs. Measured on both real sets (docs/accuracy.md)."""
    return (x + decoded - decoded_input).clip(0.0, 1.0)  # type: ignore[operator, attr-defined]
