"""Logging through structlog: readable on a terminal, one JSON object a line with
``--log-format json``. Logs go to stderr so that tables and ``--json`` output on
stdout stay machine-readable."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TypeAlias

import structlog
from structlog.typing import FilteringBoundLogger

LogFormat = Literal["console", "json"]
Logger: TypeAlias = FilteringBoundLogger  # what get_logger returns and steps log through
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(fmt: LogFormat = "console", level: str = "info") -> None:
    """Configure structlog once for the process (the CLI calls this)."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*args: Any) -> structlog.PrintLogger:
    # Looked up at each use, not at configure time: the stream may be replaced later
    # (pytest's capture, a redirected stderr).
    return structlog.PrintLogger(file=sys.stderr)


def get_logger(name: str) -> Logger:
    """A structlog logger bound to ``name`` (the module)."""
    logger: Logger = structlog.get_logger(name)
    return logger
