"""structlog set-up: JSON lines for the journal when not on a TTY, coloured key-value on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

# line/station/sku of this daemon: process-wide, so events from every thread (paho's, the pipeline's) carry them
_PROCESS_CONTEXT: dict[str, Any] = {}

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog once for the process; `json=None` picks JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_process_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=_LEVELS[level], stream=sys.stderr, format="%(name)s: %(message)s")


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """A printer to whatever sys.stderr is now (a redirected or replaced stream keeps working)."""
    return structlog.PrintLogger(sys.stderr)


def _add_process_context(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Add the bound line/station/sku to an event unless the event names its own."""
    for key, value in _PROCESS_CONTEXT.items():
        event_dict.setdefault(key, value)
    return event_dict


def bind_context(**context: Any) -> None:
    """Attach line/station/sku (or any key) to every event logged afterwards, from any thread; None unbinds."""
    for key, value in context.items():
        if value is None:
            _PROCESS_CONTEXT.pop(key, None)
        else:
            _PROCESS_CONTEXT[key] = value


def get_logger(name: str | None = None, **bind: Any) -> Any:
    """A lazy structlog logger tagged with the module name: safe at import time, since it resolves the
    configuration on each call, so module-level loggers follow a later `configure_logging`."""
    if name:
        bind["module"] = name
    return structlog.get_logger(**bind)
