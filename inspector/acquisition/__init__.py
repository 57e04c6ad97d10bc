"""Image acquisition: the Source protocol and its implementations (GenTL camera, folder, video, synthetic).

`open_source` lives here, above the implementations, so none of them imports the module that imports them.
"""

from foundation.errors import ConfigError
from inspector.acquisition.base import Frame, PacedSource, Source
from inspector.config import CameraConfig


def open_source(camera_cfg: CameraConfig) -> Source:
    """Build the Source for a camera config (dispatch on its `type`); call open() on the result to start."""
    kind = camera_cfg.type
    if kind == "synthetic":
        from inspector.acquisition.synthetic import SyntheticSource

        return SyntheticSource(camera_cfg)
    if kind == "folder":
        from inspector.acquisition.folder import FolderSource

        return FolderSource(camera_cfg)
    if kind == "video":
        from inspector.acquisition.video import VideoSource

        return VideoSource(camera_cfg)
    if kind == "gentl":
        from inspector.acquisition.gentl import GenTLSource

        return GenTLSource(camera_cfg)
    raise ConfigError(f"camera.type = {kind!r} is unknown; use synthetic, folder, video or gentl")


__all__ = ["Frame", "PacedSource", "Source", "open_source"]
