"""Image acquisition: the Source protocol and its implementations (GenTL camera, folder, video, synthetic)."""

from inspector.acquisition.base import Frame, Source, open_source

__all__ = ["Frame", "Source", "open_source"]
