"""What the SQLite and PostgreSQL stores share: one row design, read back one way.

Both keep a session as a snapshot record (the whole session at some revision)
plus the step records committed after it, each a framed, checksummed record; and
both fence every commit by the lease's owner and epoch in the statement that
writes it. These helpers turn what such a store reads back into a session, or
into the error a refused commit deserves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from .. import codec
from ..errors import CorruptSessionError, LeaseLostError, SessionNotFoundError, StorageError
from ..models import Checkpoint, Session
from .base import Lease

COMPACT_MIN_BYTES = 1 << 20
"""Step bytes below which a session's steps are never folded into its snapshot."""


def rebuild_session(
    source: str,
    session_id: str,
    snapshot: bytes,
    snapshot_revision: int,
    steps: Iterable[tuple[int, bytes]],
) -> Session:
    """Decode a snapshot and apply the steps after it, in order: the stored session.

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
    return session


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
