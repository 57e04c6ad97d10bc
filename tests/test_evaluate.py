"""Evaluation: metrics table and montage on synthetic maps; evaluate/eval/calibrate on a real ONNX Runtime engine."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibration.evaluate import (
    Inference,
    compute_metrics,
    evaluate,
    format_sweep_table,
    format_table,
    montage_indices,
    score_sweep,
)
from calibration.montage import COLUMNS, MontageRow, render_montage, write_montage
from calibration.thresholds import load_calibration
from foundation.errors import ConfigError, DataError
from inspector.cli import main
from inspector.commands.evaluate import parse_steps, parse_timesteps
from tdad.manifest import maps_fingerprint, score_top_k
from tdad.scoring import image_scores, smoothed_max_scores, top_k_for
from tdad.training.data import open_dataset
from tests.fixtures_data import make_good_folder, make_mvtec_tree
from tests.fixtures_engines import copy_sku


def synthetic_inference(n_good: int = 4, n_bad: int = 4, size: int = 32) -> Inference:
    """Maps that are hot exactly on a square defect in the defective images: every metric is perfect."""
    n = n_good + n_bad
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[n_good:, 8:16, 8:16] = True
    maps = (rng.random((n, size, size)) * 0.3 + masks * 0.6).astype(np.float32)
    labels = np.arange(n) >= n_good
    return Inference(maps=maps, labels=labels, masks=masks, defect_types=np.where(labels, "square", "good"),
                     seconds=0.5)


def metrics_of(inference: Inference) -> dict[str, object]:
    """compute_metrics with top-4 image scores."""
    return compute_metrics(inference, image_scores(inference.maps, top_k=4))


def test_metrics_of_a_perfect_detector() -> None:
    result = metrics_of(synthetic_inference())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap"):
        assert result[key] == pytest.approx(1.0), key
    assert result["per_defect_image_auroc"] == {"square": 1.0}
    assert 0.3 <= result["pixel_f1_threshold"] < 0.6


def test_undefined_metrics_are_none_for_good_only_sets() -> None:
    inference = synthetic_inference(n_bad=0)
    result = metrics_of(inference)
    assert all(result[k] is None for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max",
                                           "per_defect_image_auroc"))


def test_table_and_steps() -> None:
    row = {
        "schedule": "1+1",
        **metrics_of(synthetic_inference()),
        "images_per_s": 8.0,
        "ms_per_image": 125.0,
    }
    text = format_table([row])
    assert "AUPRO@0.3" in text.splitlines()[0] and "1.0000" in text.splitlines()[1]
    assert format_table([row], markdown=True).startswith("| schedule |")
    assert parse_steps("1+1, 2+2,5+5") == [(1, 1), (2, 2), (5, 5)]
    for bad in ("1", "1+x", "0+1"):
        with pytest.raises(ConfigError, match="--steps"):
            parse_steps(bad)
    assert parse_timesteps("--t2", "250, 350") == [250, 350]
    for bad in ("x", "0", "1000"):
        with pytest.raises(ConfigError, match="--t1"):
            parse_timesteps("--t1", bad)


def test_smoothed_max_is_the_peak_of_the_blurred_map() -> None:
    maps = np.zeros((2, 32, 32), np.float32)
    maps[0, 10, 10] = 1.0  # one hot pixel: blurred away
    maps[1, 8:16, 8:16] = 0.5  # a hot region: kept
    scores = smoothed_max_scores(maps, 2.0)
    assert scores.dtype == np.float32 and scores[0] < 0.05 < 0.4 < scores[1] <= 0.5
    assert image_scores(maps, top_k=1)[0] > image_scores(maps, top_k=1)[1]  # the plain max ranks them the other way
    with pytest.raises(ValueError, match="sigma"):
        smoothed_max_scores(maps, 0.0)


def test_score_sweep_rates_every_definition_on_the_same_maps() -> None:
    inference = synthetic_inference()
    sweep = score_sweep(inference.maps, inference.labels)
    assert list(sweep) == ["top 0.05 %", "top 0.15 %", "top 0.5 %", "top 1 %", "top 5 %", "top 25 %",
                           "top 100 %", "max",
                           "blur-max s2", "blur-max s4", "blur-max s8"]
    assert all(v == pytest.approx(1.0) for v in sweep.values())
    assert score_sweep(list(inference.maps), inference.labels) == sweep  # a tiled SKU's maps come as a list
    assert all(v is None for v in score_sweep(inference.maps[:4], inference.labels[:4]).values())
    table = format_sweep_table([{"schedule": "trained", "score_sweep": sweep}])
    assert "blur-max s4" in table.splitlines()[0] and "1.0000" in table.splitlines()[1]


def test_montage_indices_pick_good_then_defective() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 1, 1], dtype=bool)
    assert montage_indices(labels, 2, 3) == [0, 5, 1, 4, 8]  # defective pool 1,3,4,6,7,8: first, middle, last
    assert montage_indices(np.zeros(3, dtype=bool), 2, 4) == [0, 2]


def test_montage_layout_and_file(tmp_path: Path) -> None:
    inference = synthetic_inference()
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    rows = [
        MontageRow(images[0], inference.masks[0], inference.maps[0], "good"),
        MontageRow(images[1], None, inference.maps[-1], "scratch"),
    ]
    montage = render_montage(rows, pixel_threshold=0.5)
    assert montage.dtype == np.uint8 and montage.shape[2] == 3
    assert montage.shape[1] >= len(COLUMNS) * 160 and montage.shape[0] >= 2 * 160
    path = write_montage(tmp_path / "m.png", rows, 0.5)
    assert cv2.imread(str(path)).shape == montage.shape
    with pytest.raises(DataError, match="cannot write montage"):
        write_montage(tmp_path / "missing" / "m.png", rows, 0.5)


@pytest.fixture(scope="module")
def tiny_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained, tiny) SKU directory exported to ONNX: the smallest engine the stack can run."""
    import torch

    from engines.export import export_sku
    from tdad.model import ModelConfig, TDADModel, save_sku

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ModelConfig(
        image_size=32,
        ae_channels=(8, 8, 8),
        denoiser_channels=(8, 8, 8),
        time_dim=16,
        cond_channels=4,
        fusion_channels=8,
        seg_channels=(8, 8, 8, 8),
    )
    sku_dir = tmp_path_factory.mktemp("sku")
    save_sku(TDADModel(config), sku_dir)
    export_sku(sku_dir)
    return sku_dir


