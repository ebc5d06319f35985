"""One exception hierarchy: callers catch ``EngineError`` and still see the cause."""

from __future__ import annotations


class EngineError(Exception):
    """Raised for every failure stepvault reports; the root of the hierarchy."""


class SessionNotFoundError(EngineError):
    """Raised when a session id is unknown to the store."""


class SessionExpiredError(EngineError):
    """Raised when a session exists but its TTL has run out."""


class SessionLimitError(EngineError):
    """Raised when creating a session would exceed ``max_sessions``."""


class SessionBusyError(EngineError):
    """Raised when another runner holds the session's lock."""


class SessionCancelledError(EngineError):
    """Raised when waiting on or resuming a session that was cancelled."""


class InvalidArgumentError(EngineError, ValueError):
    """Raised when an argument is out of range: a TTL of zero, a negative retry count."""


class InvalidSessionIdError(EngineError, ValueError):
    """Raised when a session id is not a UUIDv4 string."""


class StorageError(EngineError):
    """Raised when the store cannot read or write (disk full, I/O error, permissions)."""


class CorruptSessionError(StorageError):
    """Raised when a stored record fails its checksum or cannot be decoded."""


class DecryptionError(StorageError):
    """Raised when a record cannot be decrypted: missing key, wrong key or tampered data."""


class SerializationError(EngineError):
    """Raised when a step's output or state cannot be encoded as JSON."""


class WorkflowDefinitionError(EngineError, TypeError):
    """Raised at declaration time when a workflow or step is malformed."""


class WorkflowMismatchError(EngineError):
    """Raised when a stored session no longer fits its workflow's steps."""


class StepFailedError(EngineError):
    """Raised when a step still fails after its retries; the session is marked failed."""

    def __init__(self, message: str, *, session_id: str, step: str) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.step = step


class StepTimeoutError(EngineError, TimeoutError):
    """Raised inside the runner when one attempt of a step exceeds its timeout."""


class LeaseLostError(EngineError):
    """Raised when a runner tries to commit for a session whose lease it no longer holds."""


class SessionExistsError(EngineError):
    """Raised when creating a session whose id is already stored."""
