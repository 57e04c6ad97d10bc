"""A real mosquitto broker on a free loopback port for integration tests (Debian's `mosquitto` binary)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoProcess:
    """One broker process; stop() and restart() keep the port so clients can reconnect to it."""

    def __init__(self, conf: Path, port: int, log_path: Path) -> None:
        self.conf = conf
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch the broker and wait until it accepts connections."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self._proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, so a persistent broker saves its state) and wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


def start_mosquitto(tmp_path: Path, port: int | None = None, extra_conf: str = "") -> MosquittoProcess:
    """Start mosquitto on 127.0.0.1 with anonymous access; persistence is off unless extra_conf sets it."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = port or free_port()
    directory = tmp_path / f"mosquitto-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    # `user`: a root-started broker would otherwise switch to the `mosquitto` user and fail to write tmp_path
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", f"user {getpass.getuser()}"]
    if "persistence " not in extra_conf:
        lines.append("persistence false")
    conf = directory / "mosquitto.conf"
    conf.write_text("\n".join([*lines, extra_conf, ""]))
    broker = MosquittoProcess(conf, port, directory / "mosquitto.log")
    broker.start()
    return broker
