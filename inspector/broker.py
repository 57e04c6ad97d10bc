"""A throw-away local mosquitto for the demo and the tests: free port, own config, stop/restart on demand."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from foundation.errors import InspectorError


def free_port() -> int:
    """Ask the kernel for an unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections at host:port (used to decide whether to start a broker)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class LocalBroker:
    """One mosquitto process listening on 127.0.0.1:port, anonymous; restartable on the same port.

    persistent=True keeps sessions and queued QoS 1 messages across restart() (saved on SIGTERM);
    extra_conf lines are appended to the generated mosquitto.conf. The process runs in a session of its own: a
    terminal's Ctrl-C reaches its owner, which stops it (after delivering what is in flight), not the broker.
    """

    def __init__(self, workdir: Path, port: int | None = None, persistent: bool = False, extra_conf: str = "") -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise InspectorError("mosquitto not found on PATH: install it (apt-get install mosquitto)")
        self.exe = exe
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        persistence = "persistence false\n"
        if persistent:
            persistence = f"persistence true\npersistence_location {self.workdir}/\n"
        if "persistence " in extra_conf:
            persistence = ""
        # `user`: a broker started as root would otherwise switch to `mosquitto` and fail to write workdir
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n{persistence}"
            f"max_queued_messages 100000\n{extra_conf}\n"
        )
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        """Launch mosquitto and wait until the port accepts connections."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InspectorError(f"mosquitto exited at start (port {self.port}); see {self.log_path}")
            if port_open("127.0.0.1", self.port, 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise InspectorError(f"mosquitto did not open port {self.port} within {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        """Terminate the broker (kill after 5 s) and wait for the port to close."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        """Start again on the same port (clients reconnect to the same address)."""
        self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_broker(workdir: Path, port: int | None = None, persistent: bool = False) -> LocalBroker:
    """Start a LocalBroker under workdir (config, log and persistence live there) and return it running."""
    return LocalBroker(workdir, port, persistent).start()
