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
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from .. import codec
from ..errors import (
    CorruptSessionError,
    DecryptionError,
    EngineError,
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..log import get_logger
from ..models import Checkpoint, Session, SessionInfo
from .base import Durability, Lease, check_durability, validate_session_id

SNAPSHOT = "snapshot"
JOURNAL = "journal"
LOCK = "lock"
TRASH = ".trash"
COMPACT_MIN_BYTES = 1 << 20
"""A journal smaller than this is never compacted: replaying it is cheap."""

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
        self._locks: dict[str, int] = {}
        self._root_ready = False

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r}, durability={self.durability!r})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Store a new session: built in a temporary folder, then renamed into place."""
        validate_session_id(session.id)
        await self._run(self._create_sync, session)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot and journal, or None."""
        return await self._run(self._load_sync, validate_session_id(session_id))

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` if another runner holds it."""
        validate_session_id(session.id)
        await self._run(self._save_sync, session)

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Append one checkpoint to the journal and make it durable."""
        if self._locks.get(lease.session_id) is None:
            raise LeaseLostError(f"session {lease.session_id}: this store does not hold its lock")
        frame = codec.encode_frame(checkpoint.revision, checkpoint.model_dump_json().encode())
        await self._run(self._commit_sync, lease.session_id, frame, checkpoint.revision)

    async def delete(self, session_id: str) -> bool:
        """Remove a session's folder; return whether it existed."""
        return await self._run(self._delete_sync, validate_session_id(session_id))

    async def list(self) -> list[SessionInfo]:
        """Return a row per session folder, unreadable ones with ``problem`` set."""
        return await self._run(self._list_sync)

    async def acquire(self, session_id: str, owner: str) -> Lease | None:
        """Take the session's ``flock``; None when another runner holds it."""
        validate_session_id(session_id)
        locked = await self._run(self._acquire_sync, session_id)
        return Lease(session_id, owner) if locked else None

    async def release(self, lease: Lease) -> None:
        """Release the session's ``flock``."""
        self._unlock(lease.session_id)

    async def close(self) -> None:
        """Release every lock this store holds."""
        for session_id in list(self._locks):
            self._unlock(session_id)

    # -- implementation (runs in a worker thread) -----------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await asyncio.to_thread(fn, *args)
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

    def _write_snapshot(self, folder: Path, session: Session) -> int:
        """Atomically replace ``folder``'s snapshot; return its size in bytes."""
        frame = codec.encode_frame(session.revision, session.model_dump_json().encode())
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

    def _create_sync(self, session: Session) -> None:
        root = self._root()
        if self._session_dir(session.id) is not None:
            raise SessionExistsError(f"session {session.id} already exists")
        building = root / f".creating-{session.id}-{uuid.uuid4().hex}"
        building.mkdir(mode=0o700)
        try:
            self._write_snapshot(building, session)
            try:
                building.rename(root / session.id)
            except OSError as exc:  # a concurrent create of the same id won the race
                raise SessionExistsError(f"session {session.id} already exists") from exc
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        self._sync_dir(root)

    def _load_sync(self, session_id: str) -> Session | None:
        folder = self._session_dir(session_id)
        if folder is None:
            return None
        snapshot_path = folder / SNAPSHOT
        raw = _read(snapshot_path)
        if raw is None:
            raise CorruptSessionError(f"{snapshot_path}: snapshot missing")
        scan = codec.scan_frames(raw, str(snapshot_path))
        if scan.torn_tail or len(scan.frames) != 1:
            raise CorruptSessionError(f"{snapshot_path}: expected one complete record")
        frame = scan.frames[0]
        session = _decode(Session, frame, snapshot_path)
        if session.id != session_id or session.revision != frame.seq:
            raise CorruptSessionError(f"{snapshot_path}: record belongs to another session")

        journal_path = folder / JOURNAL
        scan = codec.scan_frames(_read(journal_path) or b"", str(journal_path))
        for frame in scan.frames:
            if frame.seq <= session.revision:
                continue  # already folded into the snapshot by a compaction
            if frame.seq != session.revision + 1:
                raise CorruptSessionError(
                    f"{journal_path}: record {frame.seq} at offset {frame.offset} "
                    f"does not follow revision {session.revision}"
                )
            checkpoint = _decode(Checkpoint, frame, journal_path)
            if checkpoint.revision != frame.seq:
                raise CorruptSessionError(f"{journal_path}: mislabelled record at {frame.offset}")
            session.apply(checkpoint)
        self._tails[session_id] = _Tail(scan.valid_end, session.revision, len(raw))
        return session

    def _tail(self, session_id: str) -> _Tail:
        tail = self._tails.get(session_id)
        if tail is None:
            if self._load_sync(session_id) is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            tail = self._tails[session_id]
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
            session = self._load_sync(session_id)
            if session is not None:
                self._replace_whole(self._root() / session_id, session)
        except (OSError, EngineError) as exc:
            self._tails.pop(session_id, None)
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _replace_whole(self, folder: Path, session: Session) -> None:
        size = self._write_snapshot(folder, session)
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

    def _save_sync(self, session: Session) -> None:
        folder = self._session_dir(session.id)
        if folder is None:
            raise SessionNotFoundError(f"session {session.id} not found")
        borrowed = session.id not in self._locks
        if borrowed and not self._acquire_sync(session.id):
            raise SessionBusyError(f"session {session.id} is being run by another runner")
        try:
            session.revision = max(self._tail(session.id).revision, session.revision) + 1
            self._replace_whole(folder, session)
        finally:
            if borrowed:
                self._unlock(session.id)

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
            except (CorruptSessionError, DecryptionError) as exc:
                rows.append(SessionInfo(id=name, problem=str(exc)))
                continue
            if session is not None:
                rows.append(SessionInfo.of(session))
        return rows

    def _acquire_sync(self, session_id: str) -> bool:
        folder = self._session_dir(session_id)
        if folder is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._locks:
            return False
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._locks[session_id] = fd
        self._tails.pop(session_id, None)  # another process may have written meanwhile
        return True

    def _unlock(self, session_id: str) -> None:
        fd = self._locks.pop(session_id, None)
        self._tails.pop(session_id, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock


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


_M = TypeVar("_M", Session, Checkpoint)


def _decode(model: type[_M], frame: codec.Frame, path: Path) -> _M:
    body = codec.plain_body(frame, str(path))
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise CorruptSessionError(
            f"{path}: undecodable record at offset {frame.offset}: "
            f"{exc.error_count()} validation error(s)"
        ) from None
