"""`inspector demo` as a person runs it: in a terminal, ended with Ctrl-C (SIGINT to the terminal's foreground
process group, which also holds any child that did not leave it), or with SIGTERM.

The demo runs in a pseudo-terminal that is its controlling terminal, on a copy of the session's trained SKU
(same recipe: nothing is trained here), with its own local mosquitto. Every wait is on an event: a line on the
terminal or the station page's status.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_RECIPE_SCALE
from tests.fixtures_engines import copy_sku
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# anywhere on a line: a log line written by another thread at the same moment can precede it without a newline
VERDICT_LINE = re.compile(r"#\s*\d+\s+(?:OK|NG)\s+score ")


class DemoInTerminal:
    """`inspector demo --frames 0` in a session of its own whose controlling terminal is a fresh pty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        config = workdir / "inspector.toml"  # port 1: no broker answers there, so the demo starts its own
        config.write_text(f'active_sku = "demo-brick"\n[mqtt]\nport = 1\n[skus.demo-brick]\n'
                          f'model_dir = "{workdir / "sku"}"\n')
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inspector.cli", "demo", "--config", str(config), "--workdir", str(workdir),
             "--frames", "0", "--train-scale", str(TEST_RECIPE_SCALE), "--threads", "1", "--web-port", "0",
             # a camera faster than the engine: a full queue, so frames are always in flight when the stop comes
             "--fps", "0", "--queue-depth", "8"],
            stdin=slave, stdout=slave, stderr=slave, cwd=REPO, start_new_session=True, preexec_fn=terminal_job)
        os.close(slave)
        self._master = master
        self._text: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 4096)
            except OSError:  # EIO: every process holding the terminal has closed it
                chunk = b""
            with self._cond:
                if not chunk:
                    self._text.append("")
                    self._cond.notify_all()
                    return
                self._text.append(chunk.decode(errors="replace").replace("\r\n", "\n"))
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """Everything the terminal showed so far."""
        with self._cond:
            return "".join(self._text)

    def wait_for(self, shown: Callable[[str], bool], timeout_s: float) -> bool:
        """Wait until shown(terminal text) holds."""
        with self._cond:
            return self._cond.wait_for(lambda: shown("".join(self._text)), timeout_s)

    def verdicts_shown(self) -> int:
        """Verdict lines printed so far."""
        return len(VERDICT_LINE.findall(self.text))

    def broker_pid(self) -> int:
        """The pid of the mosquitto this demo started (the one reading <workdir>/broker/mosquitto.conf)."""
        pids = broker_pids(self.workdir)
        assert len(pids) == 1, (pids, self.text)
        return pids[0]

    def acquired(self) -> int:
        """Frames the daemon has taken from the camera, from the station page's /api/status."""
        url = re.search(r"station page: (http://\S+/)", self.text)
        assert url is not None, self.text
        with urllib.request.urlopen(f"{url.group(1)}api/status", timeout=5) as response:
            return int(json.loads(response.read())["status"]["stats"]["acquired"])

    def finish(self, timeout_s: float) -> int:
        """The exit status, after the terminal has shown everything."""
        rc = self.proc.wait(timeout_s)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """Leave nothing behind after a failed test: the demo's process group and its broker."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in broker_pids(self.workdir):
            os.kill(pid, signal.SIGKILL)
        os.close(self._master)


def terminal_job() -> None:
    """In the child, after setsid(): the pty on fd 0 becomes its controlling terminal and Ctrl-C has its default
    action, as for a job a shell starts in the foreground."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def broker_pids(workdir: Path) -> list[int]:
    """Live mosquitto processes started with <workdir>/broker/mosquitto.conf."""
    conf = str(workdir / "broker" / "mosquitto.conf").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if conf in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def demo(tmp_path: Path, trained_sku: Path) -> Iterator[DemoInTerminal]:
    workdir = tmp_path / "demo"
    copy_sku(trained_sku, workdir / "sku")
    running = DemoInTerminal(workdir)
    yield running
    running.kill()


def received_summary(text: str) -> tuple[int, int]:
    """(frames acquired, verdicts received) from the printed summary."""
    acquired = re.search(r"^frames acquired\s+(\d+)$", text, re.MULTILINE)
    received = re.search(r"^verdicts received\s+(\d+)$", text, re.MULTILINE)
    assert acquired is not None and received is not None, text
    return int(acquired.group(1)), int(received.group(1))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_the_endless_demo_drains_delivers_every_verdict_exits_0_and_stops_its_broker(
        demo: DemoInTerminal, how: str) -> None:
    assert demo.wait_for(lambda text: len(VERDICT_LINE.findall(text)) >= 10, 300), demo.text
    assert demo.broker_pid()
    if how == "ctrl-c":
        os.killpg(demo.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    else:
        demo.proc.send_signal(signal.SIGTERM)
    rc = demo.finish(120)
    text = demo.text
    assert rc == 0, text
    assert "demo_verdicts_missing" not in text and "not delivered" not in text
    acquired, received = received_summary(text)
    assert received == acquired >= 10
    assert demo.verdicts_shown() == acquired
    assert broker_pids(demo.workdir) == []


def test_a_second_ctrl_c_during_the_drain_exits_promptly_says_what_was_not_delivered_and_stops_the_broker(
        demo: DemoInTerminal) -> None:
    assert demo.wait_for(lambda text: len(VERDICT_LINE.findall(text)) >= 5, 300), demo.text
    broker = demo.broker_pid()
    os.kill(broker, signal.SIGSTOP)  # the broker hangs (TCP up, nothing delivered): the drain cannot finish
    assert wait_until(lambda: demo.acquired() > demo.verdicts_shown() + 2, 60)
    os.killpg(demo.proc.pid, signal.SIGINT)
    assert demo.wait_for(lambda text: "draining" in text, 60), demo.text
    t0 = time.monotonic()
    os.killpg(demo.proc.pid, signal.SIGINT)
    rc = demo.finish(60)
    elapsed = time.monotonic() - t0
    text = demo.text
    assert rc == 1, text
    assert elapsed < 20, (elapsed, text)  # the demo's 30 s wait for the missing verdicts is not sat out
    assert re.search(r"\d+ of \d+ verdicts not delivered", text), text
    acquired, received = received_summary(text)
    assert received < acquired
    assert broker_pids(demo.workdir) == []
