"""ONNX export: checked graphs with a dynamic batch axis, meta.json merged, CLI resolution and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines import export
from engines.runtime.staged import file_sha256
from foundation.errors import EngineError
from inspector.commands import export as export_command
from inspector.commands.common import device_arg, sku_dir_from_args, sku_target

GRAPHS = ("encoder", "denoiser", "fusion", "decoder", "segmenter", "tdad")


@pytest.fixture
def sku(exported_random_sku: Path) -> Path:
    return exported_random_sku


@pytest.mark.parametrize("name", GRAPHS)
def test_graph_passes_checker_with_dynamic_batch_axis(sku: Path, name: str) -> None:
    model = onnx.load(str(sku / f"{name}.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == export.DEFAULT_OPSET
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


def test_part_graph_io_names_and_shapes(sku: Path) -> None:
    names = {n: [i.name for i in ort.InferenceSession(str(sku / f"{n}.onnx")).get_inputs()] for n in GRAPHS}
    assert names == {
        "encoder": ["image"], "denoiser": ["z_t", "t", "cond"], "fusion": ["z", "z_rec1"], "decoder": ["z"],
        "segmenter": ["image", "reconstruction"], "tdad": ["image"],
    }
    session = ort.InferenceSession(str(sku / "tdad.onnx"))
    for n in (1, 3):
        maps = session.run(None, {"image": np.random.default_rng(n).random((n, 3, 64, 64), np.float32)})[0]
        assert maps.shape == (n, 64, 64)
        assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_meta_records_export_and_keeps_training_keys(sku: Path) -> None:
    meta = json.loads((sku / "meta.json").read_text())
    assert meta["train_hash"] == "random-init"  # written by save_sku before the export: merged, not clobbered
    info = meta["export"]
    assert info["opset"] == export.DEFAULT_OPSET
    assert info["files"] == [f"{n}.onnx" for n in GRAPHS]
    assert info["unrolled_schedule"] == meta["schedule"]
    assert info["denoiser_calls"] == meta["schedule"]["steps1"] + meta["schedule"]["steps2"]
    assert info["torch"].startswith("2.")
    assert info["weights_sha256"] == file_sha256(sku / "model.safetensors")


def _args(**kw: object) -> argparse.Namespace:
    base = {"sku_dir": None, "sku": None, "config": None, "opset": export.DEFAULT_OPSET,
            "t1": None, "steps1": None, "t2": None, "steps2": None, "fp16": False, "int8": False, "calib": None,
            "calib_images": 32, "device": None}
    return argparse.Namespace(**(base | kw))


def test_cli_rejects_a_folder_without_meta(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"no meta\.json"):
        export_command.run(_args(sku_dir=tmp_path))


def test_cli_rejects_an_invalid_schedule_override(sku: Path) -> None:
    with pytest.raises(EngineError, match="--schedule-"):
        export_command.run(_args(sku_dir=sku, steps1=999))


def test_sku_name_resolves_through_the_config(sku: Path, tmp_path: Path) -> None:
    config = tmp_path / "inspector.toml"
    config.write_text(f'active_sku = "brick"\n[skus.brick]\nmodel_dir = "{sku}"\n')
    assert sku_dir_from_args(_args(sku="brick", config=config)) == sku


def test_sku_target_takes_engine_and_schedule_from_the_config_and_flags_on_top(sku: Path, tmp_path: Path) -> None:
    config = tmp_path / "inspector.toml"
    config.write_text(f'active_sku = "brick"\n[engine]\nthreads = 2\n[skus.brick]\nmodel_dir = "{sku}"\nsteps1 = 3\n')
    target = sku_target(_args(sku="brick", config=config, backend=None, threads=0))
    assert target.sku_dir == sku and target.engine.threads == 2 and target.schedule_override == {"steps1": 3}
    assert target.calibration_path == sku / "calibration.json"
    assert sku_target(_args(sku="brick", config=config, backend=None, threads=4)).engine.threads == 4
    direct = sku_target(_args(sku_dir=sku, backend=None, threads=0))
    assert direct.engine.backend == "onnxruntime" and direct.schedule_override == {}


def test_cli_parser_takes_sku_or_sku_dir() -> None:
    parser = argparse.ArgumentParser()
    export_command.add_arguments(parser)
    args = parser.parse_args(["--sku-dir", "x", "--schedule-steps1", "3"])
    assert args.sku_dir == Path("x") and args.steps1 == 3
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_device_flag_moves_the_torch_engine_and_refuses_what_cannot_move(sku: Path) -> None:
    """--device reaches the engine settings of --sku-dir runs (the config is not read there), one line otherwise."""
    on_gpu = sku_target(_args(sku_dir=sku, backend="torch", threads=0, device="cuda:1")).engine
    assert (on_gpu.backend, on_gpu.device, on_gpu.device_id) == ("torch", "cuda", 1)
    assert sku_target(_args(sku_dir=sku, backend="tensorrt", threads=0, device="cuda:2")).engine.device_id == 2
    assert sku_target(_args(sku_dir=sku, backend="torch", threads=2, device="cpu")).engine.threads == 2
    with pytest.raises(EngineError, match=r"^--device cuda: the onnxruntime backend runs on the CPU; drop --device"):
        sku_target(_args(sku_dir=sku, backend=None, threads=0, device="cuda"))
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'gpu0': use cpu, cuda or cuda:N"):
        device_arg("gpu0")
