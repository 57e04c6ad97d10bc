"""The station page (live view, counters, NG strip, controls) and Prometheus /metrics, served by the daemon."""

from inspector.web.server import Station, StationWeb

__all__ = ["Station", "StationWeb"]
