"""Setting selection and the quick SKU: settings come from the held-out slice of the training images, synthetic
defects of the second family and scrap parts, never from the test split, and the report says so."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tdad.training.data
from calibration.selection import FINE_BOOSTS, FOLDS, MEMORY_BOOSTS, TIE, best
from foundation.errors import ConfigError
from inspector.cli import main
from inspector.commands.train import config_from_args, inspection_scale_line
from tdad.manifest import SelectionCandidate, read_manifest
from tdad.model import TDADModel, load_sku
from tdad.preprocess import preprocess
from tdad.scoring import top_k_for
from tdad.tiling import scale_for_defect
from tdad.training.sample_data import draw_defect, render_part, write_good_folder, write_mvtec_tree
from tdad.training.train import PRESETS, STEP_COST, TrainConfig, remaining_seconds, validation_indices
from tests.test_parity import assert_parity, part_frames
from tests.test_train import _parse

torch.set_num_threads(1)
S = 64
QUICK = ("--image-size", str(S), "--threads", "1", "--fine-memory", "2048")


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 good training parts (2 held out), test parts of every defect type."""
    return write_mvtec_tree(tmp_path_factory.mktemp("data") / "mvtec", "brick", n_train=12, n_test_good=3,
                            n_test_bad=4, size=S)


