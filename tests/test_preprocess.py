"""One input path: a training batch and a served frame of the same image reach the networks as the same tensor,
in every resize mode; aspect-preserving geometry and mask alignment."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.runtime.staged import preprocess_frames
from inspector.acquisition.folder import FolderSource
from inspector.archive import heatmap_overlay
from inspector.config import FolderCamera
from inspector.pipeline import map_rect
from inspector.pipeline import preprocess as pipeline_preprocess
from tdad.preprocess import RESIZE_MODES, Geometry, preprocess, resize_mask_to_model, resize_to_model
from tdad.schedule import Schedule
from tdad.training.data import FolderDataset, MVTecDataset
from tdad.training.train import StepBatches, TrainConfig

S = 64


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", [(96, 120), (40, 50), (64, 64)])
def test_training_and_serving_feed_identical_tensors(tmp_path: Path, shape: tuple[int, int], mode: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    folder = tmp_path / "good"
    folder.mkdir()
    cv2.imwrite(str(folder / "part.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    # training: the data set resizes, StepBatches preprocesses (foreground "none", so only the clean copy counts)
    train_image = FolderDataset(folder, S, resize=mode)[0].image  # type: ignore[arg-type]
    cfg = TrainConfig(data=folder, out=tmp_path / "sku", image_size=S, batch_size=2, foreground="none",
                      resize=mode)  # type: ignore[arg-type]
    batch = StepBatches(cfg, train_image[None], "autoencoder", Schedule())[0]

    # serving: the folder camera decodes, the pipeline crops/resizes, the runtime preprocesses
    source = FolderSource(FolderCamera(type="folder", path=folder, fps=0, loop=False))
    source.open()
    frame = next(iter(source.frames()))
    served_image, _ = pipeline_preprocess(frame.image, None, S, None, mode)  # type: ignore[arg-type]
    served = preprocess_frames(served_image[None], S)

    assert np.array_equal(served_image, train_image)
    assert batch["clean"].dtype == served.dtype == np.float32
    assert np.array_equal(batch["clean"][0], served[0]) and np.array_equal(batch["clean"][1], served[0])


def test_resize_picks_area_when_shrinking_and_linear_otherwise() -> None:
    image = np.random.default_rng(1).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert np.array_equal(resize_to_model(image, 64), cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_to_model(image, 90), cv2.resize(image, (90, 90), interpolation=cv2.INTER_LINEAR))
    assert preprocess(image[None, :64, :64]).shape == (1, 3, 64, 64)


def test_letterbox_keeps_the_aspect_and_pads_the_short_side_evenly() -> None:
    image = np.random.default_rng(2).integers(1, 256, (40, 80, 3), dtype=np.uint8)
    out = resize_to_model(image, 64, "letterbox")
    assert Geometry.fit(40, 80, 64, "letterbox") == Geometry(64, (32, 64), (0, 16))
    assert (out[:16] == 0).all() and (out[48:] == 0).all()
    assert np.array_equal(out[16:48], cv2.resize(image, (64, 32), interpolation=cv2.INTER_AREA))


def test_crop_fills_the_square_with_the_centre_of_the_resized_image() -> None:
    image = np.random.default_rng(3).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    out = resize_to_model(image, 64, "crop")
    assert Geometry.fit(40, 80, 64, "crop") == Geometry(64, (64, 128), (-32, 0))
    resized = cv2.resize(image, (128, 64), interpolation=cv2.INTER_LINEAR)  # 40 -> 64 grows: linear
    assert np.array_equal(out, resized[:, 32:96])
    assert np.array_equal(resize_to_model(image, 64), resize_to_model(image, 64, "stretch"))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_masks_follow_their_images_geometry(tmp_path: Path, mode: str) -> None:
    """A defect painted white on black at a multiple of the scale lands on the same model pixels as its mask."""
    image = np.zeros((128, 256, 3), dtype=np.uint8)
    mask = np.zeros((128, 256), dtype=bool)
    for x, y, w, h in ((8, 8, 8, 4), (200, 96, 16, 24), (120, 60, 4, 4)):  # near an edge, in a corner, centre
        image[y : y + h, x : x + w] = 255
        mask[y : y + h, x : x + w] = True
    model_image = resize_to_model(image, 64, mode)  # type: ignore[arg-type]
    model_mask = resize_mask_to_model(mask, 64, mode)  # type: ignore[arg-type]
    assert model_mask.dtype == bool and model_mask.shape == (64, 64) and model_mask.any()
    assert np.array_equal(model_mask, model_image[..., 0] > 127)

    # the same through a data set: the MVTec reader resizes image and mask with the SKU's mode
    base = tmp_path / "mvtec" / "part"
    for folder in (base / "test" / "spot", base / "ground_truth" / "spot"):
        folder.mkdir(parents=True)
    cv2.imwrite(str(base / "test" / "spot" / "000.png"), image)
    cv2.imwrite(str(base / "ground_truth" / "spot" / "000_mask.png"), mask.astype(np.uint8) * 255)
    item = MVTecDataset(tmp_path / "mvtec", "part", "test", 64, resize=mode)[0]  # type: ignore[arg-type]
    assert np.array_equal(item.image, model_image) and np.array_equal(item.mask, model_mask)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_served_regions_map_back_to_frame_pixels(mode: str) -> None:
    """A model pixel's placement (ROI origin, scale, padding or cut) points at the frame pixel it came from."""
    frame = np.zeros((300, 400, 3), dtype=np.uint8)
    roi = (40, 30, 240, 160)  # x, y, w, h: 3:2, so letterbox pads and crop cuts
    frame[110:118, 150:158] = 255  # an 8 x 8 spot inside the ROI (and inside the crop's centre)
    out, placement = pipeline_preprocess(frame, roi, 64, None, mode)  # type: ignore[arg-type]
    ys, xs = np.nonzero(out[..., 0] > 127)
    (ox, oy), (sx, sy) = placement.origin_xy, placement.scale_xy
    assert abs(xs.mean() * sx + ox - 153.5) <= sx and abs(ys.mean() * sy + oy - 113.5) <= sy


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_overlays_draw_the_map_where_it_came_from(mode: str) -> None:
    """The page's and the archive's heat map lands on the frame spot the hot model pixels saw, in every mode."""
    frame = np.zeros((300, 400, 3), dtype=np.uint8)
    roi = (40, 30, 240, 160)
    frame[110:118, 150:158] = 255
    out, placement = pipeline_preprocess(frame, roi, 64, None, mode)  # type: ignore[arg-type]
    anomaly = (out[..., 0] > 127).astype(np.float32)  # a map that is hot exactly where the spot is
    overlay = heatmap_overlay(np.zeros_like(frame), anomaly, map_rect(placement, anomaly.shape))
    ys, xs = np.nonzero(overlay[..., 2] > 100)  # JET's hot end is red (BGR channel 2)
    assert abs(xs.mean() - 153.5) <= 4 and abs(ys.mean() - 113.5) <= 4
