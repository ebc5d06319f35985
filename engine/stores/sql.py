"""What the SQLite and PostgreSQL stores share: one row design, read back one way.

Both keep a session as a snapshot record (the whole session at some revision)
plus the step records committed after it, each a framed, checksummed record; and
both fence every commit by the lease's owner and epoch in the statement that
writes it. These helpers turn what such a store reads back into a session, or
into the error a refused commit deserves.

Both also take events without the lease (``engine.events.EventInbox``): an
``events`` table holds each posted event as a framed record numbered ``seq``
(unique per session, as is its ``event_id``), and an ``inboxes`` table holds, per
session, the last number handed out. Posting bumps that counter and inserts the
event in one write transaction, so numbers are never reused, not even once the
events are pruned, and a reader that sees event n also sees every event before
it: a checkpoint absorbing up to n can never drop an n - 1 committed later.

With an encryption key, every record is sealed under its session's data key
(``engine.crypto``), whose wrapped form lives in a ``session_keys`` table of the
same database, one row per session, apart from the records. The helpers below
choose the keys to open a session's records with and explain a missing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from .. import codec
from ..crypto import Encryption, SessionKeys, master_key_ids
from ..errors import (
    CorruptSessionError,
    DecryptionError,
    LeaseLostError,
    SessionNotFoundError,
    StorageError,
)
from ..models import Checkpoint, Event, Session
from .base import Lease

_T = TypeVar("_T")

COMPACT_MIN_BYTES = 1 << 20
"""Step bytes below which a session's steps are never folded into its snapshot."""


@codec.collector_paused
def rebuild_session(
    source: str,
    session_id: str,
    snapshot: bytes,
    snapshot_revision: int,
    steps: Iterable[tuple[int, bytes]],
    posted: Iterable[tuple[int, bytes]] = (),
    keys: SessionKeys | None = None,
) -> Session:
    """Decode a snapshot and apply the steps after it, in order: the stored session.

    ``posted`` are the session's posted events as ``(seq, record)`` in ``seq``
    order; those past the session's ``inbox_seq`` join its inbox. ``keys`` open
    sealed records (None: the records must be in clear).

    Raises:
        CorruptSessionError: a record fails its checksum, does not decode, or does
            not sit where it is stored (another session's, or out of sequence).
        DecryptionError: a record is sealed and ``keys`` is None.
    """
    session = codec.decode_record(Session, snapshot, f"{source} snapshot", keys)
    if session.id != session_id or session.revision != snapshot_revision:
        raise CorruptSessionError(f"{source}: the snapshot belongs to another session or revision")
    for revision, record in steps:
        checkpoint = codec.decode_record(Checkpoint, record, f"{source} step {revision}", keys)
        if checkpoint.revision != revision or revision != session.revision + 1:
            raise CorruptSessionError(
                f"{source}: step {revision} does not follow revision {session.revision}"
            )
        session.apply(checkpoint)
    known = {event.id for event in session.inbox}
    for event in decode_events(source, posted, keys):
        # An event a ``save`` wrote into the snapshot is still posted until absorbed.
        if event.seq is not None and event.seq > session.inbox_seq and event.id not in known:
            session.inbox.append(event)
    return session


def check_complete(
    source: str, snapshot_revision: int, steps: Sequence[tuple[int, Any]], revision: int
) -> None:
    """Refuse a session whose step records stop short of the revision its row records.

    Each record is sealed and numbered, so a deleted *last* step would otherwise
    go unnoticed: the session would load one checkpoint back in time (a rollback).

    Raises:
        CorruptSessionError: records are missing at the end.
    """
    last = steps[-1][0] if steps else snapshot_revision
    if last != revision:
        raise CorruptSessionError(
            f"{source}: its records end at revision {last}, but it is at revision "
            f"{revision}: step records are missing"
        )


def decode_events(
    source: str, posted: Iterable[tuple[int, bytes]], keys: SessionKeys | None = None
) -> list[Event]:
    """Decode posted events stored as ``(seq, record)``; each must carry its own number.

    Raises:
        CorruptSessionError, DecryptionError: as ``rebuild_session``.
    """
    events = []
    for seq, record in posted:
        event = codec.decode_record(Event, record, f"{source} event {seq}", keys)
        if event.seq != seq:
            raise CorruptSessionError(f"{source}: event {seq} is stored as number {event.seq}")
        events.append(event)
    return events


def encode_event(session_id: str, seq: int, event: Event, keys: SessionKeys | None = None) -> bytes:
    """Encode ``event`` as record ``seq`` of the session's inbox, numbered (and sealed) inside.

    Raises:
        SerializationError: the payload is not JSON, or the record is too large.
    """
    numbered = event.model_copy(update={"seq": seq})
    what = f"event {event.name!r} of session {session_id}"
    return codec.encode_model(seq, numbered, what, keys)


def open_records(
    encryption: Encryption | None,
    session_id: str,
    key_record: bytes | None,
    decode: Callable[[SessionKeys | None], _T],
) -> _T:
    """Run ``decode`` with the keys that open a session's records, read with them.

    ``key_record`` is the session's wrapped-key row, read in the same snapshot as
    its records (None: it has none). Cached keys are tried first; if they fail,
    the session was rekeyed (or removed and created again) elsewhere since they
    were cached, and the keys are unwrapped again from ``key_record``.

    Raises:
        DecryptionError: no key was given for an encrypted session, a master key
            is missing (named), or the session's data key is gone (shredded).
        CorruptSessionError: a record is damaged, tampered with or misplaced.
    """
    if encryption is None or key_record is None:
        if encryption is not None:
            encryption.forget(session_id)  # shredded elsewhere: never read with a cached key
        try:
            return decode(None)
        except DecryptionError as exc:
            raise missing_key(session_id, exc, key_record, encryption) from None
    keys = encryption.cached(session_id)
    if keys is not None:
        try:
            return decode(keys)
        except (CorruptSessionError, DecryptionError):
            encryption.forget(session_id)
    keys = encryption.open_session_keys(session_id, key_record)
    result = decode(keys)
    encryption.remember(keys)
    return result


