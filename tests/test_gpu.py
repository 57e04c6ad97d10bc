"""The CUDA path without TensorRT: the stack imports, the torch CUDA engine (fp32/fp16/bf16, CUDA graphs on and
off) against the CPU reference, training on the GPU end to end, the segmenter loss of a real batch on CUDA against
the CPU's, and a bad device id (GPU only: these fail, never skip, on a machine where nvidia-smi sees a GPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from foundation.errors import EngineError
from tests.fixtures_engines import random_frames
from tests.test_parity import rel_error

pytestmark = pytest.mark.gpu
BOUNDS = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}  # fp32 on CUDA may use TF32 convolutions


def test_the_gpu_stack_is_installed_and_sees_the_gpu() -> None:
    import torch

    from foundation.gpu import cuda_device, import_tensorrt, torch_cuda_device

    info = cuda_device(0)
    assert info.name and info.memory_mb > 0
    assert torch_cuda_device(0).type == "cuda" and torch.cuda.get_device_name(0) == info.name
    import_tensorrt()  # the [gpu] extra: fails here, not later at a SKU load


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_torch_cuda_engine_matches_the_cpu_reference(exported_random_sku: Path, precision: str,
                                                     cuda_graphs: bool) -> None:
    from engines.runtime import create_engine, engine_settings

    sku = exported_random_sku
    frames = random_frames(3, seed=1)
    ref = create_engine(engine_settings("torch"), sku).infer(frames)
    engine = create_engine(engine_settings("torch", device="cuda", precision=precision, cuda_graphs=cuda_graphs), sku)
    engine.warmup()
    first, again = engine.infer(frames), engine.infer(frames)  # capture at batch 3, then replay
    assert first.dtype == np.float32 and first.shape == ref.shape
    assert rel_error(first, ref) < BOUNDS[precision] and rel_error(again, ref) < BOUNDS[precision]
    info = engine.describe()
    assert info["device"] == "cuda:0" and info["precision"] == precision
    assert info["captured_batches"] == ([1, 3] if cuda_graphs else [])
    assert engine.device_memory_used() > 0


def test_bad_device_id_is_one_line(exported_random_sku: Path) -> None:
    from engines.runtime import create_engine, engine_settings

    with pytest.raises(EngineError, match=r"engine\.device_id = 64, but this machine has \d+ CUDA GPU"):
        create_engine(engine_settings("torch", device="cuda", device_id=64), exported_random_sku)


def test_training_on_cuda_writes_a_sku_that_every_cpu_engine_loads(tmp_path: Path) -> None:
    from engines.export import export_sku
    from engines.runtime import create_engine, engine_settings
    from tdad.training.sample_data import write_good_folder
    from tdad.training.train import PRESETS, TrainConfig, train_sku

    good = write_good_folder(tmp_path / "good", 16, 64)
    knobs = {**PRESETS["tiny"], "ae_steps": 30, "diffusion_steps": 30, "seg_steps": 30}
    cfg = TrainConfig(data=good, out=tmp_path / "sku", device="cuda", progress=False, **knobs)
    sku = train_sku(dataclasses.replace(cfg, checkpoint_every=10_000))
    export_sku(sku)
    frames = random_frames(2, seed=3)
    cpu = create_engine(engine_settings("onnxruntime", threads=1), sku).infer(frames)
    gpu = create_engine(engine_settings("torch", device="cuda"), sku).infer(frames)
    assert np.isfinite(cpu).all() and rel_error(gpu, cpu) < BOUNDS["fp32"]


def test_the_segmenter_loss_on_cuda_is_the_cpus_for_a_real_training_batch(tmp_path: Path) -> None:
    """The batches' masks carry a stride-0 channel axis (numpy's [:, None]); CUDA torch 2.11 pooled such masks to
    zeros under interpolate(mode="area"), and every GPU-trained segmenter learnt all-normal targets."""
    import torch

    from tdad.training.sample_data import write_good_folder
    from tdad.training.train import (
        PRESETS,
        StepBatches,
        TrainConfig,
        load_images,
        segmenter_loss,
        set_phase,
        untrained_model,
    )

    good = write_good_folder(tmp_path / "good", 8, 64)
    cfg = TrainConfig(data=good, out=tmp_path / "sku", reconstruction="none", **{**PRESETS["tiny"], "memory": 0})
    torch.manual_seed(0)
    images, _ = load_images(cfg)
    model, _, _ = untrained_model(cfg, images, images)
    set_phase(model, "segmenter")
    batches = StepBatches(cfg, images, "segmenter", model.schedule)
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in batches[0].items()}
    assert batch["mask"].stride()[1] == 0 and batch["mask"].sum() > 0  # what the DataLoader hands train_sku
    with torch.no_grad():
        cpu = segmenter_loss(model, batch, cfg).item()
        model.to("cuda")
        cuda = segmenter_loss(model, {k: v.to("cuda") for k, v in batch.items()}, cfg).item()
    assert cuda == pytest.approx(cpu, rel=1e-3)
