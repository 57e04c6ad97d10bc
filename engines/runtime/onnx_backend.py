"""ONNX Runtime backend (CPU by default): the exported graphs of engines/export.py, held to the torch reference.

`infer` runs the unrolled tdad.onnx (one session call per batch) when it was exported with the schedule
in use; otherwise, and for `infer_timed`, the part graphs run the shared two-stage loop
(engines/runtime/staged.py), which accepts any schedule override at run time. Measured on the 256 px
default model, 2 threads: the unrolled graph is ~4 % faster at batch 1-2 (p25 69.8 vs 72.8 ms) and equal
within noise at batch 4 — session-call overhead is small on CPU; it costs ~1.6 s more session creation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engines.precision import check_graph, int8_outdated
from engines.runtime.config import OnnxRuntimeSettings
from engines.runtime.staged import (
    PART_NAMES,
    UNROLLED_NAME,
    infer_timed,
    open_exported_sku,
    preprocess_frames,
    run_parts,
    unrolled_applies,
)
from foundation.errors import EngineError
from foundation.log import get_logger

log = get_logger(__name__)


def session_options(threads: int) -> ort.SessionOptions:
    """Low-latency CPU session: all graph optimisations, sequential execution, `threads` intra-op (0 = ORT's).

    Worker threads do not spin-wait between ops: on a small edge CPU shared with acquisition and MQTT
    threads, spinning steals the cycles the other threads need (measured: p50 172 ms without vs 276 ms
    with spinning for the 256 px SKU on two busy cores).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the optimiser's notes are not operator news
    return options


class _SessionParts:
    """The part graphs as `staged.Parts` on numpy arrays."""

    def __init__(self, sessions: dict[str, ort.InferenceSession]) -> None:
        self.sessions = sessions
        cond_input = next(i for i in sessions["denoiser"].get_inputs() if i.name == "cond")
        self.cond_channels = int(cond_input.shape[1])

    def _run(self, name: str, **feeds: np.ndarray) -> np.ndarray:
        return self.sessions[name].run(None, feeds)[0]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encoder", image=x)

    def denoise(self, z_t: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        return self._run("denoiser", z_t=z_t, t=np.full(z_t.shape[0], t, np.int64), cond=cond)

    def fuse(self, z: np.ndarray, z_rec1: np.ndarray) -> np.ndarray:
        return self._run("fusion", z=z, z_rec1=z_rec1)

    def zero_cond(self, z: np.ndarray) -> np.ndarray:
        return np.zeros((z.shape[0], self.cond_channels, *z.shape[2:]), np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._run("decoder", z=z)

    def segment(self, x: np.ndarray, x_rec: np.ndarray) -> np.ndarray:
        return self._run("segmenter", image=x, reconstruction=x_rec)

    def sync(self) -> None:
        """Session runs are synchronous."""


class OnnxEngine:
    """Engine on ONNX Runtime (CPU provider unless `providers` says otherwise): the fp32 graphs, or their int8
    Q/DQ versions (engines/quantize.py) with precision = "int8"."""

    backend = "onnxruntime"

    def __init__(self, settings: OnnxRuntimeSettings, *, schedule_override: dict[str, Any] | None = None,
                 providers: list[str] | None = None, unrolled: bool = True) -> None:
        self.settings = settings
        self.threads = settings.threads
        self.precision = settings.precision
        self.schedule_override = schedule_override or {}
        self.providers = providers or ["CPUExecutionProvider"]
        self.use_unrolled = unrolled
        self.image_size = 0
        self._unrolled: ort.InferenceSession | None = None

    def _session(self, name: str) -> ort.InferenceSession:
        """A session for graph `name` at the engine's precision; EngineError with the fix when missing or stale."""
        path = check_graph(self.sku_dir, name, self.precision)
        try:
            return ort.InferenceSession(str(path), session_options(self.threads), providers=self.providers)
        except Exception as exc:  # ORT raises its own untyped errors for corrupt/foreign graphs
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({exc}); re-run inspector export "
                              f"--sku-dir {path.parent}") from None

    def load(self, sku_dir: Path) -> None:
        """Create the sessions for the SKU's part graphs (and the unrolled graph when its schedule matches)."""
        self.sku_dir = Path(sku_dir)
        sku = open_exported_sku(self.sku_dir, self.schedule_override)
        self.image_size, self.schedule, self._noises = sku.image_size, sku.schedule, sku.noises
        self._residual = sku.manifest.model.residual  # segmenter input x + decode(z_rec) - decode(z0)
        self._memory_only = sku.manifest.model.memory_only
        if self.precision == "int8" and (outdated := int8_outdated(self.sku_dir, sku.export)):
            log.warning("int8_graphs_outdated", sku_dir=str(self.sku_dir), message=outdated)
        self._parts = _SessionParts({name: self._session(name) for name in PART_NAMES})
        if self.use_unrolled and unrolled_applies(sku):
            self._unrolled = self._session(UNROLLED_NAME)
        log.info("onnx_engine_loaded", sku_dir=str(self.sku_dir), providers=self.providers, threads=self.threads,
                 precision=self.precision, unrolled=self._unrolled is not None)

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float32 N x S x S anomaly maps in [0, 1]."""
        x = preprocess_frames(images_u8_nhwc, self.image_size)
        if self._unrolled is not None:
            return self._unrolled.run(None, {"image": x})[0]
        return run_parts(self._parts, x, self.schedule, *self._noises, residual=self._residual)

    def infer_timed(self, images_u8_nhwc: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """`infer` through the part graphs, with wall milliseconds per stage; a memory-only SKU (nothing
        reconstructed) through its one graph, timed as its segment stage."""
        unrolled = self._unrolled
        whole = (lambda x: unrolled.run(None, {"image": x})[0]) if self._memory_only and unrolled is not None else None
        return infer_timed(images_u8_nhwc, self.image_size, whole, self._parts, self.schedule, *self._noises,
                           residual=self._residual)

    def warmup(self) -> None:
        """One batch of 1 through the session(s) that `infer` uses, so allocations happen now."""
        self.infer(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def describe(self) -> dict[str, Any]:
        """Backend, providers, threads, schedule, which graph runs, versions."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "image_size": self.image_size,
            "providers": self.providers,
            "threads": self.threads,
            "schedule": self.schedule.to_dict(),
            "unrolled": self._unrolled is not None,
            "onnxruntime": ort.__version__,
        }
