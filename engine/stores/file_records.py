"""The file store's session records: a folder's ``snapshot`` and ``journal`` files.

``snapshot`` holds one framed record, the whole session at some revision; it is
replaced atomically (temp file + fsync + rename + folder fsync). ``journal`` holds
the checkpoints after that revision, one framed record each, numbered on from it.
This module reads the two as one view, rebuilds the session from them, and
writes them; the store decides when (``engine.stores.file``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .. import codec
from ..crypto import SessionKeys
from ..errors import CorruptSessionError
from ..models import Checkpoint, Session
from .file_listing import CheckpointHead, SessionHead
from .fsutil import O_CLOEXEC, open_to_read, read_file, replace_file, sync_file

SNAPSHOT = "snapshot"
JOURNAL = "journal"
SESSION_KIND = Session.__name__  # the record kinds, bound into each sealed record
CHECKPOINT_KIND = Checkpoint.__name__
_S = TypeVar("_S", Session, SessionHead)  # a whole session, or only what a listing shows


@dataclass(slots=True)
class Tail:
    """Where a session's journal ends and which revision it has reached."""

    end: int  # where its records end
    revision: int
    snapshot_size: int
    folder: Path
    journal: str  # the journal's path, made once: the hot path joins no paths
    size: int  # the file's length: ``end``, or beyond it when zeros are reserved after it
    marked: bool | None = None  # whether it carries the finished mark; None: not looked
    fd: int | None = None  # the journal, open while the lease is held (``FileStore._journal_fd``)
    synced: bool = False  # what was found is durable (``FileStore._tail``)
    bound: float | None = None  # the expiry bound set under this lease (``file_expiry``)
    # Held while ``fd`` is used or closed: a delete, release or close on another
    # thread must not close it under a commit, whose write could then land in
    # whatever file reused the number. Re-entrant: a commit's error path drops it.
    guard: threading.RLock = field(default_factory=threading.RLock)
    dropped: bool = False  # forgotten (``FileStore._forget_tail``): no more writes through it


def read(folder: Path) -> tuple[bytes, bytes] | None:
    """Return the snapshot's and the journal's bytes, None if the snapshot was replaced meanwhile.

    Raises:
        FileNotFoundError: the folder holds no snapshot.
    """
    snapshot_path = folder / SNAPSHOT
    fd = open_to_read(snapshot_path)
    # Keep the snapshot open until the check: its inode cannot be reused meanwhile.
    with os.fdopen(fd, "rb") as handle:
        inode = os.fstat(fd).st_ino
        snapshot = handle.read()
        journal = read_file(folder / JOURNAL) or b""
        replaced = _inode(snapshot_path) != inode
    return None if replaced else (snapshot, journal)


@codec.collector_paused
def decode(
    session_id: str,
    folder: Path,
    snapshot: bytes,
    journal: bytes,
    keys: SessionKeys | None,
    model: type[_S],
) -> tuple[_S, Tail]:
    """Rebuild the session (or only its listing head) from its snapshot and journal."""
    snapshot_path = folder / SNAPSHOT
    scan = codec.scan_frames(snapshot, str(snapshot_path))
    if scan.torn_tail or len(scan.frames) != 1:
        raise CorruptSessionError(f"{snapshot_path}: expected one complete record")
    frame = scan.frames[0]
    session = codec.decode_model(model, frame, str(snapshot_path), keys, kind=SESSION_KIND)
    if session.id != session_id or session.revision != frame.seq:
        raise CorruptSessionError(f"{snapshot_path}: record belongs to another session")

    journal_path = folder / JOURNAL
    scan = codec.scan_frames(journal, str(journal_path))
    for frame in scan.frames:
        if frame.seq <= session.revision:
            continue  # already folded into the snapshot by a compaction
        if frame.seq != session.revision + 1:
            raise CorruptSessionError(
                f"{journal_path}: record {frame.seq} at offset {frame.offset} "
                f"does not follow revision {session.revision}"
            )
        _replay(session, frame, str(journal_path), keys)
    end = scan.valid_end
    # Reserved zeros after the records are kept; anything else after them is cut by
    # the next append (``FileStore._append``), as the sizes then differ.
    size = len(journal) if codec.zeros_from(journal, end) else end
    return session, Tail(end, session.revision, len(snapshot), folder, str(journal_path), size)


def write_snapshot(folder: Path, frame: bytes, *, sync: bool) -> int:
    """Atomically replace ``folder``'s snapshot with ``frame``; return its size."""
    replace_file(folder / SNAPSHOT, frame, sync=sync)
    return len(frame)


def empty_journal(folder: Path, *, sync: bool) -> None:
    """Truncate the journal (if any) to nothing: a new snapshot holds its records."""
    try:
        fd = os.open(folder / JOURNAL, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.ftruncate(fd, 0)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def sync_journal(folder: Path) -> None:
    """Make the journal's bytes durable (fsync), if there is a journal."""
    sync_file(folder / JOURNAL)


def truncate(path: Path, size: int) -> None:
    """Cut the file at ``path`` to ``size`` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def truncate_quietly(fd: int, size: int) -> None:
    """Cut the open file to ``size`` bytes, if the disk lets us."""
    # If even this fails, the record stays unacknowledged and the next commit re-reads.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)


def _replay(
    session: Session | SessionHead, frame: codec.Frame, source: str, keys: SessionKeys | None
) -> None:
    """Apply one journal record to the session (or its head), checking its number."""
    if isinstance(session, SessionHead):
        head = codec.decode_model(CheckpointHead, frame, source, keys, kind=CHECKPOINT_KIND)
        _check_numbered(head.revision, frame, source)
        session.apply(head)
    else:
        checkpoint = codec.decode_model(Checkpoint, frame, source, keys)
        _check_numbered(checkpoint.revision, frame, source)
        session.apply(checkpoint)


def _check_numbered(revision: int, frame: codec.Frame, source: str) -> None:
    if revision != frame.seq:
        raise CorruptSessionError(f"{source}: mislabelled record at {frame.offset}")


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None
