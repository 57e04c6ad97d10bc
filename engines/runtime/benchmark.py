"""Engine benchmarks (`inspector bench`): frames/s, latency p50/p99, stage times, peak memory per backend.

Each backend runs in its own spawned process, so its peak RSS (getrusage ru_maxrss, the process high-water
mark, which covers native allocations of torch/ONNX Runtime) and its thread settings are its own. Inputs are
random uint8 frames at the SKU's image size; timing does not depend on the weights, so `--random-sku DIR`
writes a randomly initialised (untrained) SKU of the default model and exports it, for benchmarking without
training. Stage times come from the backend's `infer_timed` (part graphs), end-to-end numbers from `infer`
(the path the daemon runs). The load average is recorded: on a shared machine it explains the spread.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.runtime import BACKENDS, EngineSettings, create_engine, engine_settings
from foundation.errors import EngineError

STAGE_ORDER = ("preprocess", "encode", "stage1", "fusion", "stage2", "decode", "segment")


def make_random_sku(sku_dir: Path, image_size: int = 256, seed: int = 0, export: bool = True) -> Path:
    """A randomly initialised (untrained) SKU of the default architecture with the residual reconstruction (as
    training writes it, so its graphs cost what a trained SKU's do), saved and exported to ONNX.

    The denoiser's zero-initialised output conv is given small random weights so every graph computes
    something non-trivial (parity tests compare real numbers, not zeros).
    """
    import torch

    from tdad.model import ModelConfig, TDADModel, save_sku

    torch.manual_seed(seed)
    model = TDADModel(ModelConfig(image_size=image_size, residual=True)).eval()
    with torch.no_grad():
        model.denoiser.conv_out.weight.normal_(0.0, 0.02)
    save_sku(model, Path(sku_dir), train_hash="random-init", note="untrained: for benchmarks and tests")
    if export:
        from engines.export import export_sku

        export_sku(Path(sku_dir))
    return Path(sku_dir)


def _percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


def bench_backend(settings: EngineSettings, sku_dir: Path, batches: Sequence[int], iters: int,
                  seed: int = 0) -> dict[str, Any]:
    """Measure one engine in this process (see `run_isolated` for a fresh process per engine)."""
    engine = create_engine(settings, sku_dir)
    engine.warmup()
    size = engine.image_size
    rng = np.random.default_rng(seed)
    per_batch: dict[str, dict[str, float]] = {}
    for batch in batches:
        frames = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        engine.infer(frames)  # first call at a new batch size allocates
        latencies = []
        for _ in range(iters):
            started = time.perf_counter()
            engine.infer(frames)
            latencies.append(time.perf_counter() - started)
        per_batch[str(batch)] = {
            "fps": batch * len(latencies) / sum(latencies),
            "p50_ms": _percentile_ms(latencies, 50),
            "p99_ms": _percentile_ms(latencies, 99),
            "min_ms": min(latencies) * 1e3,
        }
    stages: dict[str, float] = {}
    infer_timed = getattr(engine, "infer_timed", None)
    if infer_timed is not None:
        frame = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        runs = [infer_timed(frame)[1] for _ in range(max(3, iters // 2))]
        stages = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    device_memory = getattr(engine, "device_memory_used", lambda: 0)()
    best = max(per_batch, key=lambda b: per_batch[b]["fps"])
    return {
        "describe": engine.describe(),
        "batches": per_batch,
        "best_batch": int(best),
        "stages_ms_batch1": stages,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "device_memory_mb": device_memory / 2**20 if device_memory else None,
    }


def _child(args: tuple[Any, ...]) -> dict[str, Any]:
    """Spawned-process entry: one backend, errors returned as data so the parent can report them."""
    try:
        return bench_backend(*args)
    except EngineError as exc:
        return {"error": str(exc)}


def run_isolated(settings: EngineSettings, sku_dir: Path, batches: Sequence[int], iters: int) -> dict[str, Any]:
    """`bench_backend` in a fresh spawned process (own RSS high-water mark, own thread pools)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child, ((settings, sku_dir, list(batches), iters),))


def engine_label(settings: EngineSettings) -> str:
    """A row name for the tables: the backend, then its device, precision and graph mode where not the default."""
    parts = [settings.backend]
    device = getattr(settings, "device", None)
    if device not in (None, "cpu"):
        parts.append(str(device))
    if settings.precision != type(settings).model_fields["precision"].default:
        parts.append(settings.precision)
    if (device == "cuda" or settings.backend == "tensorrt") and not getattr(settings, "cuda_graphs", True):
        parts.append("nographs")
    return "-".join(parts)


