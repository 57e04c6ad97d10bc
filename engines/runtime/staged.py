"""The per-part pipeline (encode, two-stage reconstruction, decode, segment) shared by the ONNX Runtime
and TensorRT backends, with an optional stage-by-stage timing that leaves the normal path untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from foundation.errors import DataError, EngineError
from tdad.manifest import MANIFEST_FILE, WEIGHTS_FILE, ExportRecord, SkuManifest, file_sha256, read_manifest
from tdad.preprocess import preprocess
from tdad.schedule import Schedule, residual_reconstruction, two_stage_reconstruct

# the exported graphs of a SKU: one per part, and the whole reconstruction unrolled (when its schedule matches)
PART_NAMES = ("encoder", "denoiser", "fusion", "decoder", "segmenter")
UNROLLED_NAME = "tdad"
STAGES = ("preprocess", "encode", "stage1", "fusion", "stage2", "decode", "segment")


class Parts(Protocol):
    """The five exported graphs of a SKU as callables on the backend's arrays."""

    def encode(self, x_f32_nchw: Any) -> Any:
        """Image batch in [0, 1] -> scaled latents z0."""
        ...

    def denoise(self, z_t: Any, t: int, cond: Any) -> Any:
        """One denoiser call: epsilon at integer timestep t."""
        ...

    def fuse(self, z: Any, z_rec1: Any) -> Any:
        """Stage-2 condition from the input latents and the stage-1 reconstruction."""
        ...

    def zero_cond(self, z: Any) -> Any:
        """The all-zero (unconditional) condition for latents shaped like z."""
        ...

    def decode(self, z: Any) -> Any:
        """Latents -> reconstructed images in [0, 1]."""
        ...

    def segment(self, x: Any, x_rec: Any) -> Any:
        """Images and reconstructions -> anomaly maps N x S x S in [0, 1]."""
        ...

    def sync(self) -> None:
        """Block until queued device work is done (a no-op for synchronous backends)."""
        ...


def preprocess_frames(images_u8_nhwc: np.ndarray, image_size: int) -> np.ndarray:
    """The shared preprocessing, refusing frames that are not N x S x S x 3 at the SKU's image size."""
    if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[1:3] != (image_size, image_size):
        raise EngineError(f"expected N x {image_size} x {image_size} x 3 uint8 frames, got {images_u8_nhwc.shape}")
    return preprocess(images_u8_nhwc)


def load_schedule(manifest: SkuManifest, override: dict[str, Any]) -> Schedule:
    """The SKU's schedule with the config's overrides; EngineError naming the keys when they are invalid."""
    try:
        return manifest.schedule.with_overrides(**override)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"schedule override {override}: {exc}; fix [skus.*] t1/t2/steps1/steps2") from None


def read_sku_manifest(sku_dir: Path) -> SkuManifest:
    """meta.json of the SKU as an EngineError (the engine's caller reports engine failures) when unusable."""
    try:
        return read_manifest(sku_dir)
    except DataError as exc:
        raise EngineError(str(exc)) from None


def check_export(sku_dir: Path, manifest: SkuManifest) -> ExportRecord:
    """The export record, refusing graphs exported from other weights than model.safetensors (e.g. retrained)."""
    fix = f"run: inspector export --sku-dir {sku_dir}"
    export = manifest.export
    if export is None:
        raise EngineError(f"{sku_dir / MANIFEST_FILE} has no export record (the SKU was trained after or without "
                          f"an export); {fix}")
    weights = sku_dir / WEIGHTS_FILE
    if weights.is_file() and export.weights_sha256 != file_sha256(weights):
        raise EngineError(f"the ONNX graphs in {sku_dir} were exported from other weights than {weights.name}; {fix}")
    return export


@dataclass(frozen=True)
class ExportedSku:
    """What every exported-graph backend reads from a SKU dir before creating its sessions or contexts."""

    manifest: SkuManifest
    export: ExportRecord
    image_size: int
    schedule: Schedule
    noises: tuple[np.ndarray, np.ndarray]


