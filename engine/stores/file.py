"""FileStore: the embedded default, one folder per session on the local disk.

Each session folder holds ``snapshot`` (one framed record: the whole session at
some revision, replaced atomically by temp file + fsync + rename + directory
fsync), ``journal`` (framed checkpoints appended after that revision, each made
durable with fdatasync before ``commit`` returns) and ``lock`` (an ``flock`` held
by the runner that owns the session, released by the kernel if it dies).

A checkpoint costs one append and one fdatasync, whatever the session's history.
The journal is folded into a new snapshot once it outgrows the snapshot, which
keeps loading bounded while the copying stays amortised constant per byte.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import itertools
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from .. import codec
from ..errors import (
    CorruptSessionError,
    EngineError,
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..log import get_logger
from ..models import Checkpoint, Session, SessionInfo
from .base import (
    DEFAULT_LEASE_TTL,
    Durability,
    Lease,
    check_durability,
    check_fresh,
    validate_session_id,
)

SNAPSHOT = "snapshot"
JOURNAL = "journal"
LOCK = "lock"
TRASH = ".trash"
COMPACT_MIN_BYTES = 1 << 20
"""A journal smaller than this is never compacted: replaying it is cheap."""
READ_ATTEMPTS = 10
"""Reads of a session that another process is rewriting, before giving up."""

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_T = TypeVar("_T")
_log = get_logger()


@dataclass(slots=True)
class _Tail:
    """Where a session's journal ends and which revision it has reached."""

    end: int
    revision: int
    snapshot_size: int


