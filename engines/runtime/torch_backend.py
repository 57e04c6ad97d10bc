"""The torch backend: the trained model run as is — the CPU reference of the parity tests, and on device = "cuda"
the GPU engine where TensorRT is not installed (fp32, or fp16/bf16 autocast) and the GPU reference for parity.

On CUDA each batch size gets one captured CUDA graph (torch.cuda.CUDAGraph, a shared memory pool) that is
replayed from a static input tensor fed by a pinned host buffer; the fixed stage noises live on the device so
nothing is copied from the host inside the graph. A failed capture is logged with torch's reason and that
batch size runs eagerly; the SKU still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.runtime.config import TorchSettings
from foundation.errors import DataError, EngineError, first_line
from foundation.gpu import torch_cuda_device
from foundation.log import get_logger
from tdad.manifest import Reconstruction
from tdad.model import TDADModel, load_sku
from tdad.preprocess import preprocess

log = get_logger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _Graph:
    """One captured forward pass for a fixed batch size: static input and output tensors plus the graph."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class TorchEngine:
    """Engine backed by TDADModel under torch.inference_mode (CPU fp32, or one CUDA device in fp32/fp16/bf16)."""

    backend = "torch"

    def __init__(self, settings: TorchSettings, *, schedule_override: dict[str, Any] | None = None,
                 chunk: int = 8, reconstruction: Reconstruction | None = None,
                 memory_boost: float | None = None) -> None:
        """chunk: frames per forward pass; larger inputs are split to bound memory. reconstruction: run the
        segmenter on this reconstruction mode instead of the one it was trained with (eval's ablation);
        memory_boost: instead of the SKU's (eval's --memory-boost rows; the SKU must have a memory)."""
        self.settings = settings
        self.precision = settings.precision
        if settings.device == "cuda":
            self.device = torch_cuda_device(settings.device_id, key="engine.device_id")
        else:
            self.device = torch.device("cpu")
        self.threads = settings.threads
        self.schedule_override = schedule_override or {}
        self.chunk = chunk
        self.cuda_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self.reconstruction = reconstruction
        self.memory_boost = memory_boost
        self.image_size = 0
        self.model: TDADModel | None = None
        self.sku_dir: Path | None = None
        self._graphs: dict[int, _Graph | None] = {}  # batch -> captured graph, or None where capture failed
        self._pool: Any = None

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
        if self.memory_boost is not None:
            if not model.config.memory_size:
                raise EngineError(f"{sku_dir}: the SKU has no memory prior (trained with --memory 0), so a memory "
                                  f"boost does not apply; drop --memory-boost")
            model.segmenter.memory_boost = self.memory_boost
        self.model, self.sku_dir, self.image_size = model, Path(sku_dir), model.config.image_size
        latent = (model.config.latent_channels, model.config.latent_size, model.config.latent_size)
        self._noises = tuple(torch.from_numpy(n).to(self.device) for n in model.schedule.stage_noises(latent))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly maps of a preprocessed batch on the device, in the engine's precision, as float32."""
        assert self.model is not None
        dtype = AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.model.anomaly_maps(x, mode=self.reconstruction, noises=self._noises).float()

    def _capture(self, n: int) -> _Graph | None:
        """A CUDA graph of `_forward` for batch n (after warm-up on a side stream); None when capture fails."""
        size = self.image_size
        static_in = torch.zeros((n, 3, size, size), device=self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # kernel selection and allocations happen outside the capture
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self._forward(static_in)
            return _Graph(graph, static_in, static_out)
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            log.warning("cuda_graph_capture_failed", backend=self.backend, batch=n, error=first_line(exc),
                        fallback="eager launches for this batch size")
            return None

    def _run(self, x_host: torch.Tensor) -> torch.Tensor:
        """One chunk: CPU eager, CUDA eager, or a replayed CUDA graph; float32 maps on the CPU."""
        if self.device.type == "cpu":
            return self._forward(x_host)
        n = x_host.shape[0]
        if self.cuda_graphs and n not in self._graphs:
            self._graphs[n] = self._capture(n)
        graph = self._graphs.get(n)
        if graph is None:
            return self._forward(x_host.to(self.device)).cpu()
        graph.static_in.copy_(x_host)
        graph.graph.replay()
        return graph.static_out.cpu()  # waits for the replay on the current stream

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 RGB -> float32 N x S x S anomaly maps in [0, 1]."""
        if self.model is None:
            raise EngineError("torch engine: load(sku_dir) must be called before infer()")
        expected = (self.image_size, self.image_size, 3)
        if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[1:] != expected:
            raise EngineError(f"torch engine: expected N x {expected} frames, got {images_u8_nhwc.shape}")
        x = torch.from_numpy(preprocess(images_u8_nhwc))
        with torch.inference_mode():
            maps = [self._run(chunk) for chunk in x.split(self.chunk)]
        return torch.cat(maps).numpy()

    def warmup(self) -> None:
        """One dummy frame through the whole graph (allocations, kernel selection, the batch-1 CUDA graph)."""
        self.infer(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))

    def device_memory_used(self) -> int:
        """Bytes of GPU memory in use on this device (all processes), for the benchmark; 0 on the CPU."""
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def describe(self) -> dict[str, Any]:
        """Backend, device, precision, threads, image size, schedule and SKU for status messages and logs."""
        model = self.model
        info: dict[str, Any] = {
            "backend": self.backend,
            "device": str(self.device),
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "image_size": self.image_size,
            "schedule": model.schedule.to_dict() if model else None,
            "reconstruction": self.reconstruction or (model.reconstruction if model else None),
            "memory_boost": model.segmenter.memory_boost if model else None,
            "fine_memory": (model.config.fine_memory_size, model.segmenter.fine_boost) if model else None,
            "sku_dir": str(self.sku_dir) if self.sku_dir else None,
            "torch": torch.__version__,
        }
        if self.device.type == "cuda":
            info |= {"gpu": torch.cuda.get_device_name(self.device), "cuda_graphs": self.cuda_graphs,
                     "captured_batches": sorted(n for n, g in self._graphs.items() if g is not None)}
        return info
