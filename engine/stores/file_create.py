"""How the file store creates a session: built aside, then renamed into place.

The new session's folder is built under a temporary name (``.creating-<id>-...``)
and renamed to its id once its snapshot is durable, so a crash never leaves a
session folder without a whole snapshot: the leftover temporary folder is not a
session, and listings skip it. With group commit the build and the rename run on
the event loop's thread, each made durable by one of the group's shared syncs.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .. import codec
from ..errors import SessionExistsError, StorageError
from ..models import UNFINISHED, Session
from . import file_expiry, file_index, file_records
from .base import new_session_body
from .file_records import SESSION_KIND

if TYPE_CHECKING:
    from .file import FileStore


async def create(store: FileStore, session: Session) -> None:
    """Store ``session`` as a new folder; ``SessionExistsError`` if its id is taken."""
    body = new_session_body(session, sealed=store._encryption is not None)
    finished = session.status not in UNFINISHED
    expires = session.expires_at.timestamp()
    group = store._group
    if group is None:
        await store._run(create_sync, store, session.id, session.revision, body, finished, expires)
        return
    # Group commit: one sync before the rename (no name may point at a snapshot not
    # yet on disk), one after it.
    try:
        store._root()  # the folder the group's syncs open
        group.prepare()
        building = build(store, session.id, session.revision, body, sync=False)
    except OSError as exc:
        raise StorageError(f"file store {store.path}: {exc}") from exc
    try:
        await group.wait()
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    try:
        place(store, building, session.id)
    except OSError as exc:
        raise StorageError(f"file store {store.path}: {exc}") from exc
    await group.wait()
    _settled(store, session.id, finished, expires)


def create_sync(
    store: FileStore, session_id: str, revision: int, body: bytes, finished: bool, expires: float
) -> None:
    """Create the session with syncs of its own (on a worker thread)."""
    building = build(store, session_id, revision, body, sync=store._sync)
    place(store, building, session_id)
    store._sync_dir(store._root())
    _settled(store, session_id, finished, expires)


def build(store: FileStore, session_id: str, revision: int, body: bytes, *, sync: bool) -> Path:
    """Write a new session's folder under a temporary name; return where it is."""
    root = store._root()
    if store._session_dir(session_id) is not None:
        raise SessionExistsError(f"session {session_id} already exists")
    # What a removed namesake may have left behind (a crash in its delete).
    file_index.unmark(root, session_id, sync=store._sync)
    file_expiry.remove_bound(root, session_id, sync=store._sync)
    # The data key is stored (durably) before any record: none exists without it.
    keys = store._keys(session_id, create=True)
    frame = codec.seal_frame(revision, SESSION_KIND, body, keys)
    building = root / f".creating-{session_id}-{uuid.uuid4().hex}"
    building.mkdir(mode=0o700)
    try:
        file_records.write_snapshot(building, frame, sync=sync)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return building


def place(store: FileStore, building: Path, session_id: str) -> None:
    """Rename a built session folder into place: from then on the session exists."""
    try:
        building.rename(store._root() / session_id)
    except BaseException as exc:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(exc, OSError):  # a concurrent create of the same id won the race
            raise SessionExistsError(f"session {session_id} already exists") from exc
        raise


def _settled(store: FileStore, session_id: str, finished: bool, expires: float) -> None:
    """Mark and bound a session whose creation is durable (``file_index``, ``file_expiry``)."""
    if finished:
        file_index.mark(store._root(), session_id)
    file_expiry.set_bound(store._root(), session_id, expires)