class FileStore:
    """Store sessions as files under ``path``: embedded, nothing to install.

    Args:
        path: the folder holding the sessions (created 0700 on first use).
        encryption_key: reserved for encryption at rest; not available yet.
        durability: ``"fsync"`` (default) makes every commit durable before it
            returns; ``"none"`` skips syncing and is for tests only.
        compact_bytes: journal size below which no compaction happens.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_key: str | bytes | None = None,
        durability: Durability = "fsync",
        compact_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        if encryption_key is not None:
            raise EngineError("encryption at rest is not available in this version of stepvault")
        self.path = Path(path)
        self.durability = check_durability(durability)
        self.compact_bytes = compact_bytes
        self._tails: dict[str, _Tail] = {}
        self._locks: dict[str, tuple[int, Lease]] = {}
        self._tokens = itertools.count(1)
        self._root_ready = False

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r}, durability={self.durability!r})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Store a new session: built in a temporary folder, then renamed into place."""
        validate_session_id(session.id)
        frame = _snapshot_frame(session)  # before touching disk: bad data creates nothing
        await self._run(self._create_sync, session.id, frame)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot and journal, or None."""
        return await self._run(self._load_sync, validate_session_id(session_id))

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` if a runner holds it."""
        validate_session_id(session.id)
        saved = session.model_copy(update={"revision": session.revision + 1})
        await self._run(self._save_sync, saved, _snapshot_frame(saved))
        session.revision = saved.revision  # only once the new revision is on disk

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Append one checkpoint to the journal and make it durable."""
        session_id = validate_session_id(lease.session_id)
        held = self._locks.get(session_id)
        if held is None or held[1] != lease:
            raise LeaseLostError(f"session {session_id}: this lease is not the one held here")
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        frame = codec.encode_frame(checkpoint.revision, codec.dump_json(checkpoint, what))
        await self._run(self._commit_sync, session_id, frame, checkpoint.revision)

    async def delete(self, session_id: str) -> bool:
        """Remove a session's folder; return whether it existed."""
        return await self._run(self._delete_sync, validate_session_id(session_id))

    async def list(self) -> list[SessionInfo]:
        """Return a row per session folder, unreadable ones with ``problem`` set."""
        return await self._run(self._list_sync)

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Take the session's ``flock``; None when another runner holds it.

        ``ttl`` is not needed here: the kernel drops the lock of a process that
        dies, so a crashed holder is taken over at once.
        """
        validate_session_id(session_id)
        return await self._run(self._acquire_sync, Lease(session_id, owner, next(self._tokens)))

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Confirm the lock is still held here (it cannot expire while we live)."""
        held = self._locks.get(validate_session_id(lease.session_id))
        if held is None or held[1].token != lease.token:
            raise LeaseLostError(f"session {lease.session_id}: this lease is not the one held")

    async def release(self, lease: Lease) -> None:
        """Release the session's ``flock``; a lease already given back is ignored."""
        held = self._locks.get(validate_session_id(lease.session_id))
        if held is not None and held[1] == lease:
            self._unlock(lease.session_id)

    async def close(self) -> None:
        """Release every lock this store holds."""
        for session_id in list(self._locks):
            self._unlock(session_id)

    # -- implementation (runs in a worker thread) -----------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped: let its I/O finish before the caller goes on
            # to release the lock, or a late write could land after another runner's.
            await asyncio.wait([work])
            raise
        except OSError as exc:
            raise StorageError(f"file store {self.path}: {exc}") from exc

    def _root(self) -> Path:
        if not self._root_ready:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._root_ready = True
        return self.path

    def _session_dir(self, session_id: str) -> Path | None:
        """Return the session's folder, None if absent; refuse a symlink in its place."""
        folder = self._root() / session_id
        try:
            mode = folder.lstat().st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            raise StorageError(f"{folder}: not a session folder (a symlink or a file)")
        return folder

    def _sync_dir(self, folder: Path) -> None:
        if self.durability == "fsync":
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_snapshot(self, folder: Path, frame: bytes) -> int:
        """Atomically replace ``folder``'s snapshot with ``frame``; return its size."""
        temp = folder / f"{SNAPSHOT}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(temp, flags, 0o600)
        try:
            _write_all(fd, frame, 0)
            if self.durability == "fsync":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, folder / SNAPSHOT)
        self._sync_dir(folder)
        return len(frame)

    def _create_sync(self, session_id: str, frame: bytes) -> None:
        root = self._root()
        if self._session_dir(session_id) is not None:
            raise SessionExistsError(f"session {session_id} already exists")
        building = root / f".creating-{session_id}-{uuid.uuid4().hex}"
        building.mkdir(mode=0o700)
        try:
            self._write_snapshot(building, frame)
            try:
                building.rename(root / session_id)
            except OSError as exc:  # a concurrent create of the same id won the race
                raise SessionExistsError(f"session {session_id} already exists") from exc
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        self._sync_dir(root)

    def _load_sync(self, session_id: str) -> Session | None:
        found = self._read_session(session_id)
        return None if found is None else found[0]

    def _read_session(self, session_id: str) -> tuple[Session, _Tail] | None:
        """Read a consistent view of a session, even while another process writes it.

        A reader holds no lock, so a compaction elsewhere (snapshot rename, then
        journal truncation and new appends) may run between reading the two files:
        a snapshot replaced meanwhile means read again, and so does a failed check
        on bytes that changed under us. Corruption that reads the same twice is real.
        """
        previous: tuple[bytes, bytes] | None = None
        for _ in range(READ_ATTEMPTS):
            folder = self._session_dir(session_id)
            if folder is None:
                return None
            snapshot_path = folder / SNAPSHOT
            try:
                fd = os.open(snapshot_path, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
            except FileNotFoundError:
                if self._session_dir(session_id) is None:
                    return None  # deleted while we looked
                raise CorruptSessionError(f"{snapshot_path}: snapshot missing") from None
            # Keep the snapshot open until the check: its inode cannot be reused meanwhile.
            with os.fdopen(fd, "rb") as handle:
                inode = os.fstat(fd).st_ino
                snapshot = handle.read()
                journal = _read(folder / JOURNAL) or b""
                replaced = _inode(snapshot_path) != inode
            if replaced:
                continue
            try:
                return self._decode_session(session_id, folder, snapshot, journal)
            except CorruptSessionError:
                if previous == (snapshot, journal):
                    raise
                previous = (snapshot, journal)
        raise StorageError(f"session {session_id}: changed on every one of {READ_ATTEMPTS} reads")

    def _decode_session(
        self, session_id: str, folder: Path, snapshot: bytes, journal: bytes
    ) -> tuple[Session, _Tail]:
        snapshot_path = folder / SNAPSHOT
        scan = codec.scan_frames(snapshot, str(snapshot_path))
        if scan.torn_tail or len(scan.frames) != 1:
            raise CorruptSessionError(f"{snapshot_path}: expected one complete record")
        frame = scan.frames[0]
        session = codec.decode_model(Session, frame, str(snapshot_path))
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
            checkpoint = codec.decode_model(Checkpoint, frame, str(journal_path))
            if checkpoint.revision != frame.seq:
                raise CorruptSessionError(f"{journal_path}: mislabelled record at {frame.offset}")
            session.apply(checkpoint)
        return session, _Tail(scan.valid_end, session.revision, len(snapshot))

    def _tail(self, session_id: str) -> _Tail:
        """Return where the journal ends; only the lock holder caches it."""
        tail = self._tails.get(session_id)
        if tail is None:
            found = self._read_session(session_id)
            if found is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            tail = self._tails[session_id] = found[1]
        return tail

    def _commit_sync(self, session_id: str, frame: bytes, revision: int) -> None:
        tail = self._tail(session_id)
        folder = self._root() / session_id
        journal = folder / JOURNAL
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC
        try:
            fd = os.open(journal, flags, 0o600)
        except FileNotFoundError:
            raise SessionNotFoundError(f"session {session_id} was removed") from None
        try:
            if os.fstat(fd).st_size != tail.end:
                # Someone else wrote since we looked, or a torn tail follows the last
                # good record: re-read, then cut whatever is not a complete record.
                self._tails.pop(session_id, None)
                tail = self._tail(session_id)
                os.ftruncate(fd, tail.end)
            if revision != tail.revision + 1:
                raise StorageError(
                    f"session {session_id}: checkpoint revision {revision} does not "
                    f"follow stored revision {tail.revision}"
                )
            try:
                _write_all(fd, frame, tail.end)
                if self.durability == "fsync":
                    os.fdatasync(fd)
            except OSError:
                # Never report this record as committed, and never leave it to be
                # found later: a failed fsync may have dropped it from the cache.
                self._tails.pop(session_id, None)
                _truncate_quietly(fd, tail.end)
                raise
            if tail.end == 0:
                self._sync_dir(folder)  # the journal's directory entry must be durable too
        finally:
            os.close(fd)
        tail.end += len(frame)
        tail.revision = revision
        if tail.end > max(self.compact_bytes, tail.snapshot_size):
            self._compact_quietly(session_id)

    def _compact_quietly(self, session_id: str) -> None:
        """Fold the journal into the snapshot; a failure here loses nothing committed."""
        try:
            found = self._read_session(session_id)
            if found is not None:
                session = found[0]
                folder = self._root() / session_id
                self._replace_whole(folder, _snapshot_frame(session), session)
        except (OSError, EngineError) as exc:
            self._tails.pop(session_id, None)
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _replace_whole(self, folder: Path, frame: bytes, session: Session) -> None:
        """Make ``frame`` (``session`` encoded) the snapshot and empty the journal."""
        size = self._write_snapshot(folder, frame)
        journal = folder / JOURNAL
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                os.ftruncate(fd, 0)
                if self.durability == "fsync":
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        self._tails[session.id] = _Tail(0, session.revision, size)

    def _save_sync(self, saved: Session, frame: bytes) -> None:
        folder = self._session_dir(saved.id)
        if folder is None:
            raise SessionNotFoundError(f"session {saved.id} not found")
        # Held here or elsewhere, a lease means a runner is committing: never overwrite.
        if not self._acquire_sync(Lease(saved.id, "save", next(self._tokens))):
            raise SessionBusyError(f"session {saved.id} is being run by another runner")
        try:
            check_fresh(saved.id, saved.revision - 1, self._tail(saved.id).revision)
            self._replace_whole(folder, frame, saved)
        finally:
            self._unlock(saved.id)

    def _delete_sync(self, session_id: str) -> bool:
        folder = self._session_dir(session_id)
        if folder is None:
            return False
        trash = self._root() / TRASH
        trash.mkdir(mode=0o700, exist_ok=True)
        doomed = trash / f"{session_id}.{uuid.uuid4().hex}"
        folder.rename(doomed)
        self._sync_dir(self._root())
        self._tails.pop(session_id, None)
        self._unlock(session_id)
        shutil.rmtree(doomed)
        return True

    def _list_sync(self) -> builtins.list[SessionInfo]:
        rows = []
        for name in sorted(os.listdir(self._root())):
            try:
                validate_session_id(name)
            except EngineError:
                continue  # not a session folder: .trash, an interrupted create, ...
            try:
                session = self._load_sync(name)
            except (StorageError, OSError) as exc:
                # Unreadable (corrupt, undecryptable, a symlink, unreadable bytes):
                # report it rather than hide it or fail the whole listing.
                rows.append(SessionInfo(id=name, problem=str(exc)))
                continue
            if session is not None:
                rows.append(SessionInfo.of(session))
        return rows

    def _acquire_sync(self, lease: Lease) -> Lease | None:
        session_id = lease.session_id
        folder = self._session_dir(session_id)
        if folder is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._locks:
            return None
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            lease = replace(lease, takeovers=_record_holder(fd, lease.owner))
        except BaseException:
            os.close(fd)
            raise
        self._locks[session_id] = (fd, lease)
        self._tails.pop(session_id, None)  # another process may have written meanwhile
        return lease

    def _unlock(self, session_id: str) -> None:
        held = self._locks.pop(session_id, None)
        self._tails.pop(session_id, None)
        if held is not None:
            # An empty lock file says "released on purpose"; a holder that crashes
            # leaves its name in it, which the next holder counts as a takeover.
            with contextlib.suppress(OSError):
                os.ftruncate(held[0], 0)
            os.close(held[0])  # closing the only descriptor releases the flock


def _record_holder(fd: int, owner: str) -> int:
    """Write our name into the lock file; return the takeovers it now records."""
    previous = os.pread(fd, 256, 0).split()
    takeovers = 0
    if previous:  # the last holder never released: it died holding the lock
        takeovers = 1 + (int(previous[1]) if len(previous) > 1 and previous[1].isdigit() else 0)
    record = f"{owner} {takeovers}\n".encode()
    os.ftruncate(fd, 0)
    _write_all(fd, record, 0)
    return takeovers


def _snapshot_frame(session: Session) -> bytes:
    body = codec.dump_json(session, f"session {session.id}")
    return codec.encode_frame(session.revision, body)


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


def _read(path: Path) -> bytes | None:
    """Read a whole file without following a symlink; None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``, continuing after short writes."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _truncate_quietly(fd: int, size: int) -> None:
    # If even this fails, the record stays unacknowledged and the next commit re-reads.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
