"""Ablation: the model's named reconstruction modes, and `inspector eval --ablation` measuring each part of the
model on one test set through one score, with per-defect-type image AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calibration.evaluate import format_defect_table, format_table
from inspector.cli import main
from tdad.manifest import RECONSTRUCTIONS, ModelConfig, Reconstruction, read_manifest
from tdad.model import TDADModel, save_sku
from tests.fixtures_data import make_mvtec_tree

S = 32
TINY = ModelConfig(image_size=S, ae_channels=(8, 8, 8), denoiser_channels=(8, 8, 8), time_dim=16, cond_channels=4,
                   fusion_channels=8, seg_channels=(8, 8, 8, 8))
DEFECT_TYPES = ["blob", "missing", "scratch", "spot"]  # what make_mvtec_tree writes


def tiny_model(reconstruction: Reconstruction = "two_stage", seed: int = 0) -> TDADModel:
    """A random-init tiny model (weights differ per seed) in eval mode."""
    torch.manual_seed(seed)
    return TDADModel(TINY, reconstruction=reconstruction).eval()


@pytest.fixture(scope="module")
def skus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-stage SKU and a no-reconstruction SKU of the same size (random weights: mechanics, not accuracy)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("skus")
    return save_sku(tiny_model(), root / "full"), save_sku(tiny_model("none", seed=1), root / "norec")


def test_each_reconstruction_mode_is_its_own_variant() -> None:
    model = tiny_model()
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        recs = {mode: model.reconstruct(x, mode=mode) for mode in RECONSTRUCTIONS}
        maps = {mode: model.anomaly_maps(x, mode=mode) for mode in RECONSTRUCTIONS}
        assert recs["none"] is x
        assert torch.equal(recs["autoencoder"], model.decode(model.encode(x)))
        assert torch.equal(recs["two_stage"], model.reconstruct(x))
        assert torch.equal(maps["two_stage"], model.anomaly_maps(x))  # the trained mode is the default
    for i, a in enumerate(RECONSTRUCTIONS):
        for b in RECONSTRUCTIONS[i + 1 :]:
            assert not torch.allclose(maps[a], maps[b]), (a, b)
    with pytest.raises(ValueError, match="unknown reconstruction 'stage2'"):
        model.reconstruct(x, mode="stage2")  # type: ignore[arg-type]


def test_a_residual_model_moves_the_diffusions_edit_onto_the_input() -> None:
    """x + decode(z_rec) - decode(z0): the autoencoder's round trip cancels (its mode is the input itself), and
    the two-stage mode differs from x by exactly what the diffusion changed in the decoded image."""
    import dataclasses

    torch.manual_seed(0)
    model = TDADModel(dataclasses.replace(TINY, residual=True)).eval()
    x = torch.rand(2, 3, S, S)
    with torch.no_grad():
        z0 = model.encode(x)
        edit = model.decode(model.reconstruct_latents(z0)) - model.decode(z0)
        assert torch.allclose(model.reconstruct(x, mode="autoencoder"), x, atol=1e-6)
        assert torch.allclose(model.reconstruct(x), (x + edit).clamp(0, 1), atol=1e-6)
        assert edit.abs().max() > 1e-3  # the diffusion did change something, so the check above can fail
        plain = TDADModel(TINY).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(plain.reconstruct(x), model.decode(model.reconstruct_latents(z0)), atol=1e-6)


def test_a_no_reconstruction_sku_runs_its_segmenter_on_the_input(skus: tuple[Path, Path]) -> None:
    from tdad.model import load_sku

    model = load_sku(skus[1])
    assert model.reconstruction == "none" and read_manifest(skus[1]).reconstruction == "none"
    x = torch.rand(1, 3, S, S)
    with torch.no_grad():
        assert torch.equal(model.anomaly_maps(x), model.segmenter(x, x))


def test_eval_ablation_writes_one_row_per_variant_with_per_defect_auroc(
    skus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, norec = skus
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=3, n_test_bad=4, size=40)
    out = tmp_path / "report"
    args = ["eval", "--sku-dir", str(full), "--dataset", "mvtec", "--root", str(root), "--category", "brick",
            "--threads", "1", "--batch", "4", "--out", str(out)]
    assert main([*args, "--ablation", "--compare-sku", str(norec)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = [(r["sku"], r["reconstruction"], r["trained_on"]) for r in report["rows"]]
    assert rows == [("full", m, "two_stage") for m in RECONSTRUCTIONS] + [("norec", "none", "none")]
    assert report["ablation"] and report["backend"] == "torch"
    assert report["dataset"]["defect_counts"] == {"good": 3, **dict.fromkeys(DEFECT_TYPES, 1)}
    for row in report["rows"]:
        assert row["engine"]["backend"] == "torch" and row["engine"]["reconstruction"] == row["reconstruction"]
        assert sorted(row["per_defect_image_auroc"]) == DEFECT_TYPES
        assert (out / f"montage_{row['sku']}_{row['reconstruction']}.png").is_file()
    scores = {r["reconstruction"]: r["image_ap"] for r in report["rows"][:4]}
    assert len(set(scores.values())) > 1  # the variants are measured, not copies of one another
    markdown = (out / "report.md").read_text()
    assert "| SKU | reconstruction | segmenter trained on |" in markdown and "| scratch (1) |" in markdown
    assert "segmenter trained on" in printed and "image AUROC per defect type" in printed


@pytest.mark.parametrize(("extra", "message"), [
    (["--compare-sku", "X"], "--compare-sku adds rows to the ablation table: pass --ablation too"),
    (["--ablation", "--backend", "onnxruntime"], "--ablation runs the torch model"),
    (["--ablation", "--compare-sku", "OTHER"], "ablation rows must see the same inputs"),
])
def test_eval_ablation_mistakes_are_one_line_errors(
    skus: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    other = save_sku(TDADModel(ModelConfig(image_size=64, ae_channels=(8, 8, 8), denoiser_channels=(8, 8, 8),
                                           time_dim=16, cond_channels=4, fusion_channels=8,
                                           seg_channels=(8, 8, 8, 8))), tmp_path / "sku64")
    extra = [str(other) if a == "OTHER" else a for a in extra]
    args = ["eval", "--sku-dir", str(skus[0]), "--dataset", "mvtec", "--root", str(tmp_path), "--category", "brick"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_defect_table_lists_each_type_with_its_count() -> None:
    rows = [{"schedule": "trained", "per_defect_image_auroc": {"crack": 1.0, "hole": 0.5}, "image_auroc": 0.75},
            {"schedule": "1+1", "per_defect_image_auroc": None}]
    text = format_defect_table(rows, {"good": 5, "crack": 2, "hole": 3})
    assert text.splitlines()[0].split() == ["schedule", "crack", "(2)", "hole", "(3)"]
    assert text.splitlines()[1].split() == ["trained", "1.0000", "0.5000"]
    assert text.splitlines()[2].split() == ["1+1", "-", "-"]
    metrics = dict.fromkeys(("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap",
                             "pixel_ap"), 0.5)
    row = {"sku": "a", "reconstruction": "none", "trained_on": "none", **metrics, "images_per_s": 1.0,
           "ms_per_image": 1.0}
    assert format_table([row], markdown=True).startswith("| SKU | reconstruction | segmenter trained on | image AUROC")


@pytest.fixture(scope="module")
def memory_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-stage SKU whose segmenter has a filled 64-entry memory at boost 2 (random weights: mechanics)."""
    import dataclasses

    torch.manual_seed(2)
    model = TDADModel(dataclasses.replace(TINY, memory_size=64, memory_boost=2.0)).eval()
    model.segmenter.memory.normal_()
    model.segmenter.memory_scale.fill_(10.0)
    return save_sku(model, tmp_path_factory.mktemp("memory") / "mem")


