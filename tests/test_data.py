"""Data set layouts, errors an operator can cause, corrupt-file handling, the decode cache and the training-data
hash."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from foundation.errors import DataError
from foundation.images import load_image_rgb
from tdad.training.data import (
    DECODE_CACHE,
    DecodeCache,
    FolderDataset,
    MVTecDataset,
    VisADataset,
    file_list_hash,
    load_mask,
    open_dataset,
)
from tdad.training.sample_data import DEFECT_TYPES, TEXTURES, draw_defect, render_part
from tests.fixtures_data import damaged_copies, make_good_folder, make_mvtec_tree, make_visa_tree


def test_folder_dataset_is_recursive_and_ignores_hidden_and_non_images(tmp_path: Path) -> None:
    make_good_folder(tmp_path, n=3, size=24)
    make_good_folder(tmp_path / "line2", n=2, size=24, seed=1)
    make_good_folder(tmp_path / ".thumbs", n=2, size=24)
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = FolderDataset(tmp_path, image_size=16)
    assert len(dataset) == 5
    for item in dataset:
        assert item.image.shape == (16, 16, 3) and item.image.dtype == np.uint8
        assert item.mask is None and item.label == 0 and item.defect_type == "good"


def test_mvtec_train_and_test_counts_labels_and_masks(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "brick", n_train=5, n_test_good=3, n_test_bad=4, size=32)
    train = MVTecDataset(tmp_path, "brick", "train", image_size=32)
    assert len(train) == 5 and {i.label for i in train} == {0} and all(i.mask is None for i in train)
    (tmp_path / "brick" / "test" / ".ipynb_checkpoints").mkdir()
    test = MVTecDataset(tmp_path, "brick", "test", image_size=16)
    assert len(test) == 7
    assert sorted(i.label for i in test) == [0] * 3 + [1] * 4
    assert {i.defect_type for i in test} == {"good", "scratch", "blob", "spot", "missing"}
    for item in test:
        assert item.mask is not None and item.mask.shape == (16, 16) and item.mask.dtype == bool
        assert item.mask.any() == bool(item.label)


def test_mvtec_masks_mark_exactly_the_drawn_defect(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, n_train=1, n_test_good=1, n_test_bad=4, size=32)
    for item in MVTecDataset(tmp_path, "brick", "test", image_size=32):
        if item.label:
            assert item.mask is not None
            assert np.array_equal(item.image[item.mask].min(axis=0), item.image[item.mask].max(axis=0))


def test_visa_split_csv_counts_labels_and_masks(tmp_path: Path) -> None:
    make_visa_tree(tmp_path, "brick", n_train=4, n_test_good=2, n_test_bad=3, size=32)
    make_visa_tree(tmp_path, "grass", n_train=2, n_test_good=1, n_test_bad=1, size=32)
    train = VisADataset(tmp_path, "brick", "train", image_size=16)
    assert len(train) == 4 and all(i.label == 0 and i.mask is None for i in train)
    test = VisADataset(tmp_path, "brick", "test", image_size=16)
    assert sorted(i.label for i in test) == [0, 0, 1, 1, 1]
    for item in test:
        assert item.mask is not None and item.mask.shape == (16, 16)
        assert item.mask.any() == bool(item.label)
    assert len(VisADataset(tmp_path, "grass", "test", image_size=16)) == 2


def test_open_dataset_dispatches_by_kind(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path / "mvtec", n_train=2, n_test_good=1, n_test_bad=1)
    make_visa_tree(tmp_path / "visa", n_train=2, n_test_good=1, n_test_bad=1)
    make_good_folder(tmp_path / "folder", n=2)
    assert isinstance(open_dataset("mvtec", tmp_path / "mvtec", "brick", "train", 16), MVTecDataset)
    assert isinstance(open_dataset("visa", tmp_path / "visa", "brick", "test", 16), VisADataset)
    assert isinstance(open_dataset("folder", tmp_path / "folder", None, "train", 16), FolderDataset)
    with pytest.raises(DataError, match="needs a category"):
        open_dataset("mvtec", tmp_path / "mvtec", None, "train", 16)
    with pytest.raises(DataError, match="unknown data set kind"):
        open_dataset("coco", tmp_path, "brick", "train", 16)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unknown split"):
        open_dataset("mvtec", tmp_path / "mvtec", "brick", "val", 16)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda root: FolderDataset(root, 16), "expected a folder of good images"),
        (lambda root: MVTecDataset(root, "bottle", "train", 16), "expected MVTec AD layout"),
        (lambda root: MVTecDataset(root, "bottle", "test", 16), "expected MVTec AD layout"),
        (lambda root: VisADataset(root, "candle", "train", 16), "expected VisA layout"),
    ],
)
def test_empty_folder_names_the_path_and_the_expected_layout(tmp_path: Path, build, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        build(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_wrong_layout_is_reported(tmp_path: Path) -> None:
    make_good_folder(tmp_path / "bottle", n=2)
    with pytest.raises(DataError, match=r"bottle/train/good: expected MVTec AD layout"):
        MVTecDataset(tmp_path, "bottle", "train", 16)
    make_mvtec_tree(tmp_path / "m", n_train=1, n_test_good=1, n_test_bad=2)
    next((tmp_path / "m" / "brick" / "ground_truth").rglob("*_mask.png")).unlink()
    with pytest.raises(DataError, match="missing ground-truth mask"):
        MVTecDataset(tmp_path / "m", "brick", "test", 16)
    make_visa_tree(tmp_path / "v", n_train=2, n_test_good=1, n_test_bad=1)
    (tmp_path / "v" / "split_csv" / "1cls.csv").write_text("name,path\na,b\n")
    with pytest.raises(DataError, match="expected object,split,label,image,mask"):
        VisADataset(tmp_path / "v", "brick", "train", 16)


def test_corrupt_images_are_skipped_and_reported(tmp_path: Path) -> None:
    make_good_folder(tmp_path, n=3, size=24)
    text = tmp_path / "good_001.png"
    text.write_text("this is not a png")
    truncated = tmp_path / "good_002.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with capture_logs() as logs:
        dataset = FolderDataset(tmp_path, image_size=16)
        assert len(dataset) == 2
        items = list(dataset)
    assert [i.path.name for i in items] == ["good_000.png", "good_000.png"]
    assert dataset.skipped == [text, truncated]
    assert [e["path"] for e in logs if e["event"] == "image_skipped"] == [str(text), str(truncated)]


def test_training_images_the_decoder_had_to_repair_are_skipped_with_a_one_line_error(tmp_path: Path) -> None:
    make_good_folder(tmp_path, n=1, size=24)
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8), (256, 192))
    jpeg, png = (cv2.imencode(ext, rgb)[1].tobytes() for ext in (".jpg", ".png"))
    damaged = damaged_copies(jpeg, png)
    for name, (data, said) in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as info:
            load_image_rgb(tmp_path / name)
        assert name in str(info.value) and said in str(info.value) and "\n" not in str(info.value)
    with capture_logs() as logs:
        dataset = FolderDataset(tmp_path, image_size=16)
        items = list(dataset)
    assert {i.path.name for i in items} == {"good_000.png"}
    assert sorted(p.name for p in dataset.skipped) == sorted(damaged)
    reasons = {Path(e["path"]).name: e["reason"] for e in logs if e["event"] == "image_skipped"}
    assert all(said in reasons[name] for name, (_, said) in damaged.items())


def test_all_corrupt_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("nope")
    with pytest.raises(DataError, match=f"no readable images under {re.escape(str(tmp_path))}"):
        FolderDataset(tmp_path, 16)


def test_load_image_rgb_returns_rgb_and_names_unreadable_files(tmp_path: Path) -> None:
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert load_image_rgb(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(DataError, match=r"missing\.png"):
        load_image_rgb(tmp_path / "missing.png")


def test_images_deeper_than_8_bits_are_refused_in_one_line_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    # a Mono12 camera's frames saved in 16 bits: an 8-bit decode keeps the high byte, a black image (0-15)
    mono12 = np.random.default_rng(0).integers(0, 4096, (24, 32), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "mono12.png"), mono12)
    cv2.imwrite(str(tmp_path / "rgb16.tif"), np.dstack([mono12] * 3))
    for name, dtype in (("mono12.png", "uint16"), ("rgb16.tif", "uint16")):
        with pytest.raises(DataError) as info:
            load_image_rgb(tmp_path / name)
        said = str(info.value)
        assert name in said and dtype in said and "save it as 8-bit" in said and "\n" not in said
    with pytest.raises(DataError, match=r"all 2 files failed to decode \(cannot use image .*save it as 8-bit"):
        list(FolderDataset(tmp_path, image_size=16))


def test_masks_keep_their_defect_at_any_bit_depth(tmp_path: Path) -> None:
    drawn = np.zeros((8, 8), np.uint16)
    drawn[2:4, 3:6] = 1  # 0/1 values: an 8-bit read of the 16-bit file would give an empty mask
    cv2.imwrite(str(tmp_path / "a_mask.png"), drawn)
    cv2.imwrite(str(tmp_path / "b_mask.png"), (drawn * 255).astype(np.uint8))
    for name in ("a_mask.png", "b_mask.png"):
        assert np.array_equal(load_mask(tmp_path / name), drawn > 0), name


def test_file_list_hash_tracks_files_not_location(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path / "a", n_train=3, n_test_good=1, n_test_bad=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    hash_a = file_list_hash(MVTecDataset(tmp_path / "a", "brick", "test", 16))
    assert hash_a == file_list_hash(MVTecDataset(tmp_path / "b", "brick", "test", 16))
    assert hash_a != file_list_hash(MVTecDataset(tmp_path / "a", "brick", "train", 16))
    make_good_folder(tmp_path / "b" / "brick" / "test" / "good", n=2, seed=5)
    assert hash_a != file_list_hash(MVTecDataset(tmp_path / "b", "brick", "test", 16))


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_draw_defect_is_visible_and_masked_exactly(kind: str) -> None:
    rng = np.random.default_rng(9)
    for texture in TEXTURES:
        part = render_part(texture, 48, rng)
        assert part.shape == (48, 48, 3) and part.dtype == np.uint8
        defective, mask = draw_defect(part, rng, kind)
        assert mask.dtype == bool and mask.any()
        assert np.array_equal(defective[~mask], part[~mask])
        contrast = np.abs(defective[mask].astype(int) - part[mask].astype(int)).mean()
        assert contrast > 40, f"{kind} on {texture} is barely visible"


def test_sample_data_rejects_unknown_names() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="unknown sample texture 'marble'"):
        render_part("marble", 16, rng)
    with pytest.raises(DataError, match="unknown defect kind 'dent'"):
        draw_defect(np.zeros((16, 16, 3), np.uint8), rng, "dent")


def test_decoded_items_are_cached_identical_read_only_and_hit(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, n_train=1, n_test_good=2, n_test_bad=3, size=40)
    DECODE_CACHE.clear()
    first = [(i.image, i.mask) for i in MVTecDataset(tmp_path, "brick", "test", 32)]
    assert DECODE_CACHE.hits == 0 and DECODE_CACHE.misses == 5 + 3  # 5 images, 3 masks (good masks are built)
    uncached = MVTecDataset(tmp_path, "brick", "test", 32)
    uncached.cache = None
    again = [(i.image, i.mask) for i in MVTecDataset(tmp_path, "brick", "test", 32)]  # a second pass, as eval's rows
    assert DECODE_CACHE.hits == 8 and DECODE_CACHE.misses == 8
    for (image, mask), (image2, mask2), plain in zip(first, again, uncached, strict=True):
        assert image2 is image and np.array_equal(mask2, mask)
        assert np.array_equal(image, plain.image) and np.array_equal(mask, plain.mask)
        assert not image.flags.writeable
    smaller = MVTecDataset(tmp_path, "brick", "test", 16)
    files = 1 + (smaller.records[0].mask_path is not None)
    smaller[0]  # another size is another entry
    MVTecDataset(tmp_path, "brick", "test", 32, resize="letterbox")[0]  # so is another resize mode
    assert DECODE_CACHE.misses == 8 + 2 * files


def test_a_tiled_skus_data_set_scales_images_and_masks_once_keeping_their_aspect(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, n_train=1, n_test_good=1, n_test_bad=2, size=40)
    DECODE_CACHE.clear()
    whole = [i.image for i in MVTecDataset(tmp_path, "brick", "test", 32)]
    tiled = open_dataset("mvtec", tmp_path, "brick", "test", 32, tile_scale=0.5)
    assert tiled.tile_scale == 0.5 and DECODE_CACHE.misses == 3 + 2
    for item, image in zip(tiled, whole, strict=True):
        assert item.image.shape == (20, 20, 3) and image.shape == (32, 32, 3)  # a scale is another cache entry
        assert item.mask is not None and item.mask.shape == (20, 20) and item.mask.any() == bool(item.label)
        raw = load_image_rgb(item.path)
        np.testing.assert_allclose(item.image, cv2.resize(raw, (20, 20), interpolation=cv2.INTER_AREA), atol=0)
    assert DECODE_CACHE.misses == 2 * (3 + 2)
    list(open_dataset("mvtec", tmp_path, "brick", "test", 32, tile_scale=0.5))
    assert DECODE_CACHE.misses == 2 * (3 + 2)  # decoded and scaled once
    with pytest.raises(DataError, match="tile scale"):
        FolderDataset(tmp_path / "brick" / "train", 32, tile_scale=0.0)


def test_a_changed_file_is_decoded_again(tmp_path: Path) -> None:
    make_good_folder(tmp_path, n=1, size=24)
    path = tmp_path / "good_000.png"
    DECODE_CACHE.clear()
    before = FolderDataset(tmp_path, 16)[0].image
    cv2.imwrite(str(path), np.full((24, 24, 3), 200, np.uint8))
    after = FolderDataset(tmp_path, 16)[0].image
    assert DECODE_CACHE.misses == 2 and (after == 200).all() and not np.array_equal(before, after)


def test_the_cache_evicts_least_recently_used_arrays_beyond_its_budget() -> None:
    cache = DecodeCache(max_bytes=3 * 100)
    keys = [(f"/f{i}", 0, 0, 10, "stretch", None) for i in range(4)]
    for key in keys[:3]:
        cache.get(key, lambda: np.zeros(100, np.uint8))
    cache.get(keys[0], lambda: np.ones(100, np.uint8))  # a hit: keys[0] becomes the most recent
    cache.get(keys[3], lambda: np.zeros(100, np.uint8))  # over budget: keys[1] goes
    assert cache.nbytes == 300 and (cache.hits, cache.misses) == (1, 4)
    cache.get(keys[1], lambda: np.zeros(100, np.uint8))
    assert cache.misses == 5
    assert cache.get(("/huge", 0, 0, 10, "stretch"), lambda: np.zeros(400, np.uint8)).size == 400  # never cached
    assert cache.nbytes == 300