@pytest.mark.slow
def test_evaluate_with_a_real_engine(tiny_sku: Path, tmp_path: Path) -> None:
    from engines.runtime import OnnxRuntimeSettings, create_engine

    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=3, n_test_bad=4, size=32)
    engine = create_engine(OnnxRuntimeSettings(threads=1), tiny_sku)
    dataset = open_dataset("mvtec", root, "brick", "test", engine.image_size)
    result = evaluate(engine, dataset, batch_size=3, top_k=10, montage_path=tmp_path / "montage.png")
    assert result["n_images"] == 7 and result["n_defective"] == 4
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"):
        assert 0.0 <= result[key] <= 1.0
    assert result["images_per_s"] > 0
    assert cv2.imread(result["montage"]) is not None


@pytest.mark.slow
def test_calibrate_with_ng_masks_fits_the_pixel_threshold_on_them(
    tiny_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_good_folder(tmp_path / "good", n=9, size=32)
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=0, n_test_bad=4, size=32)
    ng, masks = root / "brick" / "test" / "scratch", root / "brick" / "ground_truth" / "scratch"
    args = ["calibrate", "--sku-dir", str(tiny_sku), "--good", str(good), "--frr", "0.1", "--threads", "1"]
    assert main([*args, "--ng", str(ng), "--ng-masks", str(masks)]) == 0, capsys.readouterr().err
    calibration = load_calibration(tiny_sku / "calibration.json")
    assert calibration.pixel_threshold_method == "f1_optimal_on_ng_masks"
    assert calibration.sku_fingerprint == maps_fingerprint(tiny_sku)  # what the daemon's pre-flight compares
    assert main([*args, "--ng", str(ng)]) == 0
    assert load_calibration(tiny_sku / "calibration.json").pixel_threshold_method != "f1_optimal_on_ng_masks"


