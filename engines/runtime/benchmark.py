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
from engines.runtime.config import TORCH_LEVERS
from foundation.errors import EngineError

STAGE_ORDER = ("preprocess", "encode", "stage1", "fusion", "stage2", "decode", "segment")


def make_random_sku(sku_dir: Path, image_size: int = 256, seed: int = 0, export: bool = True, memory: int = 0,
                    fine_memory: int = 0, profile: bool = False) -> Path:
    """A randomly initialised (untrained) SKU of the default architecture with the residual reconstruction (as
    training writes it, so its graphs cost what a trained SKU's do), saved and exported to ONNX.

    The denoiser's zero-initialised output conv is given small random weights so every graph computes
    something non-trivial (parity tests compare real numbers, not zeros). memory / fine_memory: entries of the
    memory prior and of the fine memory, filled as training fills them from rendered good parts, so their searches
    cost what a trained SKU's do and parity compares real distances. profile: the memories' profiles a quick SKU
    has (a trained SKU's memory terms are distance - 1, tdad.training.train.untrained_model).
    """
    import dataclasses

    import torch

    from tdad.model import ModelConfig, TDADModel, save_sku
    from tdad.nets.segmenter import MEMORY_BOOST

    torch.manual_seed(seed)
    config = ModelConfig(image_size=image_size, residual=True)
    if memory:
        config = dataclasses.replace(config, memory_size=memory, memory_boost=MEMORY_BOOST, memory_profile=profile)
    model = TDADModel(config).eval()
    with torch.no_grad():
        model.denoiser.conv_out.weight.normal_(0.0, 0.02)
        if memory or fine_memory:
            _fill_memories(model, Path(sku_dir), memory, fine_memory, seed)
    save_sku(model, Path(sku_dir), train_hash="random-init", note="untrained: for benchmarks and tests")
    if export:
        from engines.export import export_sku

        export_sku(Path(sku_dir))
    return Path(sku_dir)


def _fill_memories(model: Any, sku_dir: Path, memory: int, fine_memory: int, seed: int) -> None:
    """Fill the memory prior (memory entries) and store a fine memory (fine_memory entries) from enough rendered
    brick parts to hold them, as training does (tdad.training.train)."""
    import torch

    from tdad.training.sample_data import render_part
    from tdad.training.train import TrainConfig, fill_memory, store_fine_memory

    size = model.config.image_size
    count = max(2, -(-memory // (size // 8) ** 2), -(-fine_memory // (size // 4) ** 2))
    rng = np.random.default_rng(seed)
    parts = np.stack([render_part("brick", size, rng) for _ in range(count)])
    cpu = torch.device("cpu")
    if memory:
        fill_memory(model, parts, cpu, batch=8, seed=seed)
    cfg = TrainConfig(data=sku_dir, out=sku_dir, image_size=size, fine_memory=fine_memory, batch_size=8, seed=seed)
    store_fine_memory(model, parts, None, cfg, cpu)


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
    levers = [(key, getattr(settings, key)) for key in TORCH_LEVERS if key in type(settings).model_fields]
    changed = [(key, value) for key, value in levers if value != type(settings).model_fields[key].default]
    return "-".join(parts) + "".join(f"+{key}" if value is True else f"+{key}={value}" for key, value in changed)


def parse_engines(specs: str, *, threads: int | None, tensorrt_precision: str, device: str,
                  cuda_graphs: bool) -> list[EngineSettings]:
    """`--backends` entries `backend[:precision][+KEY[=VALUE]...]` as typed settings: onnxruntime:int8, torch:bf16,
    tensorrt:fp16, torch+channels_last+compile=default (KEY: an engine setting of the backend, e.g. a speed lever of
    TorchSettings; a bare KEY means true)."""
    engines = []
    for spec in (s for s in specs.split(",") if s):
        head, *options = spec.split("+")
        backend, _, precision = head.partition(":")
        if backend not in BACKENDS:
            raise EngineError(f"--backends: unknown {backend!r} in {spec!r}; valid are {', '.join(BACKENDS)}")
        keys = {key: value if given else True for key, given, value in (o.partition("=") for o in options)}
        if backend == "tensorrt":
            engines.append(engine_settings(backend, **{"precision": precision or tensorrt_precision,
                                                       "cuda_graphs": cuda_graphs, **keys}))
        elif backend == "torch":
            engines.append(engine_settings(backend, **{"precision": precision or None, "threads": threads,
                                                       "device": device, "cuda_graphs": cuda_graphs, **keys}))
        else:
            engines.append(engine_settings(backend, **{"precision": precision or None, "threads": threads, **keys}))
    return engines


def benchmark(sku_dir: Path, engines: Sequence[EngineSettings], batches: Sequence[int], iters: int) -> dict[str, Any]:
    """Every engine on the SKU, each in its own process; returns the JSON-ready report (see `format_table`)."""
    labels = [engine_label(s) for s in engines]
    if len(set(labels)) < len(labels):  # e.g. cuda_graphs=false on the CPU, where there are no graphs
        twice = sorted({label for label in labels if labels.count(label) > 1})
        raise EngineError(f"--backends: {', '.join(twice)} named more than once (the same engine here)")
    load_before = os.getloadavg()
    results = {label: run_isolated(s, sku_dir, batches, iters) for label, s in zip(labels, engines, strict=True)}
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
    for label, result in results.items():  # each variant against its row without its levers, else the last suffix
        base = label.split("+", 1)[0] if "+" in label else label.rsplit("-", 1)[0]
        base_fps = results.get(base, {}).get("batches", {}) if base != label else {}
        if base_fps and "batches" in result:
            report.setdefault("speedup", {})[f"{label} vs {base}"] = {
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
    w = max([18, *(len(label) for label in report["results"])])  # lever rows have long names
    lines = [f"{'backend':{w}} {'batch':>5} {'frames/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8}"]
    for backend, r in report["results"].items():
        if "error" in r:
            lines.append(f"{backend:{w}} error: {r['error']}")
            continue
        for batch, m in r["batches"].items():
            best = " (best)" if int(batch) == r["best_batch"] else ""
            lines.append(f"{backend:{w}} {batch:>5} {m['fps']:9.2f} {m['p50_ms']:8.1f} {m['p99_ms']:8.1f} "
                         f"{m['min_ms']:8.1f}{best}")
    lines.append("")
    lines.append(f"{'stage ms (batch 1, median)':{w + 10}}" + "".join(f"{s:>10}" for s in (*STAGE_ORDER, "total")))
    for backend, r in report["results"].items():
        stages = r.get("stages_ms_batch1") or {}
        if stages:
            row = [stages.get(s, float("nan")) for s in STAGE_ORDER]
            lines.append(f"{backend:{w + 10}}" + "".join(f"{v:10.1f}" for v in (*row, sum(stages.values()))))
    lines.append("")
    for backend, r in report["results"].items():
        if "error" not in r:
            gpu = r["device_memory_mb"]
            gpu_text = f", GPU memory in use {gpu:.0f} MB" if gpu is not None else ""
            lines.append(f"{backend:{w}} peak RSS {r['peak_rss_mb']:.0f} MB{gpu_text}")
    for backend, x in report.get("speedup_vs_torch_batch1", {}).items():
        lines.append(f"{backend:{w}} {x:.2f}x torch at batch 1")
    for pair, per_batch in report.get("speedup", {}).items():
        lines.append(f"{pair}: " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in per_batch.items()))
    lines.append(f"load average before/after: {report['load_avg_before'][0]:.2f} / {report['load_avg_after'][0]:.2f} "
                 f"on {report['host']['cpus']} CPUs")
    return "\n".join(lines)
