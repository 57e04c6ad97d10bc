"""Logging: module-level loggers follow the configuration made later, JSON off a TTY, level filtering."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import structlog

from foundation.log import bind_context, configure_logging, get_logger

log = get_logger(__name__)  # created before configure_logging, as every module does


@pytest.fixture(autouse=True)
def _fresh_context() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    bind_context(line=None, station=None, sku=None)
    structlog.configure(**saved)


def test_module_logger_writes_json_lines_to_stderr_after_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    bind_context(line="l1", station="s1", sku=None)
    log.info("frame_done", frame_id=7)
    log.debug("too_chatty")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "frame_done"
    assert event["frame_id"] == 7
    assert event["module"] == __name__
    assert event["level"] == "info"
    assert (event["line"], event["station"]) == ("l1", "s1")
    assert "sku" not in event


def test_context_reaches_events_logged_from_other_threads(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    bind_context(line="l2", station="s9", sku="widget")
    worker = threading.Thread(target=lambda: log.info("from_worker"))
    worker.start()
    worker.join()
    event = json.loads(capsys.readouterr().err.strip())
    assert (event["event"], event["line"], event["station"], event["sku"]) == ("from_worker", "l2", "s9", "widget")


def test_level_from_config_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", json=True)
    log.info("hidden")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert json.loads(err.strip())["event"] == "shown"