def test_calibrate_ng_without_its_masks_is_a_one_line_error(
    tiny_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_good_folder(tmp_path / "good", n=9, size=32)
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=0, n_test_bad=1, size=32)
    args = ["calibrate", "--sku-dir", str(tiny_sku), "--good", str(good), "--frr", "0.1"]
    code = main([*args, "--ng", str(root / "brick" / "test" / "scratch"), "--ng-masks", str(tmp_path)])
    assert code == 2
    assert "no mask for" in capsys.readouterr().err
    assert main([*args, "--ng-masks", str(tmp_path)]) == 2
    assert "--ng-masks needs --ng" in capsys.readouterr().err


def test_calibrate_then_eval_cli(tiny_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = make_good_folder(tmp_path / "good", n=9, size=32)
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=2, n_test_bad=3, size=32)
    ng = root / "brick" / "test" / "scratch"
    # 9 good images fit a 10 % false-reject rate (needs >= 9); k = floor(0.1 * 10) = 1: the top good score.
    code = main(
        [
            "calibrate",
            "--sku-dir",
            str(tiny_sku),
            "--good",
            str(good),
            "--ng",
            str(ng),
            "--frr",
            "0.1",
            "--threads",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cal = load_calibration(tiny_sku / "calibration.json")
    assert cal.n_good == 9 and cal.n_ng >= 1 and cal.threshold_rank == 1
    assert cal.score_top_k == score_top_k(tiny_sku) == top_k_for(32)
    assert "image_threshold" in capsys.readouterr().out

    out = tmp_path / "report"
    code = main(
        [
            "eval",
            "--sku-dir",
            str(tiny_sku),
            "--dataset",
            "mvtec",
            "--root",
            str(root),
            "--category",
            "brick",
            "--steps",
            "1+1,2+2",
            "--t2",
            "200,300",
            "--threads",
            "1",
            "--out",
            str(out),
            "--score-sweep",
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [row["schedule"] for row in report["rows"]] == ["t2=200 1+1", "t2=200 2+2", "t2=300 1+1", "t2=300 2+2"]
    assert [(row["engine"]["schedule"]["t2"], row["engine"]["schedule"]["steps1"]) for row in report["rows"]] == [
        (200, 1), (200, 2), (300, 1), (300, 2)]
    assert report["calibration"]["n_good"] == 9
    assert report["rows"][0]["montage_threshold"] == pytest.approx(cal.pixel_threshold)
    assert (out / "montage_t2=200_1+1.png").is_file() and (out / "montage_t2=300_2+2.png").is_file()
    assert "| t2=300 2+2 |" in (out / "report.md").read_text()
    assert sorted(report["rows"][0]["per_defect_image_auroc"]) == ["blob", "scratch", "spot"]
    assert set(report["rows"][1]["score_sweep"]) >= {"max", "blur-max s2"}
    printed = capsys.readouterr().out
    assert "AUPRO@0.3" in printed and "image AUROC per image-score definition" in printed


@pytest.mark.slow
def test_calibrate_with_too_few_good_images_is_one_line(
    tiny_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_good_folder(tmp_path / "good", n=3, size=32)
    code = main(["calibrate", "--sku-dir", str(tiny_sku), "--good", str(good), "--threads", "1"])
    assert code == 2
    assert "needs at least 199" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_model_finds_painted_defects(
    trained_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The session's trained SKU (copied: calibrate rewrites it), calibrated on good parts, on a fresh test set."""
    from engines.runtime import OnnxRuntimeSettings, create_engine

    sku = copy_sku(trained_sku, tmp_path / "sku")
    root = make_mvtec_tree(tmp_path / "mvtec", n_train=16, n_test_good=6, n_test_bad=10, size=64)
    good = root / "brick" / "train" / "good"
    assert main(["calibrate", "--sku-dir", str(sku), "--good", str(good), "--frr", "0.1", "--threads", "1"]) == 0
    calibration = load_calibration(sku / "calibration.json")
    capsys.readouterr()

    engine = create_engine(OnnxRuntimeSettings(threads=1), sku)
    dataset = open_dataset("mvtec", root, "brick", "test", engine.image_size)
    result = evaluate(
        engine,
        dataset,
        top_k=calibration.score_top_k or 100,
        calibration=calibration,
        montage_path=tmp_path / "montage.png",
    )
    assert result["image_auroc"] > 0.8 and result["pixel_auroc"] > 0.8 and result["aupro"] > 0.6, result


def test_a_tiled_sku_calibrates_and_evaluates_images_of_different_sizes_at_its_scale(
    tiny_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tdad.manifest import TilingRecord, read_manifest, write_manifest

    sku = copy_sku(tiny_sku, tmp_path / "tiled")
    write_manifest(sku, read_manifest(sku).model_copy(update={"tiling": TilingRecord(scale=0.5, overlap=0.25)}))
    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=3, n_test_bad=3, size=64)
    for i, path in enumerate(sorted((root / "brick" / "test").rglob("*.png"))):  # frames of different sizes
        size = (64 + 24 * (i % 3), 64 + 40 * (i % 2))
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), size))
        mask = root / "brick" / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        if mask.is_file():
            cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask)), size, interpolation=cv2.INTER_NEAREST))
    good = make_good_folder(tmp_path / "good", n=9, size=80)
    ng, masks = root / "brick" / "test" / "scratch", root / "brick" / "ground_truth" / "scratch"
    args = ["calibrate", "--sku-dir", str(sku), "--good", str(good), "--ng", str(ng), "--ng-masks", str(masks),
            "--frr", "0.1", "--threads", "1"]
    assert main(args) == 0, capsys.readouterr().err
    assert load_calibration(sku / "calibration.json").pixel_threshold_method == "f1_optimal_on_ng_masks"
    out = tmp_path / "report"
    assert main(["eval", "--sku-dir", str(sku), "--dataset", "mvtec", "--root", str(root), "--category", "brick",
                 "--threads", "1", "--batch", "3", "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["tiling"] == {"scale": 0.5, "overlap": 0.25} and "tiles of 32 px" in report["resolution"]
    row = report["rows"][0]
    assert all(0.0 <= row[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "aupro"))
    assert "at scale 0.5" in (out / "report.md").read_text() and "resolution: tiles" in capsys.readouterr().out


def test_a_skus_split_is_read_at_its_geometry(tiny_sku: Path, tmp_path: Path) -> None:
    from calibration.evaluate import sku_split
    from tdad.manifest import PreprocessRecord, TilingRecord, read_manifest

    root = make_mvtec_tree(tmp_path / "mvtec", n_test_good=1, n_test_bad=1, size=64)
    manifest = read_manifest(tiny_sku).model_copy(update={"preprocess": PreprocessRecord(resize="letterbox")})
    whole = sku_split(manifest, "mvtec", root, "brick")
    assert whole.resize == "letterbox" and whole.tile_scale is None and whole[0].image.shape[:2] == (
        manifest.image_size, manifest.image_size)
    tiled = sku_split(manifest.model_copy(update={"tiling": TilingRecord(scale=0.5)}), "mvtec", root, "brick")
    assert tiled.tile_scale == 0.5 and tiled[0].image.shape[:2] == (32, 32)  # scaled, tiled later by evaluate
