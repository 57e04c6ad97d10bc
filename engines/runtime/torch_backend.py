"""The torch backend: the trained model run as is — the CPU reference of the parity tests, and on device = "cuda"
the GPU engine where TensorRT is not installed (fp32, or fp16/bf16 autocast) and the GPU reference for parity.

On CUDA each batch size gets one captured CUDA graph of the whole forward pass, fixed schedule included (the
stage noises live on the device, so nothing is copied from the host inside the graph), replayed from a static
input fed by a pinned host buffer (`CudaGraphs`). Every capture and replay runs in the engine's device context on
a stream of that device, in thread-local capture mode: torch's current device is per thread, and the daemon loads
a SKU on its changeover thread while the old engine infers on the inference thread. A failed capture is logged
with torch's reason and that batch size runs eagerly; the SKU still loads.

The speed levers of TorchSettings (channels_last, cudnn_benchmark, compile, preprocess_on_device) are off by
default; each is measured by `bench/latency.py --backends torch+LEVER` (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.runtime.config import TORCH_LEVERS, TorchSettings
from foundation.errors import DataError, EngineError, first_line
from foundation.gpu import torch_cuda_device
from foundation.log import get_logger
from tdad.manifest import Reconstruction
from tdad.model import TDADModel, load_sku
from tdad.preprocess import preprocess, preprocess_tensor

log = get_logger(__name__)

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# a capture checks only its own thread's CUDA calls ("global", torch's default, fails the capture, or the other
# thread's call, when another engine infers meanwhile: a changeover)
CAPTURE_ERROR_MODE = "thread_local"


class _Graph:
    """One captured forward pass for a fixed batch size: static input and output tensors plus the graph."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor) -> None:
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class CudaGraphs:
    """One CUDA graph of `forward` per batch size on `device`, captured at a batch size's first call and replayed.

    Capture and replay enter the device's context, and the capture runs on a stream of that device: a capture on
    another device's stream records nothing (torch only warns that the graph is empty) and every replay would
    return the warm-up's output. `cuda` is the torch.cuda API (the CPU tests check the device, stream and
    capture mode with a strict double of it)."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 cuda: Any = torch.cuda) -> None:
        self.forward, self.device, self.cuda = forward, device, cuda
        self._graphs: dict[int, _Graph | None] = {}  # batch -> captured graph, or None where capture failed
        self._pool: Any = None

    def captured(self) -> list[int]:
        """The batch sizes that replay a graph."""
        return sorted(n for n, graph in self._graphs.items() if graph is not None)

    def run(self, host: torch.Tensor) -> torch.Tensor | None:
        """forward(host on the device) as a CPU tensor, replayed from the graph of host's batch size; None where
        that batch size could not be captured (the caller runs it eagerly)."""
        n = host.shape[0]
        with self.cuda.device(self.device):
            if n not in self._graphs:
                self._graphs[n] = self._capture(host)
            graph = self._graphs[n]
            if graph is None:
                return None
            graph.static_in.copy_(host, non_blocking=True)
            graph.graph.replay()
            return graph.static_out.cpu()  # waits for the replay on the current stream

    def _capture(self, host: torch.Tensor) -> _Graph | None:
        """A graph of forward for host's shape and dtype (after warm-up on the capture stream); None when capture
        fails. Called inside the device's context."""
        static_in = torch.zeros(host.shape, dtype=host.dtype, device=self.device)
        try:
            stream = self.cuda.Stream(self.device)
            stream.wait_stream(self.cuda.current_stream(self.device))
            with self.cuda.stream(stream):
                for _ in range(2):  # kernel selection, compilation and allocations happen outside the capture
                    self.forward(static_in)
            self.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = self.cuda.graph_pool_handle()
            graph = self.cuda.CUDAGraph()
            with self.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
                static_out = self.forward(static_in)
            return _Graph(graph, static_in, static_out)
        except RuntimeError as exc:
            self.cuda.synchronize(self.device)
            log.warning("cuda_graph_capture_failed", backend="torch", batch=host.shape[0], error=first_line(exc),
                        fallback="eager launches for this batch size")
            return None


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
        self._graphs: CudaGraphs | None = None
        self._pinned: dict[tuple[int, ...], torch.Tensor] = {}  # host input buffers by shape (CUDA)

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
        if self.settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.settings.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model, self.sku_dir, self.image_size = model, Path(sku_dir), model.config.image_size
        latent = (model.config.latent_channels, model.config.latent_size, model.config.latent_size)
        self._noises = tuple(torch.from_numpy(n).to(self.device) for n in model.schedule.stage_noises(latent))
        if self.settings.compile != "off":  # each network: the DDIM loop between them would recompile per step
            for net in (model.encoder, model.denoiser, model.fusion, model.decoder, model.segmenter):
                net.compile(mode=self.settings.compile, dynamic=False)
        if self.cuda_graphs:
            self._graphs = CudaGraphs(self.forward, self.device)

    def host_input(self, images_u8_nhwc: np.ndarray) -> torch.Tensor:
        """Frames as they cross to the device: float32 N x 3 x S x S preprocessed here, or with
        preprocess_on_device the uint8 frames themselves; on CUDA in a pinned buffer (a direct DMA copy)."""
        frames = images_u8_nhwc if self.settings.preprocess_on_device else preprocess(images_u8_nhwc)
        if self.device.type != "cuda":
            return torch.from_numpy(frames)
        buffer = self._pinned.get(frames.shape)
        if buffer is None:
            dtype = torch.uint8 if self.settings.preprocess_on_device else torch.float32
            with torch.cuda.device(self.device):  # pinned by this device's context, not device 0's
                buffer = torch.empty(frames.shape, dtype=dtype, pin_memory=True)
            self._pinned[frames.shape] = buffer
        buffer.numpy()[...] = frames
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly maps (float32 N x S x S on the device) of host_input's tensor on the device: preprocessed there
        when uint8, in the engine's memory format and precision."""
        assert self.model is not None
        if x.dtype == torch.uint8:
            x = preprocess_tensor(x)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.model.anomaly_maps(x, mode=self.reconstruction, noises=self._noises).float()

    def _run(self, frames_u8_nhwc: np.ndarray) -> torch.Tensor:
        """One chunk: CPU, a replayed CUDA graph, or CUDA eager (in the device's context); float32 maps on the CPU."""
        host = self.host_input(frames_u8_nhwc)
        if self.device.type == "cpu":
            return self.forward(host)
        if self._graphs is not None:
            maps = self._graphs.run(host)
            if maps is not None:
                return maps
        with torch.cuda.device(self.device):
            return self.forward(host.to(self.device, non_blocking=True)).cpu()

    def infer(self, images_u8_nhwc: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 RGB -> float32 N x S x S anomaly maps in [0, 1]."""
        if self.model is None:
            raise EngineError("torch engine: load(sku_dir) must be called before infer()")
        expected = (self.image_size, self.image_size, 3)
        if images_u8_nhwc.ndim != 4 or images_u8_nhwc.shape[1:] != expected or images_u8_nhwc.dtype != np.uint8:
            raise EngineError(f"torch engine: expected uint8 N x {expected} frames, got {images_u8_nhwc.dtype} "
                              f"{images_u8_nhwc.shape}")
        with torch.inference_mode():
            maps = [self._run(images_u8_nhwc[i : i + self.chunk]) for i in range(0, len(images_u8_nhwc), self.chunk)]
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
        """Backend, device, precision, levers, threads, image size, schedule and SKU for status messages and logs."""
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
            "levers": {key: getattr(self.settings, key) for key in TORCH_LEVERS},
        }
        if self.device.type == "cuda":
            info |= {"gpu": torch.cuda.get_device_name(self.device), "cuda_graphs": self.cuda_graphs,
                     "captured_batches": self._graphs.captured() if self._graphs is not None else []}
        return info
