"""ONNX Runtime (and, on a GPU, TensorRT) held to the torch reference on the same frames.

Relative error of anomaly maps, the number every parity bound here uses:
    rel_error(a, ref) = max |a - ref| / max(max |ref|, 1e-12)
i.e. the worst pixel deviation over the whole batch, relative to the largest reference value (maps are in
[0, 1], so this is also close to an absolute error). Image-score ordering uses tdad.scoring.image_scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.runtime import OnnxRuntimeSettings, TorchSettings, create_engine
from tdad.scoring import image_scores
from tdad.training.sample_data import draw_defect, render_part
from tests.fixtures_engines import IMAGE_SIZE, random_frames

FP32_BOUND = 1e-3


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max(max |ref|, eps): the parity metric documented above."""
    return float(np.abs(a - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def part_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n rendered parts, every other one with a painted defect (a spread of scores to order)."""
    rng = np.random.default_rng(seed)
    frames = [render_part("brick", size, rng) for _ in range(n)]
    return np.stack([draw_defect(f, rng)[0] if i % 2 else f for i, f in enumerate(frames)])


def assert_parity(sku: Path, frames: np.ndarray, **engine_kw: object) -> float:
    """OnnxEngine vs TorchEngine on frames: fp32 bound on maps, identical image-score order; returns the error."""
    ref = create_engine(TorchSettings(threads=1), sku, **engine_kw).infer(frames)  # type: ignore[arg-type]
    out = create_engine(OnnxRuntimeSettings(threads=1), sku, **engine_kw).infer(frames)  # type: ignore[arg-type]
    err = rel_error(out, ref)
    assert err < FP32_BOUND, err
    assert np.array_equal(np.argsort(image_scores(out)), np.argsort(image_scores(ref)))
    return err


@pytest.fixture
def sku(exported_random_sku: Path) -> Path:
    return exported_random_sku


def test_rel_error_definition() -> None:
    ref = np.array([[0.5, 1.0]], np.float32)
    assert rel_error(ref + np.float32(1e-4), ref) == pytest.approx(1e-4, rel=1e-2)
    assert rel_error(np.zeros(2), np.zeros(2)) == 0.0


def test_onnxruntime_matches_torch_on_random_frames(sku: Path) -> None:
    assert_parity(sku, random_frames(4, seed=1))


def test_onnxruntime_matches_torch_on_parts_with_defects(sku: Path) -> None:
    assert_parity(sku, part_frames(6, 64))


def test_onnxruntime_matches_torch_with_a_schedule_override(sku: Path) -> None:
    assert_parity(sku, random_frames(2, seed=2), schedule_override={"t1": 80, "steps1": 2, "t2": 300, "steps2": 3})


@pytest.mark.slow
def test_onnxruntime_matches_torch_on_a_tiny_trained_model(trained_sku: Path) -> None:
    err = assert_parity(trained_sku, part_frames(8, 64, seed=3))
    print(f"tiny trained model: ORT vs torch rel_error = {err:.2e}")


@pytest.mark.parametrize("profile", [False, True], ids=["trained", "quick"])
def test_onnxruntime_matches_torch_with_the_memory_prior(tmp_path: Path, profile: bool) -> None:
    """The segmenter's nearest-memory search (one Gemm per memory), its inference boost (and a quick SKU's
    profiles; a trained SKU's memory terms are distance - 1), and the fine memory's search on the 2x-upsampled
    input, export and run on ONNX Runtime like in torch."""
    import dataclasses

    import torch

    from engines.export import export_sku
    from tdad.manifest import ModelConfig
    from tdad.model import TDADModel, save_sku
    from tdad.training.train import TrainConfig, fill_memory, store_fine_memory

    torch.manual_seed(0)
    model = TDADModel(dataclasses.replace(ModelConfig(image_size=64), memory_size=200, memory_boost=2.0,
                                          memory_profile=profile)).eval()
    with torch.no_grad():
        model.denoiser.conv_out.weight.normal_(0.0, 0.02)
    fill_memory(model, part_frames(6, 64, seed=5), torch.device("cpu"), batch=3, seed=0)
    fine = TrainConfig(data=tmp_path, out=tmp_path, image_size=64, fine_memory=300, fine_boost=1.5, batch_size=3)
    store_fine_memory(model, part_frames(6, 64, seed=5), None, fine, torch.device("cpu"))
    if profile:
        assert float(model.segmenter.memory_spread.std()) > 0 and float(model.segmenter.fine_center.std()) > 0
    sku = save_sku(model, tmp_path / "sku")
    export_sku(sku)
    assert_parity(sku, part_frames(4, 64, seed=6))
    # each search is Gemm -> Reshape -> ReduceMin: one query x entry matrix, no elementwise pass over it (the
    # q2 - 2 q @ m.t() + m2 form held three or four of them in ONNX Runtime: 2.4 GB at batch 6, docs/performance.md)
    graph = onnx.load(str(sku / "segmenter.onnx")).graph
    consumers = {i: n for n in graph.node for i in n.input}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and not [n for n in graph.node if n.op_type == "MatMul"]
    assert all(consumers[consumers[g.output[0]].output[0]].op_type == "ReduceMin" for g in gemms)


@pytest.mark.parametrize("override", [None, {"steps1": 2, "steps2": 3}], ids=["unrolled", "parts"])
def test_onnxruntime_matches_torch_with_the_residual_reconstruction(sku: Path, tmp_path: Path,
                                                                    override: dict | None) -> None:
    """The random SKU is residual, as training writes it: x + decode(z_rec) - decode(z0) runs the same in the
    unrolled graph and in the part graphs' shared loop as in torch; the plain decode gives other maps, so the
    bound tells the two apart."""
    import json
    import shutil

    from tdad.manifest import MANIFEST_FILE, read_manifest

    assert read_manifest(sku).model.residual
    sku = Path(shutil.copytree(sku, tmp_path / "sku"))  # the session fixture is read-only
    frames = part_frames(4, IMAGE_SIZE, seed=7)
    kw = {"schedule_override": override} if override else {}
    assert_parity(sku, frames, **kw)
    residual_maps = create_engine(OnnxRuntimeSettings(threads=1), sku, **kw).infer(frames)  # type: ignore[arg-type]
    meta = json.loads((sku / MANIFEST_FILE).read_text())
    meta["model"]["residual"] = False
    (sku / MANIFEST_FILE).write_text(json.dumps(meta))
    torch_plain = create_engine(TorchSettings(threads=1), sku, **kw).infer(frames)  # type: ignore[arg-type]
    assert rel_error(residual_maps, torch_plain) > 10 * FP32_BOUND
