"""Structured logging: structlog on top of the standard library's ``stepvault`` logger.

The engine never configures logging on import: its events go to the standard
``logging`` module, silent below WARNING until the application (or
``configure_logging``) attaches a handler, which is what a library embedded in
other programs owes them. Unconfigured, a warning still reads as ``key=value`` text.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOGGER_NAME = "stepvault"
_STDLIB_LOGGER = logging.getLogger(LOGGER_NAME)

_renderer: Any = structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)


def _render(logger: Any, method_name: str, event_dict: Any) -> Any:
    """Render with whatever ``configure_logging`` chose last."""
    return _renderer(logger, method_name, event_dict)


_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _render,
]


def enabled(level: int) -> bool:
    """Tell whether the engine's events at ``level`` go anywhere.

    The hot path asks before logging: an event dropped by level still costs a
    bound logger's whole processing (an event dict, the level filter).
    """
    return _STDLIB_LOGGER.isEnabledFor(level)


def get_logger(**initial: Any) -> structlog.stdlib.BoundLogger:
    """Return the engine's logger with ``initial`` key-values bound."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(LOGGER_NAME),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=_PROCESSORS,
    )
    # bind() turns structlog's lazy proxy into a plain BoundLogger once, here: a
    # proxy would build a new logger on every bind, and the engine binds per attempt.
    return logger.bind(**initial)


def configure_logging(*, json: bool = False, level: int | str = "INFO") -> None:
    """Send the engine's events to stderr: a console view, or one JSON object a line.

    Calling it again replaces the previous configuration.
    """
    global _renderer  # noqa: PLW0603  # one switch read by every logger the engine made
    _renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