@pytest.fixture(scope="module")
def opened(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A quick SKU trained and its settings chosen by `inspector train --quick`, with every image file that the
    whole command decoded."""
    seen: list[Path] = []
    decode = tdad.training.data.load_image_rgb
    mp = pytest.MonkeyPatch()
    mp.setattr(tdad.training.data, "load_image_rgb", lambda path: (seen.append(Path(path)), decode(path))[1])
    out = tmp_path_factory.mktemp("quick") / "sku"
    try:
        assert main(["train", "--out", str(out), "--dataset", "mvtec", "--data", str(mvtec_root), "--category",
                     "brick", "--quick", *QUICK]) == 0
    finally:
        mp.undo()
    return out, seen


def test_selection_never_opens_the_test_split(mvtec_root: Path, opened: tuple[Path, list[Path]]) -> None:
    sku, seen = opened
    test_dir = mvtec_root / "brick" / "test"
    assert seen and not [p for p in seen if test_dir in p.parents]
    record = read_manifest(sku).selection
    assert record is not None
    train = sorted((mvtec_root / "brick" / "train" / "good").iterdir())
    # a quick SKU of 12 images (2 held out) chooses on all of them, cross-fitted: the training split only
    assert record.validation_files == [str(p) for p in train] and record.good == 12 and record.folds == FOLDS
    assert record.synthetic_defects >= 48 and not record.ng_files


def test_a_small_quick_set_scores_each_fold_against_a_memory_without_it(mvtec_root: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-fitting: every training image (and its painted defects) is scored after a refill from the other
    folds' images only, each image in one fold; the scrap parts and the SKU get the memory of all of them."""
    import calibration.selection as selection

    events: list[tuple[str, set[int] | None]] = []
    built: list[selection.ValidationSet] = []
    real_build, real_remember, real_terms = selection.build_validation_set, selection.remember, selection.evidence_terms

    def build(*args: object, **kwargs: object) -> selection.ValidationSet:
        built.append(real_build(*args, **kwargs))  # type: ignore[arg-type]
        return built[-1]

    def remember(model: object, cfg: TrainConfig, images: object, keep: np.ndarray | None = None,
                 described: object = None) -> None:
        assert described is not None  # a small set is described once, not once per fold
        events.append(("memory", None if keep is None else set(keep.tolist())))
        real_remember(model, cfg, images, keep, described)  # type: ignore[arg-type]

    def terms(model: object, images: list[np.ndarray], *args: object) -> list[np.ndarray]:
        owner = {id(image): o for image, o in zip(built[-1].images, built[-1].owners, strict=True)}
        events.append(("scored", {owner[id(image)] for image in images}))
        return real_terms(model, images, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(selection, "build_validation_set", build)
    monkeypatch.setattr(selection, "remember", remember)
    monkeypatch.setattr(selection, "evidence_terms", terms)
    import cv2

    scrap, rng = tmp_path / "ng", np.random.default_rng(4)
    scrap.mkdir()
    for i in range(2):
        cv2.imwrite(str(scrap / f"scrap_{i}.png"), draw_defect(render_part("brick", S, rng), rng)[0][..., ::-1])
    assert main(["train", "--out", str(tmp_path / "sku"), "--dataset", "mvtec", "--data", str(mvtec_root),
                 "--category", "brick", "--quick", "--ng", str(scrap), *QUICK]) == 0
    folds = events[:2 * FOLDS]
    assert [kind for kind, _ in folds] == ["memory", "scored"] * FOLDS
    scored = [owners for kind, owners in folds if kind == "scored"]
    for (_, memory), (_, owners) in zip(folds[::2], folds[1::2], strict=True):
        assert memory is not None and owners and memory.isdisjoint(owners) and memory | owners == set(range(12))
    assert sorted(o for owners in scored for o in owners if owners) == list(range(12))
    assert events[2 * FOLDS:] == [("memory", None), ("scored", {-1})]  # the scrap parts against every image
    record = read_manifest(tmp_path / "sku").selection
    assert record is not None and record.folds == FOLDS and record.ng == 2 and record.remembered == 12


def test_a_quick_sku_of_a_few_images_is_cross_fitted_one_image_per_fold(tmp_path: Path) -> None:
    write_good_folder(tmp_path / "good", 4, S, seed=3)  # under the 10 a validation slice needs
    assert main(["train", "--out", str(tmp_path / "sku"), "--data", str(tmp_path / "good"), "--quick", *QUICK]) == 0
    record = read_manifest(tmp_path / "sku").selection
    assert record is not None and record.folds == 4 and record.good == 4 and record.remembered == 4
    assert record.synthetic_defects >= 48


def test_a_trained_sku_too_small_to_hold_images_out_keeps_its_defaults_and_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_good_folder(tmp_path / "good", 6, 32, seed=3)
    assert main(["train", "--data", str(tmp_path / "good"), "--out", str(tmp_path / "sku"), "--device", "cpu",
                 "--threads", "1", "--image-size", "32", "--batch-size", "4", "--ae-steps", "1",
                 "--diffusion-steps", "1", "--seg-steps", "1", "--memory", "32", "--fine-memory", "32"]) == 0
    said = capsys.readouterr().out
    assert "settings not chosen: " in said and "6 good images; at least 10 are needed" in said
    assert "keeps the defaults (memory boost 2, fine memory weight 1)" in said and "SKU written to" in said
    meta = read_manifest(tmp_path / "sku")
    assert meta.selection is None and (meta.model.memory_boost, meta.model.fine_boost) == (2.0, 1.0)
    assert not meta.model.memory_profile  # a trained segmenter's memory terms stay distance - 1


def test_a_fold_refilled_from_descriptors_computed_once_is_the_fold_refilled_from_its_images(
        opened: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    from tdad.training.train import RowDescriptors, all_training_images, remember

    sku, _ = opened
    cfg = TrainConfig.from_dict(read_manifest(sku).train.config)  # type: ignore[union-attr]
    images = all_training_images(cfg)
    keep = np.flatnonzero(np.arange(len(images)) % FOLDS != 2)
    def with_fine_memory() -> TDADModel:  # the SKU may have dropped its fine memory when choosing
        model = load_sku(sku)
        if not model.config.fine_memory_size:
            model.segmenter.resize_fine_memory(2048)
            model.config = dataclasses.replace(model.config, fine_memory_size=2048)
        return model

    described = RowDescriptors.of(with_fine_memory(), cfg, images)
    assert described is not None and described.fine is not None
    models = [with_fine_memory(), with_fine_memory()]
    remember(models[0], cfg, images, keep)
    def no_backbone_pass(x: torch.Tensor) -> list[torch.Tensor]:
        raise AssertionError("a refill from descriptors computed once ran the backbone")

    # the memories, their scales and their profiles all come from the descriptors: no pass of the backbone
    monkeypatch.setattr(models[1].segmenter.backbone, "forward", no_backbone_pass)
    remember(models[1], cfg, images, keep, described)
    for name in ("memory", "memory_owner", "memory_scale", "fine_memory", "fine_memory_scale", "memory_center",
                 "memory_spread", "fine_center", "fine_spread"):  # a quick SKU's profiles too
        a, b = (getattr(m.segmenter, name) for m in models)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_the_quick_sku_is_the_memory_alone_with_the_chosen_settings(opened: tuple[Path, list[Path]]) -> None:
    sku, _ = opened
    meta = read_manifest(sku)
    record = meta.selection
    assert record is not None and meta.train is not None and meta.train.config["quick"]
    chosen = record.chosen
    assert chosen.memory_boost in MEMORY_BOOSTS and chosen.fine_boost in FINE_BOOSTS
    assert chosen == best(record.candidates) and chosen.objective >= max(r.objective for r in record.candidates) - TIE
    assert meta.score.top_k == chosen.top_k == top_k_for(S) and meta.model.memory_boost == chosen.memory_boost
    assert meta.model.fine_memory_size == (2048 if chosen.fine_boost else 0) and meta.export is None
    model = load_sku(sku)
    seg = model.segmenter
    x = torch.from_numpy(preprocess(np.stack([render_part("brick", S, np.random.default_rng(i)) for i in range(2)])))
    with torch.no_grad():
        learnt, memory, fine = seg.map_terms(x, x)
        maps = model.anomaly_maps(x)
    assert float(learnt.abs().max()) == 0.0  # the decoder and learnt gain are off
    expected = torch.sigmoid(chosen.memory_boost * memory + chosen.fine_boost * fine)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    # the map skips the reconstruction and decoder (memory_only), and the full pipeline gives the same map
    assert meta.model.memory_only
    assert meta.model.memory_profile and float(seg.memory_center.std()) > 0 and float(seg.memory_spread.std()) > 0
    with torch.no_grad():
        torch.testing.assert_close(maps, seg(x, model.reconstruct(x)), atol=1e-6, rtol=0)


def test_once_chosen_the_memory_also_remembers_the_held_out_images(mvtec_root: Path,
                                                                   opened: tuple[Path, list[Path]]) -> None:
    sku, _ = opened
    record = read_manifest(sku).selection
    assert record is not None and record.remembered == 12  # every training image, the 2 held out included
    train = sorted((mvtec_root / "brick" / "train" / "good").iterdir())
    owners = set(load_sku(sku).segmenter.memory_owner.tolist())  # source image of each memory entry
    assert set(validation_indices(len(train), 0.2).tolist()) <= owners <= set(range(len(train)))


def test_a_quick_sku_goes_through_the_same_export_and_onnx_runtime(opened: tuple[Path, list[Path]],
                                                                   tmp_path: Path) -> None:
    import shutil

    import onnx

    sku = Path(shutil.copytree(opened[0], tmp_path / "sku"))
    assert main(["export", "--sku-dir", str(sku)]) == 0
    assert_parity(sku, part_frames(4, S))  # the quick SKU is served like any other, within the fp32 bound
    # its whole-pipeline graph is the memory search alone, smaller than the segmenter graph it skips
    nodes = {name: len(onnx.load(str(sku / f"{name}.onnx")).graph.node) for name in ("tdad", "segmenter")}
    assert nodes["tdad"] < nodes["segmenter"], nodes
    # no schedule changes its maps, so an override keeps the unrolled graph; the part graphs (reconstruction, the
    # segmenter with its learnt evidence zeroed) give the same maps
    from engines.runtime import OnnxRuntimeSettings, create_engine
    from engines.runtime.onnx_backend import OnnxEngine

    override = {"t1": 80, "steps1": 2, "t2": 300, "steps2": 3}
    assert create_engine(OnnxRuntimeSettings(threads=1), sku, schedule_override=override).describe()["unrolled"]
    frames = part_frames(2, S)
    engine = create_engine(OnnxRuntimeSettings(threads=1), sku)
    unrolled = engine.infer(frames)
    timed, stages = engine.infer_timed(frames)  # the benchmark's stage table: its one graph, as the segment stage
    assert set(stages) == {"preprocess", "segment"} and np.array_equal(timed, unrolled)
    parts = OnnxEngine(OnnxRuntimeSettings(threads=1), unrolled=False)
    parts.load(sku)
    assert not parts.describe()["unrolled"]
    np.testing.assert_allclose(parts.infer(frames), unrolled, atol=1e-3, rtol=0)


def test_calibration_refuses_good_parts_the_sku_was_trained_on_even_as_copies(
        mvtec_root: Path, opened: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A threshold fit on remembered images sits far below new good parts' scores (79 % of new good
    `magnetic_tile` parts rejected, docs/onboarding.md): calibration must not take them, under any name."""
    import shutil

    sku = Path(shutil.copytree(opened[0], tmp_path / "sku"))
    train = mvtec_root / "brick" / "train" / "good"
    assert read_manifest(sku).trained_on  # every training image, the held-out ones included
    assert main(["export", "--sku-dir", str(sku)]) == 0
    calibrate = ["calibrate", "--sku-dir", str(sku), "--frr", "0.2", "--threads", "1", "--good"]
    assert main([*calibrate, str(train)]) == 2
    said = capsys.readouterr().err.strip()
    assert f"12 of the 12 good images under {train}" in said and "trained on or taught" in said
    assert "\n" not in said
    fresh = write_good_folder(tmp_path / "fresh", 10, S, seed=77)
    copy = fresh / "renamed.png"
    shutil.copyfile(sorted(train.iterdir())[5], copy)
    assert main([*calibrate, str(fresh)]) == 2
    assert f"1 of the 11 good images under {fresh} (e.g. {copy})" in capsys.readouterr().err
    copy.unlink()
    assert main([*calibrate, str(fresh)]) == 0


def test_eval_says_no_test_file_fed_the_choice_and_refuses_a_hand_tuned_sku(
        mvtec_root: Path, opened: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sku, _ = opened
    base = ["eval", "--sku-dir", str(sku), "--dataset", "mvtec", "--root", str(mvtec_root), "--category", "brick",
            "--backend", "torch", "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "eval"), "--require-held-out"]) == 0
    said = capsys.readouterr().out
    assert "chosen on 12 training images cross-fitted in 5 folds" in said
    assert "none of the 11 evaluated files was trained on or fed any choice" in said  # 7 images + 4 masks
    # a training image copied into the test split under another name is caught by its content
    import shutil

    leaked = Path(shutil.copytree(mvtec_root, tmp_path / "leaked"))
    shutil.copyfile(sorted((leaked / "brick" / "train" / "good").iterdir())[0],
                    leaked / "brick" / "test" / "good" / "new_part.png")
    assert main([*base[:6], str(leaked), *base[7:], "--out", str(tmp_path / "e1"), "--require-held-out"]) == 2
    assert "WARNING: 1 of the 12 evaluated files were trained on or fed that choice" in capsys.readouterr().err
    hand = tmp_path / "hand"
    assert main(["train", "--out", str(hand), "--dataset", "mvtec", "--data", str(mvtec_root), "--category",
                 "brick", "--quick", "--no-select", *QUICK]) == 0
    assert read_manifest(hand).selection is None
    assert main(["eval", "--sku-dir", str(hand), *base[3:], "--out", str(tmp_path / "e2"),
                 "--require-held-out"]) == 2
    assert "no selection record" in capsys.readouterr().err


def test_scrap_parts_join_the_choice_with_their_own_metrics(mvtec_root: Path, tmp_path: Path) -> None:
    import shutil

    import cv2

    ng, masks = tmp_path / "ng", tmp_path / "ng_masks"
    ng.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        image, mask = draw_defect(render_part("brick", S, rng), rng)
        cv2.imwrite(str(ng / f"scrap_{i}.png"), image[..., ::-1])
        cv2.imwrite(str(masks / f"scrap_{i}_mask.png"), mask.astype(np.uint8) * 255)
    out = tmp_path / "sku"
    assert main(["train", "--out", str(out), "--dataset", "mvtec", "--data", str(mvtec_root), "--category", "brick",
                 "--quick", *QUICK, "--ng", str(ng), "--ng-masks", str(masks)]) == 0
    record = read_manifest(out).selection
    assert record is not None and record.ng == 4 and record.ng_masks and len(record.ng_files) == 4
    assert all(r.ng_image_auroc is not None and r.ng_aupro is not None for r in record.candidates)
    # the scrap parts are recognised by content where they turn up in a test split (bench/scrap_split.py copies)
    from calibration.evaluate import held_out_line

    copies = [tmp_path / "test" / f"part_{i}.png" for i in range(2)]
    copies[0].parent.mkdir()
    shutil.copyfile(ng / "scrap_2.png", copies[0])
    write_good_folder(tmp_path / "fresh", 1, S, seed=99)
    shutil.copyfile(tmp_path / "fresh" / "good_000.png", copies[1])
    line, overlap = held_out_line(read_manifest(out), copies)
    assert overlap == 1 and "WARNING: 1 of the 2 evaluated files were trained on or fed that choice" in line


def test_a_scrap_part_that_is_also_a_good_training_image_is_refused_before_training(
        mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    ng = tmp_path / "ng"
    ng.mkdir()
    shutil.copyfile(sorted((mvtec_root / "brick" / "train" / "good").iterdir())[3], ng / "scrap_a.png")
    out = tmp_path / "sku"
    assert main(["train", "--out", str(out), "--dataset", "mvtec", "--data", str(mvtec_root), "--category", "brick",
                 "--quick", *QUICK, "--ng", str(ng)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"1 of the 1 scrap parts under {ng} (e.g. {ng / 'scrap_a.png'})" in err[0]
    assert not out.exists()  # refused before anything was trained


def test_best_prefers_the_cheaper_candidate_within_a_tie() -> None:
    def row(b: float, f: float, objective: float) -> SelectionCandidate:
        return SelectionCandidate(memory_boost=b, fine_boost=f, top_k=25, objective=objective)

    rows = [row(2, 1, 0.90), row(4, 0, 0.90 - TIE / 2), row(1, 0, 0.90 - TIE / 2), row(8, 2, 0.5)]
    assert best(rows).key() == (1, 0, 25)  # no fine memory, then the smallest boost, within the tie
    assert best([*rows, row(8, 2, 0.95)]).key() == (8, 2, 25)  # a clear win is a clear win


def test_cli_choices_come_with_their_inputs(mvtec_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--out", str(tmp_path), "--data", "d", "--device", "cpu")
    cfg, _ = config_from_args(_parse(*base))
    assert (cfg.holdout, cfg.fine_memory) == (0.2, 16384)  # a slice to choose on, a fine memory to weigh
    cfg, _ = config_from_args(_parse(*base, "--no-select"))
    assert (cfg.holdout, cfg.fine_memory) == (0.0, 0)  # as before selection: all images train
    quick, _ = config_from_args(_parse(*base, "--quick"))
    assert quick.quick and quick.memory == quick.inference_memory == PRESETS["small"]["inference_memory"]
    assert all(quick.steps(p) == 0 for p in ("autoencoder", "diffusion", "segmenter"))
    with pytest.raises(ConfigError, match=r"--ng .*: scrap parts only feed setting selection"):
        config_from_args(_parse(*base, "--no-select", "--ng", "scrap"))
    with pytest.raises(ConfigError, match="give one of them"):
        config_from_args(_parse(*base, "--tile-scale", "0.5", "--min-defect-px", "8"))
    with pytest.raises(ConfigError, match="quick=True needs a memory prior"):
        TrainConfig(data=Path("d"), out=tmp_path, quick=True)
    data = ("--out", str(tmp_path), "--dataset", "mvtec", "--data", str(mvtec_root), "--category", "brick",
            "--image-size", "32")
    # 64 px parts at a 32 px model size: the whole image is at 0.5 model px per camera px
    fine, _ = config_from_args(_parse(*data, "--min-defect-px", "4"))
    assert fine.tiling() is not None and (fine.tile_scale, fine.tile_overlap) == (1.0, 0.25)
    whole, _ = config_from_args(_parse(*data, "--min-defect-px", "8"))
    assert whole.tiling() is None and whole.min_defect_px == 8
    said = capsys.readouterr().out.splitlines()  # what the operator's number costs per frame
    assert said == ["--min-defect-px 4: inspected in tiles at 1 model px per camera px; a 64x64 image becomes "
                    "64x64, 3x3 tiles of 32 px, so a frame costs 9 engine passes",
                    "--min-defect-px 8: whole images; on a 64x64 image such a defect covers 4.0 model px of 32 "
                    "(4 are needed)"]
    with pytest.raises(ConfigError, match="--min-defect-px 0: the smallest defect must be a positive"):
        config_from_args(_parse(*data, "--min-defect-px", "0"))


def test_the_scale_for_a_defect_keeps_it_four_model_pixels_wide() -> None:
    assert scale_for_defect(12, [(576, 768)] * 3, 128) == 0.333  # a photo squashed to 128 px would keep 2
    assert scale_for_defect(12, [(256, 256)], 128) is None  # half scale keeps 6 px: whole images will do
    assert scale_for_defect(0.5, [(4096, 4096)], 128) == 4.0  # capped: the manifest allows up to 4x
    # a 5-Mpixel camera and 5 px defects: the line is told each frame is 357 passes of the engine
    assert inspection_scale_line(5, [(2048, 2448)], 128, scale_for_defect(5, [(2048, 2448)], 128)).endswith(
        "a 2448x2048 image becomes 1958x1638, 21x17 tiles of 128 px, so a frame costs 357 engine passes")


def test_the_remaining_time_counts_later_phases_at_their_relative_cost() -> None:
    cfg = TrainConfig(data=Path("d"), out=Path("o"), ae_steps=10, diffusion_steps=20, seg_steps=5)
    assert math.isclose(remaining_seconds(cfg, 2, 5, 1.0), 5.0)
    later = 20 * STEP_COST["diffusion"] + 5 * STEP_COST["segmenter"]  # in autoencoder steps
    assert math.isclose(remaining_seconds(cfg, 0, 4, 0.5), (4 + later) * 0.5)


def test_the_validation_slice_is_spread_and_only_for_sets_of_ten_or_more() -> None:
    assert validation_indices(21, 0.2).tolist() == [2, 7, 12, 17]
    assert len(validation_indices(762, 0.2)) == 152 and not len(validation_indices(9, 0.2))
    assert not len(validation_indices(100, 0.0))
