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
from ..models import Checkpoint, Event, Session, SessionInfo
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

    It takes events without the lease (``engine.events.EventInbox``): a posted
    event waits beside the session, numbered, until a checkpoint absorbs it.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._leases: dict[str, Lease] = {}
        self._tokens = itertools.count(1)
        self._posted: dict[str, list[Event]] = {}  # per session, in number order
        self._numbered: dict[str, int] = {}  # per session, the last number handed out

    async def create(self, session: Session) -> None:
        """Store a new session; ``SessionExistsError`` if the id is taken."""
        session_id = validate_session_id(session.id)
        if session_id in self._sessions:
            raise SessionExistsError(f"session {session_id} already exists")
        self._sessions[session_id] = _copy(session, f"session {session_id}")
        self._posted[session_id] = []
        self._numbered[session_id] = session.inbox_seq

    async def load(self, session_id: str) -> Session | None:
        """Return a copy of the session, with the events posted since its last absorb."""
        stored = self._sessions.get(validate_session_id(session_id))
        if stored is None:
            return None
        session = _copy(stored, f"session {session_id}")
        known = {event.id for event in session.inbox}
        session.inbox.extend(
            event.model_copy(deep=True)
            for event in self._posted.get(session_id, [])
            if event.seq is not None and event.seq > session.inbox_seq and event.id not in known
        )
        return session

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
        self._forget_posted(session_id, replacement.inbox_seq)

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
        if checkpoint.inbox_seq is not None:
            self._forget_posted(session_id, checkpoint.inbox_seq)

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox without the lease; return its number.

        Posting an ``event.id`` the inbox still holds returns its number again.

        Raises:
            SessionNotFoundError: no such session.
            SerializationError: the payload is not JSON.
        """
        if validate_session_id(session_id) not in self._sessions:
            raise SessionNotFoundError(f"session {session_id} not found")
        posted = self._posted.setdefault(session_id, [])
        for earlier in posted:
            if earlier.id == event.id and earlier.seq is not None:
                return earlier.seq
        number = self._numbered.get(session_id, 0) + 1
        what = f"event {event.name!r} of session {session_id}"
        copy = Event.model_validate_json(codec.dump_json(event, what))
        posted.append(copy.model_copy(update={"seq": number}))
        self._numbered[session_id] = number
        return number

    def _forget_posted(self, session_id: str, absorbed: int) -> None:
        """Drop the posted events numbered ``absorbed`` or less: the session holds them."""
        posted = self._posted.get(session_id, [])
        self._posted[session_id] = [e for e in posted if e.seq is not None and e.seq > absorbed]

    async def delete(self, session_id: str) -> bool:
        """Remove a session, its lease and its posted events; return whether it existed."""
        self._leases.pop(validate_session_id(session_id), None)
        self._posted.pop(session_id, None)
        self._numbered.pop(session_id, None)
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
