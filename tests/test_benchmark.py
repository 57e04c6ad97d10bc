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
