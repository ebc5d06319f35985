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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from .. import codec
from ..errors import CorruptSessionError, LeaseLostError, SessionNotFoundError, StorageError
from ..models import Checkpoint, Event, Session
from .base import Lease

COMPACT_MIN_BYTES = 1 << 20
"""Step bytes below which a session's steps are never folded into its snapshot."""


def rebuild_session(
    source: str,
    session_id: str,
    snapshot: bytes,
    snapshot_revision: int,
    steps: Iterable[tuple[int, bytes]],
    posted: Iterable[tuple[int, bytes]] = (),
) -> Session:
    """Decode a snapshot and apply the steps after it, in order: the stored session.

    ``posted`` are the session's posted events as ``(seq, record)`` in ``seq``
    order; those past the session's ``inbox_seq`` join its inbox.

    Raises:
        CorruptSessionError: a record fails its checksum, does not decode, or does
            not sit where it is stored (another session's, or out of sequence).
    """
    session = codec.decode_record(Session, snapshot, f"{source} snapshot")
    if session.id != session_id or session.revision != snapshot_revision:
        raise CorruptSessionError(f"{source}: the snapshot belongs to another session or revision")
    for revision, record in steps:
        checkpoint = codec.decode_record(Checkpoint, record, f"{source} step {revision}")
        if checkpoint.revision != revision or revision != session.revision + 1:
            raise CorruptSessionError(
                f"{source}: step {revision} does not follow revision {session.revision}"
            )
        session.apply(checkpoint)
    known = {event.id for event in session.inbox}
    for seq, record in posted:
        event = codec.decode_record(Event, record, f"{source} event {seq}")
        if event.seq != seq:
            raise CorruptSessionError(f"{source}: event {seq} is stored as number {event.seq}")
        # An event a ``save`` wrote into the snapshot is still posted until absorbed.
        if seq > session.inbox_seq and event.id not in known:
            session.inbox.append(event)
    return session


def encode_event(session_id: str, seq: int, event: Event) -> bytes:
    """Encode ``event`` as record ``seq`` of the session's inbox, numbered inside.

    Raises:
        SerializationError: the payload is not JSON, or the record is too large.
    """
    numbered = event.model_copy(update={"seq": seq})
    return codec.encode_model(seq, numbered, f"event {event.name!r} of session {session_id}")


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
