"""Operator-facing errors: one line that names the file or key at fault and the fix."""


class InspectorError(Exception):
    """An error an operator can cause and fix; caught once at the CLI/service edge, never a traceback."""


class ConfigError(InspectorError):
    """inspector.toml (or an environment override) is missing, malformed or inconsistent."""


class DataError(InspectorError):
    """A data set, image folder or SKU directory is missing, empty or laid out wrongly."""


class EngineError(InspectorError):
    """An inference backend cannot be created or loaded (missing extra, stale plan, bad SKU dir)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, capped, for one-line operator errors."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
