"""The file store's inbox: events posted to a session without its lease.

Two files beside the session's ``snapshot`` and ``journal``::

    inbox         the posted events, one framed record each, numbered 1, 2, ...
    inbox.lock    an flock held only while ``inbox`` is appended to or rewritten

A sender takes ``inbox.lock``, never the session's ``lock``: the runner holds that
one for as long as it runs the session, in whatever process. An append is one
write and one fdatasync at the end of the last complete record, as a journal
append is; a torn tail (an append that never returned) is dropped on read and cut
off by the next append.

An event is record ``seq`` of kind ``Event`` (sealed under the session's keys when
the session is encrypted). Once a checkpoint has absorbed the events numbered n or
less, a rewrite (temp file, fsync, rename, folder fsync) may drop them; it then
starts the file with a *floor*, an empty record numbered after everything it
dropped, so numbers are never handed out twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import codec
from ..crypto import SEAL_OVERHEAD, SessionKeys
from ..errors import CorruptSessionError, SessionNotFoundError
from ..models import Event, Session
from .fsutil import O_CLOEXEC, read_file, replace_file, sync_file, sync_folder, write_all

INBOX = "inbox"
INBOX_LOCK = "inbox.lock"
EVENT = Event.__name__
FLOOR = "InboxFloor"
"""The kind bound into a floor record: an empty one cannot pass for an event."""


@dataclass(frozen=True, slots=True)
class Posted:
    """A session's inbox file as read: its events and where its records stop."""

    events: list[Event]
    """The events numbered above the ``above`` it was decoded with, in number order."""
    last: int
    """The highest number a record holds (an event or the floor); 0 for none."""
    end: int
    """Where the last complete record ends; the file may run on (a torn tail)."""
    size: int
    absorbed: int
    """How many events numbered ``above`` or less it holds: what a rewrite drops."""
    floor: int
    """The highest number among the records a rewrite would not keep (0 for none)."""


def read(folder: Path) -> bytes:
    """Return the bytes of ``folder``'s inbox file (empty when nothing was posted)."""
    return read_file(folder / INBOX) or b""


def decode(data: bytes, path: Path, keys: SessionKeys | None, *, above: int = 0) -> Posted:
    """Decode an inbox file's records; only those numbered above ``above`` are opened.

    Raises:
        CorruptSessionError: a record fails a check (not at the tail: that is torn),
            numbers go backwards, or an event is labelled with another number.
        DecryptionError: an event is sealed and ``keys`` is None.
    """
    source = str(path)
    scan = codec.scan_frames(data, source)
    events: list[Event] = []
    last = absorbed = floor = 0
    for frame in scan.frames:
        if frame.seq <= last:
            raise CorruptSessionError(
                f"{source}: record {frame.seq} at offset {frame.offset} does not follow {last}"
            )
        last = frame.seq
        is_floor = _is_floor(frame)
        if is_floor or frame.seq <= above:
            floor = frame.seq  # a rewrite keeps none of these
            if not is_floor:
                absorbed += 1  # taken into the session: not needed, so not opened
            elif frame.seq > above:
                codec.plain_body(frame, source, keys, FLOOR)  # authenticated like any record
            continue
        event = codec.decode_model(Event, frame, source, keys)
        if event.seq != frame.seq:
            raise CorruptSessionError(f"{source}: mislabelled record at offset {frame.offset}")
        events.append(event)
    return Posted(events, last, scan.valid_end, len(data), absorbed, floor)


def merge(session: Session, events: list[Event]) -> None:
    """Append to ``session.inbox`` the posted events it does not hold yet, in order."""
    known = {event.id for event in session.inbox}
    session.inbox.extend(
        event
        for event in events
        if event.seq is not None and event.seq > session.inbox_seq and event.id not in known
    )


