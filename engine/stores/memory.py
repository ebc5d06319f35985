"""MemoryStore: keeps sessions in this process, for tests and examples only."""

from __future__ import annotations

from ..errors import LeaseLostError, SessionExistsError, SessionNotFoundError, StorageError
from ..models import Checkpoint, Session, SessionInfo
from .base import Lease, validate_session_id


class MemoryStore:
    """A store that forgets everything when the process ends.

    Sessions are copied in and out, so callers cannot change stored data by
    mutating what they hold, just as with a real store.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._owners: dict[str, str] = {}

    async def create(self, session: Session) -> None:
        """Store a new session; ``SessionExistsError`` if the id is taken."""
        session_id = validate_session_id(session.id)
        if session_id in self._sessions:
            raise SessionExistsError(f"session {session_id} already exists")
        self._sessions[session_id] = session.model_copy(deep=True)

    async def load(self, session_id: str) -> Session | None:
        """Return a copy of the session, or None."""
        stored = self._sessions.get(validate_session_id(session_id))
        return None if stored is None else stored.model_copy(deep=True)

    async def save(self, session: Session) -> None:
        """Replace a stored session whole."""
        stored = self._sessions.get(validate_session_id(session.id))
        if stored is None:
            raise SessionNotFoundError(f"session {session.id} not found")
        session.revision = stored.revision + 1
        self._sessions[session.id] = session.model_copy(deep=True)

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Apply a checkpoint under ``lease``."""
        if self._owners.get(lease.session_id) != lease.owner:
            raise LeaseLostError(f"session {lease.session_id}: lease held by another runner")
        stored = self._sessions.get(lease.session_id)
        if stored is None:
            raise SessionNotFoundError(f"session {lease.session_id} not found")
        if checkpoint.revision != stored.revision + 1:
            raise StorageError(
                f"session {lease.session_id}: checkpoint revision {checkpoint.revision} "
                f"does not follow stored revision {stored.revision}"
            )
        stored.apply(checkpoint.model_copy(deep=True))

    async def delete(self, session_id: str) -> bool:
        """Remove a session; return whether it existed."""
        return self._sessions.pop(validate_session_id(session_id), None) is not None

    async def list(self) -> list[SessionInfo]:
        """Return a row per stored session."""
        return [SessionInfo.of(session) for session in self._sessions.values()]

    async def acquire(self, session_id: str, owner: str) -> Lease | None:
        """Take the session's lease unless another owner holds it."""
        if validate_session_id(session_id) not in self._sessions:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._owners:
            return None
        self._owners[session_id] = owner
        return Lease(session_id, owner)

    async def release(self, lease: Lease) -> None:
        """Give a lease back."""
        if self._owners.get(lease.session_id) == lease.owner:
            del self._owners[lease.session_id]

    async def close(self) -> None:
        """Drop every lease; the sessions stay until the process ends."""
        self._owners.clear()
