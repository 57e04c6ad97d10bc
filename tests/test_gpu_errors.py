"""Every GPU failure this CPU machine can really produce is one line with its fix (and exit 2 from the CLI):
no driver (cuda-python is installed, libcuda is not), TensorRT not installed, TensorRT's bindings without
their libraries, a CPU-only torch asked for CUDA. Skipped where the situation does not hold (a GPU box)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from engines.runtime import create_engine, engine_settings
from foundation.errors import EngineError
from foundation.gpu import cuda_device, import_tensorrt, torch_cuda_device
from inspector.cli import main
from tests.conftest import nvidia_smi_sees_gpu

NO_GPU = not nvidia_smi_sees_gpu()
NO_TENSORRT = importlib.util.find_spec("tensorrt") is None
CPU_TORCH = torch.version.cuda is None
TRT_API = Path(sys.prefix) / "tensorrt-api"


@pytest.mark.skipif(not NO_GPU, reason="a GPU and its driver are here")
def test_no_driver_is_one_line_naming_the_driver() -> None:
    with pytest.raises(EngineError, match=r"^no usable NVIDIA driver: libcuda\.so\.1 is missing .*nvidia-smi must "
                                          r"work.*engine\.backend = \"onnxruntime\"$"):
        cuda_device(0)


def test_cuda_bindings_requirements_leave_out_the_release_that_raises_without_a_driver() -> None:
    """cuda-bindings 12.8.0's cudaGetDeviceCount raises RuntimeError ("Failed to dlopen libcuda.so.1") on a box
    without a driver, so the CLI said "internal error"; 12.9.0 and 13.x return cudaErrorInsufficientDriver, which
    the test above turns into its one line (both seen on this machine's wheels)."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = {extra: Requirement(r).specifier for extra, reqs in extras.items() for r in reqs
            if Requirement(r).name == "cuda-bindings"}
    assert set(pins) == {"gpu", "gpu-cu13", "dev"}, pins
    assert not [extra for extra, spec in pins.items() if spec.contains("12.8.0")]
    assert pins["gpu"].contains("12.9.0") and pins["dev"].contains(importlib.metadata.version("cuda-bindings"))


@pytest.mark.skipif(not NO_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_names_the_extra(exported_random_sku: Path) -> None:
    with pytest.raises(EngineError, match=r"^TensorRT is not installed: pip install 'tdad-inspector\[gpu\]'"):
        create_engine(engine_settings("tensorrt"), exported_random_sku)


@pytest.mark.skipif(not NO_TENSORRT, reason="tensorrt is installed here")
def test_build_cli_without_tensorrt_exits_2_with_one_line(exported_random_sku: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--sku-dir", str(exported_random_sku), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TensorRT is not installed: pip install")


def test_tensorrt_bindings_without_their_libraries_are_named(tmp_path: Path) -> None:
    """The real 11.x bindings (installed as files by `make venv`) fail to load libnvinfer on this machine."""
    bindings = TRT_API / "11.4.0.106"
    if not (bindings / "tensorrt_bindings").is_dir():
        pytest.fail(f"{bindings} is missing: run `make venv`")
    package = tmp_path / "tensorrt"  # what NVIDIA's tensorrt-cu12 package installs, verbatim
    package.mkdir()
    (package / "__init__.py").write_text("from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(bindings), str(Path.cwd())])}
    code = ("from foundation.gpu import import_tensorrt\nfrom foundation.errors import EngineError\n"
            "try:\n    import_tensorrt()\nexcept EngineError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    if "cannot open shared object file" not in out:
        pytest.skip(f"TensorRT's libraries load here: {out!r}")
    assert out.startswith("TensorRT's libraries cannot be loaded (libnv")
    assert out.endswith("reinstall them: pip install --force-reinstall 'tdad-inspector[gpu]'")
    assert "\n" not in out


@pytest.mark.skipif(not NO_TENSORRT, reason="tensorrt is installed here")
def test_import_tensorrt_names_the_extra() -> None:
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        import_tensorrt()


@pytest.mark.skipif(not CPU_TORCH, reason="this torch is a CUDA build")
def test_cpu_torch_asked_for_cuda_says_how_to_get_a_cuda_build(exported_random_sku: Path) -> None:
    with pytest.raises(EngineError, match=r"is a CPU-only build.*pip install torch==2\.13\.0 --index-url "
                                          r"https://download\.pytorch\.org/whl/cu128"):
        torch_cuda_device(0)
    with pytest.raises(EngineError, match="CPU-only build"):
        create_engine(engine_settings("torch", device="cuda", precision="bf16"), exported_random_sku)


@pytest.mark.skipif(not CPU_TORCH, reason="this torch is a CUDA build")
def test_train_on_cuda_with_a_cpu_torch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tdad.training.sample_data import write_good_folder

    good = write_good_folder(tmp_path / "good", 2, 64)
    assert main(["train", "--data", str(good), "--out", str(tmp_path / "sku"), "--preset", "tiny",
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CPU-only build" in err[0]
    with pytest.raises(SystemExit) as exited:  # argparse: an unknown device is a usage error
        main(["train", "--data", str(good), "--out", str(tmp_path / "sku"), "--device", "gpu0"])
    assert exited.value.code == 2 and "use cpu, cuda or cuda:N" in capsys.readouterr().err
