"""MemoryStore: keeps sessions in this process, for tests and examples only.

It keeps what the SQL stores keep, as the same framed records: a snapshot of each
session, the checkpoints committed after it and the events posted to it, plus a
few clear fields for listings. With an encryption key every record is sealed
under the session's data key, exactly as the other stores seal theirs, so a key
mistake shows up here the way it would in production.
"""

from __future__ import annotations

import builtins
import itertools
from dataclasses import dataclass, field

from .. import codec
from ..crypto import Encryption, KeyInput, SessionKeys
from ..errors import (
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..models import UNFINISHED, Checkpoint, Event, Session, SessionInfo
from .base import (
    DEFAULT_LEASE_TTL,
    LIST_PAGE,
    Lease,
    check_fresh,
    new_session_body,
    validate_session_id,
)
from .sql import COMPACT_MIN_BYTES, encode_event, rebuild_session

_SESSION = Session.__name__  # record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__


@dataclass(slots=True)
class _Stored:
    """One session as records, and the clear fields its listing row shows."""

    info: SessionInfo
    revision: int
    snapshot: bytes
    snapshot_revision: int
    steps: list[tuple[int, bytes]] = field(default_factory=list)
    steps_bytes: int = 0
    posted: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # event id -> record
    numbered: int = 0  # the last event number handed out


class _KeyDict(dict[str, bytes]):
    """A ``crypto.KeyVault`` in a dict: wrapped data keys, apart from the records."""

    def get_key(self, name: str) -> bytes | None:
        """Return the record stored under ``name``, or None."""
        return self.get(name)

    def add_key(self, name: str, record: bytes) -> bytes:
        """Store ``record`` unless ``name`` exists; return what is stored."""
        return self.setdefault(name, record)

    def put_key(self, name: str, record: bytes) -> None:
        """Store ``record`` under ``name``, replacing any record there."""
        self[name] = record

    def delete_key(self, name: str) -> bool:
        """Drop the record under ``name``; return whether it existed."""
        return self.pop(name, None) is not None


class MemoryStore:
    """A store that forgets everything when the process ends.

    Args:
        encryption_key: seal every record it keeps (AES-256-GCM) as the other
            stores do: 32 bytes, a base64 string of 32 bytes, a passphrase, or a
            ``crypto.KeyRing``. None keeps records in clear.

    Sessions are kept as encoded records, so callers cannot change stored data by
    mutating what they hold, and what a real store would refuse (bytes, sets, NaN
    turned into null...) is refused or changed here too.

    It takes events without the lease (``engine.events.EventInbox``): a posted
    event waits beside the session, numbered, until a checkpoint absorbs it.
    """

    def __init__(self, *, encryption_key: KeyInput | None = None) -> None:
        self._encryption = Encryption.of(encryption_key)
        self._vault = _KeyDict()
        self._sessions: dict[str, _Stored] = {}
        self._leases: dict[str, Lease] = {}
        self._tokens = itertools.count(1)

    def __repr__(self) -> str:
        encrypted = "encrypted, " if self._encryption is not None else ""
        return f"MemoryStore({encrypted}{len(self._sessions)} sessions)"

    def _keys(self, session_id: str, *, create: bool = False) -> SessionKeys | None:
        if self._encryption is None:
            return None
        return self._encryption.keys_for(self._vault, session_id, create=create)

    async def create(self, session: Session) -> None:
        """Store a new session; ``SessionExistsError`` if the id is taken."""
        session_id = validate_session_id(session.id)
        if session_id in self._sessions:
            raise SessionExistsError(f"session {session_id} already exists")
        body = new_session_body(session, sealed=self._encryption is not None)  # before any key
        self._vault.delete_key(session_id)  # never its: the id was free
        snapshot = codec.seal_frame(
            session.revision, _SESSION, body, self._keys(session_id, create=True)
        )
        self._sessions[session_id] = _Stored(
            info=SessionInfo.of(session),
            revision=session.revision,
            snapshot=snapshot,
            snapshot_revision=session.revision,
            numbered=session.inbox_seq,
        )

    async def load(self, session_id: str) -> Session | None:
        """Return the session decoded from its records, with the events posted since."""
        stored = self._sessions.get(validate_session_id(session_id))
        if stored is None:
            return None
        return self._decode(stored, session_id, posted=True)

    def _decode(self, stored: _Stored, session_id: str, *, posted: bool) -> Session:
        events = sorted(stored.posted.values()) if posted else []
        return rebuild_session(
            f"memory session {session_id}",
            session_id,
            stored.snapshot,
            stored.snapshot_revision,
            stored.steps,
            events,
            self._keys(session_id),
        )

    async def save(self, session: Session) -> None:
        """Replace a stored session whole; ``SessionBusyError`` while a lease is held."""
        session_id = validate_session_id(session.id)
        stored = self._sessions.get(session_id)
        if stored is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._leases:
            raise SessionBusyError(f"session {session_id} is being run by another runner")
        check_fresh(session_id, session.revision, stored.revision)
        saved = session.model_copy(update={"revision": stored.revision + 1})
        body = codec.dump_json(saved, f"session {session_id}")
        stored.snapshot = codec.seal_frame(saved.revision, _SESSION, body, self._keys(session_id))
        stored.revision = stored.snapshot_revision = saved.revision
        stored.steps, stored.steps_bytes = [], 0
        stored.info = SessionInfo.of(saved)
        self._forget_posted(stored, saved.inbox_seq)
        session.revision = saved.revision

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
        body = codec.dump_json(checkpoint, what)
        record = codec.seal_frame(checkpoint.revision, _CHECKPOINT, body, self._keys(session_id))
        stored.steps.append((checkpoint.revision, record))
        stored.steps_bytes += len(record)
        stored.revision = checkpoint.revision
        info = stored.info
        stored.info = info.model_copy(
            update={
                "status": checkpoint.status,
                "last_activity": checkpoint.last_activity,
                "expires_at": checkpoint.expires_at,
                "steps_done": info.steps_done + (checkpoint.step is not None),
            }
        )
        if checkpoint.inbox_seq is not None:
            self._forget_posted(stored, checkpoint.inbox_seq)
        for taken in checkpoint.events_consumed:  # a retried post of a taken event
            stored.posted.pop(taken, None)
        if stored.steps_bytes > max(COMPACT_MIN_BYTES, len(stored.snapshot)):
            self._compact(stored, session_id)

    def _compact(self, stored: _Stored, session_id: str) -> None:
        """Fold the steps into the snapshot: loading stays bounded."""
        session = self._decode(stored, session_id, posted=False)
        body = codec.dump_json(session, f"session {session_id}")
        stored.snapshot = codec.seal_frame(session.revision, _SESSION, body, self._keys(session_id))
        stored.snapshot_revision = session.revision
        stored.steps, stored.steps_bytes = [], 0

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox without the lease; return its number.

        Posting an ``event.id`` the inbox still holds returns its number again.

        Raises:
            SessionNotFoundError: no such session.
            SerializationError: the payload is not JSON.
        """
        stored = self._sessions.get(validate_session_id(session_id))
        if stored is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        earlier = stored.posted.get(event.id)
        if earlier is not None:
            return earlier[0]
        number = stored.numbered + 1
        record = encode_event(session_id, number, event, self._keys(session_id))
        stored.posted[event.id] = (number, record)
        stored.numbered = number
        return number

    @staticmethod
    def _forget_posted(stored: _Stored, absorbed: int) -> None:
        """Drop the posted events numbered ``absorbed`` or less: the session holds them."""
        stored.posted = {eid: kept for eid, kept in stored.posted.items() if kept[0] > absorbed}

    async def delete(self, session_id: str) -> bool:
        """Remove a session, its lease, its posted events and its key; whether it existed."""
        self._leases.pop(validate_session_id(session_id), None)
        self._vault.delete_key(session_id)
        if self._encryption is not None:
            self._encryption.forget(session_id)
        return self._sessions.pop(session_id, None) is not None

    async def shred(self, session_id: str) -> bool:
        """Destroy the session's data key, then the session; return whether it existed.

        Raises:
            StorageError: the store has no key: there is no data key to destroy.
        """
        validate_session_id(session_id)
        if self._encryption is None:
            raise StorageError(
                f"a MemoryStore without an encryption key cannot shred session {session_id}: "
                "it is stored in clear, with no data key to destroy"
            )
        destroyed = self._vault.delete_key(session_id)
        return await self.delete(session_id) or destroyed

    async def list(self) -> builtins.list[SessionInfo]:
        """Return a row per stored session, from its clear fields."""
        return [stored.info.model_copy() for stored in self._sessions.values()]

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after``, in id order."""
        ids = sorted(i for i in self._sessions if after is None or i > after)[:limit]
        return [self._sessions[i].info.model_copy() for i in ids]

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Like ``list_page``, for the unfinished sessions only."""
        ids = sorted(
            i
            for i, stored in self._sessions.items()
            if (after is None or i > after) and stored.info.status in UNFINISHED
        )[:limit]
        return [self._sessions[i].info.model_copy() for i in ids]

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
