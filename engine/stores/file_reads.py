"""The file store's reads: sessions read whole and listed, without any lock.

A reader holds no lock, so another process may compact, append to or rekey the
session while it reads; each read here retries until it sees one consistent view,
and reports damage only once the same bytes fail twice. Each function takes the
store: it reads through the store's folders and cached keys, and drops a cached
key that a rekey elsewhere may have replaced.
"""

from __future__ import annotations

import bisect
import itertools
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import codec
from ..crypto import master_key_ids
from ..errors import CorruptSessionError, DecryptionError, StorageError
from ..models import Session, SessionInfo
from . import file_expiry, file_inbox, file_index, file_records
from .base import is_session_id
from .file_inbox import INBOX
from .file_listing import SessionHead
from .file_records import SNAPSHOT, Tail

if TYPE_CHECKING:
    from .file import FileStore

WALK_REUSE = 60.0
"""Seconds a walk's listing serves its next page; a page asked for later lists again."""

READ_ATTEMPTS = 10
"""Reads of a session that another process is rewriting, before giving up."""

_S = TypeVar("_S", Session, SessionHead)  # a whole session, or only what a listing shows


def load(store: FileStore, session_id: str) -> Session | None:
    """Read the session, then add the events posted past its ``inbox_seq``."""
    previous: bytes | None = None
    held = store._locks.get(session_id)  # its tail is worth keeping if still held after
    for _ in range(READ_ATTEMPTS):
        folder = store._session_dir(session_id)
        if folder is None:
            return None
        # The inbox is read first: an event dropped from it after this read was
        # absorbed by a checkpoint that the session read next already holds.
        posted = file_inbox.read(folder)
        found = read_session(store, session_id)
        if found is None:
            return None
        session = found[0]
        try:
            events = file_inbox.decode(
                posted, folder / INBOX, store._keys(session_id), above=session.inbox_seq
            ).events
        except (CorruptSessionError, DecryptionError):
            if previous == posted:  # the same bytes twice: real damage, not a rewrite
                raise
            previous = posted
            store._forget_keys(session_id)  # rekeyed since its keys were cached?
            continue
        file_inbox.merge(session, events)
        store._keep_tail(session_id, found[1], held)
        return session
    raise StorageError(f"session {session_id}: changed on every one of {READ_ATTEMPTS} reads")


def read_session(
    store: FileStore,
    session_id: str,
    model: type[_S] = Session,  # type: ignore[assignment]
) -> tuple[_S, Tail] | None:
    """Read a consistent view of a session, even while another process writes it.

    A reader holds no lock, so a compaction elsewhere (snapshot rename, then
    journal truncation and new appends) may run between reading the two files:
    a snapshot replaced meanwhile means read again, and so does a failed check
    on bytes that changed under us. Corruption that reads the same twice is real.
    """
    previous: tuple[bytes, bytes] | None = None
    for _ in range(READ_ATTEMPTS):
        folder = store._session_dir(session_id)
        if folder is None:
            return None
        try:
            records = file_records.read(folder)
        except FileNotFoundError:
            if store._session_dir(session_id) is None:
                return None  # deleted while we looked
            raise CorruptSessionError(f"{folder / SNAPSHOT}: snapshot missing") from None
        if records is None:
            continue  # the snapshot was replaced while we read
        snapshot, journal = records
        try:
            return _decode(store, session_id, folder, snapshot, journal, model)
        except (CorruptSessionError, DecryptionError):
            if previous == (snapshot, journal):
                raise
            previous = (snapshot, journal)
            # The session may have been rekeyed since its keys were cached.
            store._forget_keys(session_id)
    raise StorageError(f"session {session_id}: changed on every one of {READ_ATTEMPTS} reads")


def rows(
    store: FileStore,
    after: str | None,
    limit: int | None,
    *,
    unfinished: bool = False,
    expired_by: float | None = None,
) -> list[SessionInfo]:
    """Return the listing rows of the sessions whose ids sort after ``after``, in id order.

    With ``unfinished``, the sessions marked finished (``file_index``) are skipped
    unread: what is left may still hold finished sessions, never misses an
    unfinished one. With ``expired_by`` (POSIX seconds), so are the sessions whose
    expiry bound (``file_expiry``) is later: what is left never misses a session
    expired by then.
    """
    walking = unfinished or expired_by is not None
    names: Iterable[str]
    if walking:
        every = _walked(store, after, unfinished, expired_by)
        start = 0 if after is None else bisect.bisect_right(every, after)
        names = itertools.islice(every, start, None)
    else:
        names = _listed(store, after, unfinished, expired_by)
    listed: list[SessionInfo] = []
    for name in names:
        if limit is not None and len(listed) >= limit:
            break  # full; a session deleted while read is skipped, not counted
        row = _row(store, name)
        if row is not None:
            listed.append(row)
    if walking:  # the next page of this walk continues after the last row
        if listed:
            store._walk = ((unfinished, expired_by), every, listed[-1].id, time.monotonic())
        else:
            store._walk = None
    return listed