def missing_key(
    session_id: str, exc: DecryptionError, key_record: bytes | None, encryption: Encryption | None
) -> DecryptionError:
    """Say why a sealed record cannot be opened: no key was given, or no data key is left."""
    if key_record is not None and encryption is None:
        masters = ", ".join(master_key_ids(session_id, key_record))
        return DecryptionError(
            f"session {session_id} is encrypted under master key {masters} and this store "
            "was opened without a key: set SESSION_ENCRYPTION_KEY or pass encryption_key"
        )
    if key_record is None and encryption is not None:
        return DecryptionError(
            f"{exc}: session {session_id} has no data key in the store "
            "(shredded, or its records were restored without their key)"
        )
    return exc


def unwrap(encryption: Encryption, session_id: str, key_record: bytes | None) -> SessionKeys | None:
    """Unwrap a session's keys from its key row just read (None: a session in clear).

    For writes that do not hold the lease (save, posting an event): another
    process may have rekeyed the session since its keys were cached.
    """
    if key_record is None:
        encryption.forget(session_id)
        return None
    keys = encryption.open_session_keys(session_id, key_record)
    encryption.remember(keys)
    return keys


def in_clear(session_id: str) -> NoReturn:
    """Refuse to shred a session stored in clear: there is no key to destroy.

    Raises:
        StorageError: always.
    """
    raise StorageError(
        f"session {session_id} is stored in clear: it can be removed, but it has no "
        "data key to shred"
    )


def check_session(
    session_id: str, load: Callable[[], tuple[Session | None, bool]]
) -> codec.SessionCheck:
    """Check a session by decoding every record ``load`` reads; change nothing.

    ``load`` returns the session (None if absent) and whether it is encrypted.

    Raises:
        SessionNotFoundError: no such session.
    """
    try:
        session, sealed = load()
    except StorageError as exc:
        return failed_check(session_id, exc)
    return passed_check(session_id, session, sealed=sealed)


def failed_check(session_id: str, exc: StorageError) -> codec.SessionCheck:
    """Return the verdict a failed read of a session deserves."""
    if isinstance(exc, DecryptionError):
        return codec.SessionCheck(session_id, "undecryptable", str(exc))
    if isinstance(exc, CorruptSessionError):
        return codec.SessionCheck(session_id, "corrupt", str(exc))
    return codec.SessionCheck(session_id, "unreadable", str(exc))


def passed_check(session_id: str, session: Session | None, *, sealed: bool) -> codec.SessionCheck:
    """Return the verdict of a session whose every record decoded.

    Raises:
        SessionNotFoundError: ``session`` is None: no such session.
    """
    if session is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    return codec.SessionCheck(session_id, "ok", "encrypted" if sealed else "in clear")


def not_corrupt(check: codec.SessionCheck) -> NoReturn:
    """Refuse to quarantine a session that is not corrupt.

    Raises:
        StorageError: always.
    """
    raise StorageError(
        f"session {check.session_id} is {check.verdict}, not corrupt: only corrupt "
        "sessions are quarantined"
    )


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """A session and its posted events sealed again under a fresh data key."""

    keys: SessionKeys
    key_record: bytes
    session: Session
    snapshot: bytes
    events: list[tuple[int, bytes]]


def rekeyed(encryption: Encryption, session: Session, events: Iterable[Event]) -> Rekeyed:
    """Seal ``session`` (as a save would: one revision up) and its posted events anew.

    A SQL store rewrites a session in one transaction, so the new data key never
    has to sit beside the old ones (as the file store's does while it rewrites):
    the record returned holds the new key alone, wrapped by the active master key.
    The revision goes up so that a copy read before the rekey cannot be saved over
    it (``check_fresh``) with the old key.
    """
    keys, key_record = encryption.begin_rekey(session.id, None, set(), clear_in_use=False)
    saved = session.model_copy(update={"revision": session.revision + 1})
    snapshot = codec.encode_model(saved.revision, saved, f"session {session.id}", keys)
    sealed = [
        (event.seq, encode_event(session.id, event.seq, event, keys))
        for event in events
        if event.seq is not None
    ]
    return Rekeyed(keys, key_record, saved, snapshot, sealed)


def sealed_record(record: bytes) -> bool:
    """Tell whether a stored record is encrypted (its header alone says so)."""
    return len(record) >= codec.HEADER_SIZE and bool(record[3] & codec.FLAG_ENCRYPTED)


def refuse_commit(
    lease: Lease, checkpoint: Checkpoint, found: tuple[str | None, int, int] | None
) -> NoReturn:
    """Raise what a fenced commit that matched no row deserves.

    Args:
        found: the session's ``(owner, epoch, revision)`` read after the refusal,
            or None if it is gone.

    Raises:
        SessionNotFoundError, LeaseLostError, or StorageError (out of order).
    """
    if found is None:
        raise SessionNotFoundError(f"session {lease.session_id} not found")
    owner, epoch, revision = found
    if owner != lease.owner or epoch != lease.token:
        raise LeaseLostError(
            f"session {lease.session_id}: lease lost to another runner "
            f"(this lease's epoch is {lease.token}, the session's is {epoch})"
        )
    raise StorageError(
        f"session {lease.session_id}: checkpoint revision {checkpoint.revision} "
        f"does not follow stored revision {revision}"
    )