def number_for(event: Event, session: Session, posted: Posted) -> tuple[int, bool]:
    """Return the number ``event`` gets and whether it is new (else it is stored already).

    An id the session holds in its inbox, or that the file holds past the session's
    ``inbox_seq``, keeps its number; anything else is numbered after every number
    handed out, the session's ``inbox_seq`` included.
    """
    for held in session.inbox:
        if held.id == event.id and held.seq is not None:
            return held.seq, False
    for earlier in reversed(posted.events):
        if earlier.id == event.id and earlier.seq is not None and earlier.seq > session.inbox_seq:
            return earlier.seq, False
    return max(posted.last, session.inbox_seq) + 1, True


def event_record(event: Event, number: int, what: str, keys: SessionKeys | None) -> bytes:
    """Encode ``event`` as inbox record ``number`` (numbered inside too, as loads return it).

    Raises:
        SerializationError: the payload is not JSON, or the record is too large.
    """
    numbered = event.model_copy(update={"seq": number})
    return codec.seal_frame(number, EVENT, codec.dump_json(numbered, what), keys)


def rewritten(posted: Posted, keys: SessionKeys | None, session_id: str) -> bytes:
    """Return the inbox file holding only ``posted.events``, each sealed again under ``keys``.

    Numbers are kept; a floor record first keeps the highest number dropped, so the
    next event is numbered after it even once every event is gone.
    """
    records = [] if posted.floor == 0 else [codec.seal_frame(posted.floor, FLOOR, b"", keys)]
    what = f"a posted event of session {session_id}"
    for event in posted.events:
        assert event.seq is not None  # ``decode`` returns numbered events only
        records.append(event_record(event, event.seq, what, keys))
    return b"".join(records)


@contextlib.contextmanager
def locked(folder: Path, session_id: str) -> Iterator[None]:
    """Hold the session's ``inbox.lock`` (blocking: holders write a record or two).

    Raises:
        SessionNotFoundError: the session's folder is gone, or was removed meanwhile.
    """
    path = folder / INBOX_LOCK
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise SessionNotFoundError(f"session {session_id} not found") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = path.lstat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the folder was removed (and maybe created again) while we waited
            raise SessionNotFoundError(f"session {session_id} was removed")
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def append(folder: Path, record: bytes, end: int, *, sync: bool) -> None:
    """Write ``record`` at ``end`` (cutting off a torn tail), durably if ``sync``.

    The folder is synced too: the file may be new, or renamed into place by a
    rewrite that died before syncing it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC
    fd = os.open(folder / INBOX, flags, 0o600)
    try:
        if os.fstat(fd).st_size != end:
            os.ftruncate(fd, end)  # a torn tail: an append that never returned
        try:
            write_all(fd, record, end)
            if sync:
                os.fdatasync(fd)
        except OSError:
            # Never acknowledged, so never to be found later either.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)
    if sync:
        sync_folder(folder)


def make_durable(folder: Path) -> None:
    """Sync the inbox file and its name: a sender retrying finds its event already there.

    Its first try may have died before its fdatasync: readable, but not on disk.
    """
    sync_file(folder / INBOX)
    sync_folder(folder)


def size(folder: Path) -> int:
    """Return the inbox file's size in bytes (0 when absent)."""
    try:
        return (folder / INBOX).lstat().st_size
    except FileNotFoundError:
        return 0


def replace(folder: Path, data: bytes, *, sync: bool) -> None:
    """Make ``data`` the inbox file atomically (``fsutil.replace_file``)."""
    replace_file(folder / INBOX, data, sync=sync)


def key_ids(folder: Path) -> set[str | None]:
    """Return the data key ids the inbox's records name (None for a record in clear)."""
    path = folder / INBOX
    scan = codec.scan_frames(read(folder), str(path))
    return {codec.frame_key_id(frame) for frame in scan.frames}


def _is_floor(frame: codec.Frame) -> bool:
    """Tell a floor record by its empty body (sealed: nothing but the seal's overhead)."""
    sealed = bool(frame.flags & codec.FLAG_ENCRYPTED)
    return len(frame.body) == (SEAL_OVERHEAD if sealed else 0)
