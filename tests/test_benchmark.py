"""inspector bench: measurements of a real backend in-process, the printed table, the CLI's flag checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engines.runtime import OnnxRuntimeSettings, benchmark
from foundation.errors import EngineError
from inspector.commands import bench


@pytest.fixture
def sku(exported_random_sku: Path) -> Path:
    return exported_random_sku


def test_bench_backend_measures_throughput_latency_stages_and_memory(sku: Path) -> None:
    result = benchmark.bench_backend(OnnxRuntimeSettings(threads=1), sku, [1, 2], iters=2)
    assert set(result["batches"]) == {"1", "2"}
    for m in result["batches"].values():
        assert m["fps"] > 0 and 0 < m["min_ms"] <= m["p50_ms"] <= m["p99_ms"]
    assert result["best_batch"] in (1, 2)
    assert set(result["stages_ms_batch1"]) == set(benchmark.STAGE_ORDER)
    assert result["peak_rss_mb"] > 50 and result["device_memory_mb"] is None
    report = {"results": {"onnxruntime": result, "tensorrt": {"error": "no GPU"}}, "load_avg_before": (1.0, 0, 0),
              "load_avg_after": (1.0, 0, 0), "host": {"cpus": 2}}
    table = benchmark.format_table(report)
    assert "onnxruntime            1" in table and "tensorrt           error: no GPU" in table
    assert "peak RSS" in table


def test_cli_rejects_unknown_backends_and_bad_batches(sku: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sku-dir", str(sku), "--batches", "1,x"])
    args = parser.parse_args(["--sku-dir", str(sku), "--backends", "torch,openvino"])
    args.config = None
    with pytest.raises(EngineError, match="unknown 'openvino'"):
        bench.run(args)


def test_backend_specs_set_engine_keys_and_name_their_rows(sku: Path) -> None:
    specs = ("torch,torch+channels_last+cudnn_benchmark,torch:bf16+compile=default+cuda_graphs=false,"
             "onnxruntime+threads=2")
    engines = benchmark.parse_engines(specs, threads=1, tensorrt_precision="fp16", device="cuda", cuda_graphs=True)
    assert [benchmark.engine_label(s) for s in engines] == [
        "torch-cuda", "torch-cuda+channels_last+cudnn_benchmark", "torch-cuda-bf16-nographs+compile=default",
        "onnxruntime"]
    assert engines[1].channels_last and engines[1].threads == 1 and engines[3].threads == 2
    with pytest.raises(EngineError, match=r"engine\.chanels_last"):
        benchmark.parse_engines("torch+chanels_last", threads=1, tensorrt_precision="fp16", device="cpu",
                                cuda_graphs=True)
    report = benchmark.benchmark(sku, benchmark.parse_engines("torch,torch+preprocess_on_device", threads=1,
                                                              tensorrt_precision="fp16", device="cpu",
                                                              cuda_graphs=True), [1], iters=1)
    assert set(report["speedup"]) == {"torch+preprocess_on_device vs torch"}
    assert "torch+preprocess_on_device     1" in benchmark.format_table(report)
    same = benchmark.parse_engines("torch,torch+cuda_graphs=false", threads=1, tensorrt_precision="fp16",
                                   device="cpu", cuda_graphs=True)  # no graphs on the CPU: one row would hide another
    with pytest.raises(EngineError, match="torch named more than once"):
        benchmark.benchmark(sku, same, [1], iters=1)


def test_a_random_sku_can_carry_filled_memories(tmp_path: Path) -> None:
    from tdad.manifest import read_manifest
    from tdad.model import load_sku

    sku = benchmark.make_random_sku(tmp_path / "sku", 64, export=False, memory=200, fine_memory=300)
    config = read_manifest(sku).model
    assert (config.memory_size, config.fine_memory_size) == (200, 300) and config.memory_boost > 0
    segmenter = load_sku(sku).segmenter
    assert segmenter.memory.abs().sum(1).min() > 0 and segmenter.fine_memory.abs().sum(1).min() > 0