def parse_engines(specs: str, *, threads: int | None, tensorrt_precision: str, device: str,
                  cuda_graphs: bool) -> list[EngineSettings]:
    """`--backends` entries `backend[:precision]` (onnxruntime:int8, torch:bf16, tensorrt:fp16) as typed settings."""
    engines = []
    for spec in (s for s in specs.split(",") if s):
        backend, _, precision = spec.partition(":")
        if backend not in BACKENDS:
            raise EngineError(f"--backends: unknown {backend!r} in {spec!r}; valid are {', '.join(BACKENDS)}")
        if backend == "tensorrt":
            engines.append(engine_settings(backend, precision=precision or tensorrt_precision,
                                           cuda_graphs=cuda_graphs))
        elif backend == "torch":
            engines.append(engine_settings(backend, precision=precision or None, threads=threads, device=device,
                                           cuda_graphs=cuda_graphs))
        else:
            engines.append(engine_settings(backend, precision=precision or None, threads=threads))
    return engines


def benchmark(sku_dir: Path, engines: Sequence[EngineSettings], batches: Sequence[int], iters: int) -> dict[str, Any]:
    """Every engine on the SKU, each in its own process; returns the JSON-ready report (see `format_table`)."""
    load_before = os.getloadavg()
    results = {engine_label(s): run_isolated(s, sku_dir, batches, iters) for s in engines}
    report: dict[str, Any] = {
        "sku_dir": str(sku_dir),
        "iters": iters,
        "engines": {engine_label(s): s.model_dump() for s in engines},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "results": results,
    }
    torch_fps = results.get("torch", {}).get("batches", {}).get("1", {}).get("fps")
    for label, result in results.items():  # each variant against its row without the last suffix
        base_fps = results.get(label.rsplit("-", 1)[0], {}).get("batches", {}) if "-" in label else {}
        if base_fps and "batches" in result:
            report.setdefault("speedup", {})[f"{label} vs {label.rsplit('-', 1)[0]}"] = {
                b: m["fps"] / base_fps[b]["fps"] for b, m in result["batches"].items() if b in base_fps}
    if torch_fps:
        report["speedup_vs_torch_batch1"] = {
            b: r["batches"]["1"]["fps"] / torch_fps
            for b, r in results.items()
            if b != "torch" and "1" in r.get("batches", {})
        }
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as plain-text tables: throughput/latency per batch, stages at batch 1, memory."""
    lines = [f"{'backend':18} {'batch':>5} {'frames/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8}"]
    for backend, r in report["results"].items():
        if "error" in r:
            lines.append(f"{backend:18} error: {r['error']}")
            continue
        for batch, m in r["batches"].items():
            best = " (best)" if int(batch) == r["best_batch"] else ""
            lines.append(f"{backend:18} {batch:>5} {m['fps']:9.2f} {m['p50_ms']:8.1f} {m['p99_ms']:8.1f} "
                         f"{m['min_ms']:8.1f}{best}")
    lines.append("")
    lines.append(f"{'stage ms (batch 1, median)':28}" + "".join(f"{s:>10}" for s in (*STAGE_ORDER, "total")))
    for backend, r in report["results"].items():
        stages = r.get("stages_ms_batch1") or {}
        if stages:
            row = [stages.get(s, float("nan")) for s in STAGE_ORDER]
            lines.append(f"{backend:28}" + "".join(f"{v:10.1f}" for v in (*row, sum(stages.values()))))
    lines.append("")
    for backend, r in report["results"].items():
        if "error" not in r:
            gpu = r["device_memory_mb"]
            gpu_text = f", GPU memory in use {gpu:.0f} MB" if gpu is not None else ""
            lines.append(f"{backend:18} peak RSS {r['peak_rss_mb']:.0f} MB{gpu_text}")
    for backend, x in report.get("speedup_vs_torch_batch1", {}).items():
        lines.append(f"{backend:18} {x:.2f}x torch at batch 1")
    for pair, per_batch in report.get("speedup", {}).items():
        lines.append(f"{pair}: " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in per_batch.items()))
    lines.append(f"load average before/after: {report['load_avg_before'][0]:.2f} / {report['load_avg_after'][0]:.2f} "
                 f"on {report['host']['cpus']} CPUs")
    return "\n".join(lines)
