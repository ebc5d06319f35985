"""Adapters that let other orchestrators keep their state in stepvault.

Each adapter lives in its own module and imports its framework only there, so
``import engine`` never needs LangGraph or OpenTelemetry; a missing framework is
a ``MissingExtraError`` naming the extra that installs it.

- ``engine.integrations.langgraph``: ``StepvaultSaver``, a LangGraph checkpoint
  saver backed by any stepvault store.
"""

from __future__ import annotations

from ..errors import EngineError

__all__ = ["MissingExtraError"]


class MissingExtraError(EngineError, ImportError):
    """Raised when an optional integration's package is not installed; names the extra."""

    @classmethod
    def naming(cls, extra: str, what: str, cause: ImportError) -> MissingExtraError:
        """Build the error for ``what`` needing ``pip install 'stepvault[extra]'``."""
        missing = cause.name or "a package"
        return cls(
            f"{what} needs {missing}, which is not installed: pip install 'stepvault[{extra}]'"
        )