def count_unexpired(store: FileStore, now: float) -> int:
    """Count the sessions not expired at ``now`` (POSIX seconds), reading only those
    whose expiry bound (``file_expiry``) has passed, or that have none."""
    root = store._root()
    bounds = file_expiry.bounds(root)
    live = 0
    for name in os.listdir(root):
        if not is_session_id(name):
            continue  # .trash, an interrupted create, ...
        if bounds.get(name, now) > now:
            live += 1
            continue
        row = _row(store, name)  # unreadable: a row without an expiry, counted live
        live += row is not None and (row.expires_at is None or row.expires_at.timestamp() > now)
    return live


def _row(store: FileStore, session_id: str) -> SessionInfo | None:
    """Return the session's listing row, None if it is gone.

    An unreadable session (corrupt, undecryptable, a symlink, unreadable bytes, a
    damaged inbox) gets a row with ``problem`` set: listings report it rather than
    hide it or fail whole.
    """
    try:
        found = read_session(store, session_id, SessionHead)
        if found is not None:
            codec.scan_frames(file_inbox.read(found[1].folder), str(found[1].folder / INBOX))
    except (StorageError, OSError) as exc:
        return SessionInfo(id=session_id, problem=str(exc))
    return None if found is None else found[0].info()


def _listed(
    store: FileStore, after: str | None, unfinished: bool, expired_by: float | None
) -> list[str]:
    """Return the sorted ids of the session folders after ``after``, less the skipped ones."""
    root = store._root()
    skipped = file_index.finished(root) if unfinished else set()
    bounds = file_expiry.bounds(root) if expired_by is not None else {}
    return sorted(
        name
        for name in os.listdir(root)
        # Skips what is no session folder: .trash, an interrupted create, ...
        if is_session_id(name)
        and (after is None or name > after)
        and name not in skipped
        and not (expired_by is not None and bounds.get(name, expired_by) > expired_by)
    )


def _walked(
    store: FileStore, after: str | None, unfinished: bool, expired_by: float | None
) -> list[str]:
    """Return every id a skipping walk visits, listed once per walk.

    A walk of 100,000 sessions in pages of 1,000 would list the root folder (and
    the marks or bounds) again for every page: a hundred lists of 100,000 names,
    churned through the interpreter's memory. The first page lists them; a page
    that continues where the last one ended reuses that list, as a view of the
    store when the walk began (a session created since is run by its creator, or
    swept by the next sweep).
    """
    walk = store._walk
    if (
        after is not None
        and walk is not None
        and walk[0] == (unfinished, expired_by)
        and walk[2] == after
        and time.monotonic() - walk[3] < WALK_REUSE
    ):
        return walk[1]
    return _listed(store, None, unfinished, expired_by)


def _decode(
    store: FileStore,
    session_id: str,
    folder: Path,
    snapshot: bytes,
    journal: bytes,
    model: type[_S],
) -> tuple[_S, Tail]:
    if store._encryption is not None and not store._vault.has_key(session_id):
        store._forget_keys(session_id)  # shredded elsewhere: never read with a cached key
    keys = store._keys(session_id)
    try:
        return file_records.decode(session_id, folder, snapshot, journal, keys, model)
    except DecryptionError as exc:
        if keys is None:
            raise _explain_missing_key(store, session_id, exc) from None
        raise


def _explain_missing_key(
    store: FileStore, session_id: str, exc: DecryptionError
) -> DecryptionError:
    """Say why a sealed record cannot be opened: no key given, or no data key left."""
    record = store._vault.get_key(session_id)
    if record is None and store._encryption is not None:
        return DecryptionError(
            f"{exc}: session {session_id} has no data key in {store.keys_path} "
            "(shredded, or its key was not copied with its records)"
        )
    if record is not None and store._encryption is None:
        masters = ", ".join(master_key_ids(session_id, record))
        return DecryptionError(
            f"session {session_id} is encrypted under master key {masters} and this "
            "store was opened without a key: set SESSION_ENCRYPTION_KEY or pass "
            "encryption_key"
        )
    return exc
