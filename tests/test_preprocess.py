"""One input path: a training batch and a served frame of the same image reach the networks as the same tensor."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.data import FolderDataset
from engines.preprocess import preprocess, resize_to_model
from engines.runtime.staged import preprocess_frames
from engines.schedule import Schedule
from engines.train import StepBatches, TrainConfig
from inspector.acquisition.folder import FolderSource
from inspector.config import FolderCamera
from inspector.pipeline import preprocess as pipeline_preprocess

S = 64


@pytest.mark.parametrize("shape", [(96, 120), (40, 50), (64, 64)])
def test_training_and_serving_feed_identical_tensors(tmp_path: Path, shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    folder = tmp_path / "good"
    folder.mkdir()
    cv2.imwrite(str(folder / "part.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    # training: the data set resizes, StepBatches preprocesses (foreground "none", so only the clean copy counts)
    train_image = FolderDataset(folder, S)[0].image
    cfg = TrainConfig(data=folder, out=tmp_path / "sku", image_size=S, batch_size=2, foreground="none")
    batch = StepBatches(cfg, train_image[None], "autoencoder", Schedule())[0]

    # serving: the folder camera decodes, the pipeline crops/resizes, the runtime preprocesses
    source = FolderSource(FolderCamera(type="folder", path=folder, fps=0, loop=False))
    source.open()
    frame = next(iter(source.frames()))
    served_image, _ = pipeline_preprocess(frame.image, None, S, None)
    served = preprocess_frames(served_image[None], S)

    assert np.array_equal(served_image, train_image)
    assert batch["clean"].dtype == served.dtype == np.float32
    assert np.array_equal(batch["clean"][0], served[0]) and np.array_equal(batch["clean"][1], served[0])


def test_resize_picks_area_when_shrinking_and_linear_otherwise() -> None:
    image = np.random.default_rng(1).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    assert np.array_equal(resize_to_model(image, 64), cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_to_model(image, 90), cv2.resize(image, (90, 90), interpolation=cv2.INTER_LINEAR))
    assert preprocess(image[None, :64, :64]).shape == (1, 3, 64, 64)
