"""Procedural parts, some with drawn defects: a camera stand-in for the demo and the tests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from inspector.acquisition.base import Frame, PacedSource
from inspector.config import SyntheticCamera


class SyntheticSource(PacedSource):
    """Renders `frames` parts (0 = endless) at `fps`; a seeded `defect_rate` fraction carries a defect; with
    `brightness_drift_per_frame`, the lighting drifts slowly (part n's gain is 1 + drift x (n - 1))."""

    def __init__(self, cfg: SyntheticCamera) -> None:
        super().__init__(cfg.fps)
        self._cfg = cfg
        self._opened = False
        self._defects = 0

    def open(self) -> None:
        """Import the renderer (tdad.training.sample_data, torch-free)."""
        from tdad.training import sample_data

        self._sample_data = sample_data
        self._opened = True

    def frames(self) -> Iterator[Frame]:
        """Yield parts; meta["defect"] tells whether a defect was drawn and meta["defect_mask"] where."""
        cfg = self._cfg
        rng = np.random.default_rng(cfg.seed)
        self._start_run()
        self._defects = 0
        while (cfg.frames == 0 or self.frames_produced < cfg.frames) and self._pace():
            image = self._sample_data.render_part(cfg.texture, max(cfg.width, cfg.height), rng)
            if cfg.width != cfg.height:
                image = cv2.resize(image, (cfg.width, cfg.height), interpolation=cv2.INTER_AREA)
            meta: dict[str, Any] = {"source": "synthetic", "texture": cfg.texture, "defect": False}
            if rng.random() < cfg.defect_rate:
                image, mask = self._sample_data.draw_defect(image, rng)
                meta.update(defect=True, defect_mask=mask)
                self._defects += 1
            if cfg.brightness_drift_per_frame:
                gain = max(0.0, 1.0 + cfg.brightness_drift_per_frame * self.frames_produced)
                image = cv2.convertScaleAbs(image, alpha=gain)  # saturating uint8: the scene under another lamp
            yield Frame(self._next_id(), time.time(), np.array(image, dtype=np.uint8), meta)

    def close(self) -> None:
        """Nothing to release; kept for the Source protocol."""
        self._opened = False

    def describe(self) -> dict[str, Any]:
        """Generator settings and counts for the status topic."""
        return {
            "type": "synthetic",
            "texture": self._cfg.texture,
            "frames": self.frames_produced,
            "defects": self._defects,
            "connected": self._opened,
            "reconnects": 0,
        }