def test_eval_memory_boost_rows_run_the_sku_at_each_boost(
    memory_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=3, n_test_bad=4, size=40)
    args = ["eval", "--sku-dir", str(memory_sku), "--dataset", "mvtec", "--root", str(root), "--category", "brick",
            "--threads", "1", "--batch", "4", "--backend", "torch"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "boosts"), "--memory-boost", "0,2,8"]) == 0, capsys.readouterr().err
    assert "memory boost" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())["rows"][0]
    rows = json.loads((tmp_path / "boosts" / "report.json").read_text())["rows"]
    assert [(r["memory_boost"], r["engine"]["memory_boost"]) for r in rows] == [("0", 0.0), ("2", 2.0), ("8", 8.0)]
    assert rows[1]["pixel_ap"] == plain["pixel_ap"] and rows[1]["image_ap"] == plain["image_ap"]  # the SKU's own
    assert rows[0]["pixel_ap"] != rows[2]["pixel_ap"]  # the boost reaches the maps
    assert main([*args, "--out", str(tmp_path / "ablation"), "--ablation", "--memory-boost", "1,4"]) == 0
    report = json.loads((tmp_path / "ablation" / "report.json").read_text())
    assert [(r["reconstruction"], r["memory_boost"]) for r in report["rows"]] == [
        (m, b) for m in RECONSTRUCTIONS for b in ("1", "4")]


@pytest.mark.parametrize(("extra", "message"), [
    (["--memory-boost", "2"], "has no memory prior (trained with --memory 0)"),
    (["--memory-boost", "x"], "--memory-boost 'x': expected comma-separated boosts"),
    (["--memory-boost", "-1"], "boosts must be finite and >= 0"),
    (["--memory-boost", "2", "--backend", "onnxruntime"], "--memory-boost runs the torch model"),
    (["--memory-boost", "2", "--t1", "80"], "drop --steps/--t1/--t2 or --memory-boost"),
])
def test_eval_memory_boost_mistakes_are_one_line_errors(
    skus: tuple[Path, Path], memory_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], message: str
) -> None:
    sku = skus[0] if message.startswith("has no memory") else memory_sku
    args = ["eval", "--sku-dir", str(sku), "--dataset", "mvtec", "--root", str(tmp_path), "--category", "brick"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
