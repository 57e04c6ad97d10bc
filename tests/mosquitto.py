"""A real mosquitto broker on a free loopback port for integration tests: the package's LocalBroker."""

from __future__ import annotations

from pathlib import Path

from inspector.broker import LocalBroker, free_port

MosquittoProcess = LocalBroker

__all__ = ["MosquittoProcess", "free_port", "start_mosquitto"]


def start_mosquitto(tmp_path: Path, port: int | None = None, extra_conf: str = "") -> LocalBroker:
    """Start mosquitto on 127.0.0.1 with anonymous access; persistence is off unless extra_conf sets it."""
    port = port or free_port()
    return LocalBroker(tmp_path / f"mosquitto-{port}", port, extra_conf=extra_conf).start()
