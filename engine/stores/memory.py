"""MemoryStore: keeps sessions in this process, for tests and examples only."""

from __future__ import annotations

import itertools

from .. import codec
from ..errors import (
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..models import Checkpoint, Session, SessionInfo
from .base import DEFAULT_LEASE_TTL, Lease, check_fresh, validate_session_id


def _copy(session: Session, what: str) -> Session:
    # Through JSON, as every real store does: what a real store would refuse or
    # change (bytes, sets, tuples, int keys) must not pass silently here.
    return Session.model_validate_json(codec.dump_json(session, what))


class MemoryStore:
    """A store that forgets everything when the process ends.

    Sessions are copied in and out through JSON, so callers cannot change stored
    data by mutating what they hold, and what a real store would refuse is refused
    here too.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._leases: dict[str, Lease] = {}
        self._tokens = itertools.count(1)

    async def create(self, session: Session) -> None:
        """Store a new session; ``SessionExistsError`` if the id is taken."""
        session_id = validate_session_id(session.id)
        if session_id in self._sessions:
            raise SessionExistsError(f"session {session_id} already exists")
        self._sessions[session_id] = _copy(session, f"session {session_id}")

    async def load(self, session_id: str) -> Session | None:
        """Return a copy of the session, or None."""
        stored = self._sessions.get(validate_session_id(session_id))
        return None if stored is None else _copy(stored, f"session {session_id}")

    async def save(self, session: Session) -> None:
        """Replace a stored session whole; ``SessionBusyError`` while a lease is held."""
        session_id = validate_session_id(session.id)
        stored = self._sessions.get(session_id)
        if stored is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._leases:
            raise SessionBusyError(f"session {session_id} is being run by another runner")
        check_fresh(session_id, session.revision, stored.revision)
        replacement = _copy(session, f"session {session_id}")
        replacement.revision = session.revision = stored.revision + 1
        self._sessions[session_id] = replacement

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Apply a checkpoint under ``lease``."""
        session_id = validate_session_id(lease.session_id)
        if self._leases.get(session_id) != lease:
            raise LeaseLostError(f"session {session_id}: lease held by another runner")
        stored = self._sessions.get(session_id)
        if stored is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if checkpoint.revision != stored.revision + 1:
            raise StorageError(
                f"session {session_id}: checkpoint revision {checkpoint.revision} "
                f"does not follow stored revision {stored.revision}"
            )
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        stored.apply(Checkpoint.model_validate_json(codec.dump_json(checkpoint, what)))

    async def delete(self, session_id: str) -> bool:
        """Remove a session and its lease; return whether it existed."""
        self._leases.pop(validate_session_id(session_id), None)
        return self._sessions.pop(session_id, None) is not None

    async def list(self) -> list[SessionInfo]:
        """Return a row per stored session."""
        return [SessionInfo.of(session) for session in self._sessions.values()]

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Take the session's lease unless someone (this owner included) holds it."""
        if validate_session_id(session_id) not in self._sessions:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._leases:
            return None
        lease = self._leases[session_id] = Lease(session_id, owner, next(self._tokens))
        return lease

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Confirm the lease is still held: in one process a holder cannot vanish."""
        if self._leases.get(validate_session_id(lease.session_id)) != lease:
            raise LeaseLostError(f"session {lease.session_id}: this lease is not the one held")

    async def release(self, lease: Lease) -> None:
        """Give a lease back; a lease already given back is ignored."""
        if self._leases.get(validate_session_id(lease.session_id)) == lease:
            del self._leases[lease.session_id]

    async def close(self) -> None:
        """Drop every lease; the sessions stay until the process ends."""
        self._leases.clear()