def open_exported_sku(sku_dir: Path, override: dict[str, Any]) -> ExportedSku:
    """Validate meta.json and the export record, apply schedule overrides and draw the fixed stage noises."""
    manifest = read_sku_manifest(sku_dir)
    export = check_export(sku_dir, manifest)
    schedule = load_schedule(manifest, override)
    latent_hw = manifest.model.latent_size
    noises = schedule.stage_noises((manifest.model.latent_channels, latent_hw, latent_hw))
    return ExportedSku(manifest, export, manifest.image_size, schedule, noises)


def unrolled_applies(sku: ExportedSku) -> bool:
    """Whether the unrolled graph computes this SKU's maps: it was exported with the schedule in use, or the SKU
    reconstructs nothing (a quick SKU, model.memory_only), so no schedule changes its maps."""
    return sku.manifest.model.memory_only or sku.export.unrolled_schedule == sku.schedule


def reconstruction(parts: Parts, x: Any, z0: Any, z: Any, residual: bool) -> Any:
    """The segmenter's second input from the reconstructed latents z: decode(z), or for a residual SKU
    (manifest model.residual) x + decode(z) - decode(z0) (tdad.schedule.residual_reconstruction)."""
    decoded = parts.decode(z)
    return residual_reconstruction(x, decoded, parts.decode(z0)) if residual else decoded


def run_parts(parts: Parts, x: Any, schedule: Schedule, noise1: Any, noise2: Any, *, residual: bool) -> Any:
    """Anomaly maps for preprocessed images x via the shared two-stage loop."""
    z0 = parts.encode(x)
    z = two_stage_reconstruct(z0, parts.denoise, parts.fuse, parts.zero_cond, schedule, noise1, noise2)
    return parts.segment(x, reconstruction(parts, x, z0, z, residual))


def run_parts_timed(parts: Parts, x: Any, schedule: Schedule, noise1: Any, noise2: Any, *,
                    residual: bool) -> tuple[Any, dict[str, float]]:
    """`run_parts` plus wall milliseconds per stage; stage 1/2 include their DDIM arithmetic.

    Stage boundaries come from timestamps taken around the fusion call, which the loop makes exactly once
    between the two stages, so the loop itself is reused unchanged.
    """
    marks: dict[str, float] = {}

    def fuse(z: Any, z_rec1: Any) -> Any:
        parts.sync()
        marks["fuse_start"] = time.perf_counter()
        cond = parts.fuse(z, z_rec1)
        parts.sync()
        marks["fuse_end"] = time.perf_counter()
        return cond

    t0 = time.perf_counter()
    z0 = parts.encode(x)
    parts.sync()
    t1 = time.perf_counter()
    z = two_stage_reconstruct(z0, parts.denoise, fuse, parts.zero_cond, schedule, noise1, noise2)
    parts.sync()
    t2 = time.perf_counter()
    x_rec = reconstruction(parts, x, z0, z, residual)
    parts.sync()
    t3 = time.perf_counter()
    maps = parts.segment(x, x_rec)
    parts.sync()
    t4 = time.perf_counter()
    ms = {
        "encode": t1 - t0,
        "stage1": marks["fuse_start"] - t1,
        "fusion": marks["fuse_end"] - marks["fuse_start"],
        "stage2": t2 - marks["fuse_end"],
        "decode": t3 - t2,
        "segment": t4 - t3,
    }
    return maps, {k: v * 1e3 for k, v in ms.items()}


def infer_timed(frames_u8_nhwc: np.ndarray, image_size: int, whole: Callable[[Any], Any] | None, parts: Parts,
                schedule: Schedule, noise1: Any, noise2: Any, *, residual: bool) -> tuple[Any, dict[str, float]]:
    """A backend's timed inference: preprocessing, then `whole` (the one graph of a memory-only SKU, which
    reconstructs nothing; timed as its segment stage) when given, else `run_parts_timed` stage by stage."""
    t0 = time.perf_counter()
    x = preprocess_frames(frames_u8_nhwc, image_size)
    pre_ms = (time.perf_counter() - t0) * 1e3
    if whole is not None:
        t1 = time.perf_counter()
        maps = whole(x)
        return maps, {"preprocess": pre_ms, "segment": (time.perf_counter() - t1) * 1e3}
    maps, ms = run_parts_timed(parts, x, schedule, noise1, noise2, residual=residual)
    return maps, {"preprocess": pre_ms, **ms}
