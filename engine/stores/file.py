"""FileStore: the embedded default, one folder per session on the local disk.

Each session folder holds ``snapshot`` (one framed record: the whole session at
some revision, replaced atomically by temp file + fsync + rename + directory
fsync), ``journal`` (framed checkpoints appended after that revision, each made
durable with fdatasync before ``commit`` returns) and ``lock`` (an ``flock`` held
by the runner that owns the session, released by the kernel if it dies).

Events posted without the lease (``engine.events.EventInbox``) go to the
folder's ``inbox`` file under an ``inbox.lock`` of their own (``file_inbox``), so a
runner holding ``lock`` in another process does not keep them out.

A checkpoint costs one append and one fdatasync, whatever the session's history.
The journal is folded into a new snapshot once it outgrows the snapshot, which
keeps loading bounded while the copying stays amortised constant per byte.

With an encryption key every record is sealed under the session's data key, whose
wrapped form lives in ``<root>/.keys/<id>.key`` (``file_keys``), apart from the
session's folder: see docs/security.md.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from .. import codec
from ..crypto import SEAL_OVERHEAD, Encryption, KeyInput, RekeyOutcome, SessionKeys, master_key_ids
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
from ..models import Checkpoint, Event, Session, SessionInfo
from . import file_inbox
from .base import (
    DEFAULT_LEASE_TTL,
    LIST_PAGE,
    Durability,
    Lease,
    check_durability,
    check_fresh,
    is_session_id,
    validate_session_id,
)
from .file_inbox import INBOX
from .file_keys import KeyFiles
from .file_listing import CheckpointHead, SessionHead
from .fsutil import O_CLOEXEC, private_folder, read_file, sync_folder, write_all
from .group_sync import GroupSync

SNAPSHOT = "snapshot"
JOURNAL = "journal"
LOCK = "lock"
LOCK_RECORD = 64
"""Bytes of a lock file: the holder's name and takeover count, padded with blanks."""
TRASH = ".trash"
QUARANTINE = ".quarantine"
KEYS = ".keys"
COMPACT_MIN_BYTES = 1 << 20
"""A journal smaller than this is never compacted: replaying it is cheap."""
READ_ATTEMPTS = 10
"""Reads of a session that another process is rewriting, before giving up."""

_SESSION = Session.__name__  # the record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__
_T = TypeVar("_T")
_S = TypeVar("_S", Session, SessionHead)  # a whole session, or only what a listing shows
_log = get_logger()


@dataclass(slots=True)
class _Tail:
    """Where a session's journal ends and which revision it has reached."""

    end: int
    revision: int
    snapshot_size: int
    folder: Path
    journal: str  # the journal's path, made once: the hot path joins no paths


class FileStore:
    """Store sessions as files under ``path``: embedded, nothing to install.

    Args:
        path: the folder holding the sessions (created 0700 on first use).
        encryption_key: encrypt every record (AES-256-GCM): 32 bytes, a base64
            string of 32 bytes, a passphrase, or a ``crypto.KeyRing`` holding
            old keys too. None stores records in clear.
        durability: ``"fsync"`` (default) makes every commit durable before it
            returns, with its own fdatasync; ``"batch"`` makes the same promise, but
            concurrent commits share one ``syncfs`` of the filesystem (group commit,
            Linux only: ``engine.stores.group_sync``); ``"none"`` skips syncing and
            is for tests only.
        compact_bytes: journal size below which no compaction happens.
        keys_path: the folder of the sessions' data keys (default ``path/.keys``);
            on other storage, backups of ``path`` hold no keys.
        inline_commits: while this store runs a single session, write and sync its
            checkpoints on the event loop's thread: one fdatasync there costs less
            than a hop to a worker thread and back (see docs/benchmarks.md). With
            several sessions at once, commits go to worker threads so their syncs
            overlap. False always uses a worker thread (the loop never waits on
            the disk).

    It takes events without the lease (``engine.events.EventInbox``): ``post_event``
    appends to the session's ``inbox`` file, whoever runs the session.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_key: KeyInput | None = None,
        durability: Durability = "fsync",
        compact_bytes: int = COMPACT_MIN_BYTES,
        keys_path: str | os.PathLike[str] | None = None,
        inline_commits: bool = True,
    ) -> None:
        self.path = Path(path)
        self.inline_commits = inline_commits
        self.durability = check_durability(durability, ("fsync", "batch", "none"))
        self._sync = self.durability != "none"  # batch groups commits' syncs; the rest syncs alone
        self._group = GroupSync(self.path) if self.durability == "batch" else None
        self.compact_bytes = compact_bytes
        self.keys_path = self.path / KEYS if keys_path is None else Path(keys_path)
        self._encryption = Encryption.of(encryption_key)
        self._vault = KeyFiles(self.keys_path, self.durability)
        self._tails: dict[str, _Tail] = {}
        self._locks: dict[str, tuple[int, Lease]] = {}
        self._tokens = itertools.count(1)
        self._root_ready = False

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"FileStore({str(self.path)!r}, durability={self.durability!r}{encrypted})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Store a new session: built in a temporary folder, then renamed into place."""
        validate_session_id(session.id)
        body = codec.dump_json(session, f"session {session.id}")
        # Before touching disk: bad data creates nothing, not even a data key.
        overhead = SEAL_OVERHEAD if self._encryption is not None else 0
        codec.check_record_size(session.revision, len(body) + overhead)
        await self._run(self._create_sync, session.id, session.revision, body)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot and journal, or None."""
        return await self._run(self._load_sync, validate_session_id(session_id))

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` if a runner holds it."""
        validate_session_id(session.id)
        saved = session.model_copy(update={"revision": session.revision + 1})
        await self._run(self._save_sync, saved, codec.dump_json(saved, f"session {saved.id}"))
        session.revision = saved.revision  # only once the new revision is on disk

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Append one checkpoint to the journal and make it durable."""
        session_id = validate_session_id(lease.session_id)
        held = self._locks.get(session_id)
        if held is None or held[1] != lease:
            raise LeaseLostError(f"session {session_id}: this lease is not the one held here")
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        body = codec.dump_json(checkpoint, what)
        absorbs = checkpoint.inbox_seq
        if self._group is not None:
            await self._commit_in_group(session_id, body, checkpoint.revision, absorbs)
        elif self.inline_commits and len(self._locks) == 1:
            try:
                self._commit_sync(session_id, body, checkpoint.revision, absorbs)
            except OSError as exc:
                raise StorageError(f"file store {self.path}: {exc}") from exc
            await asyncio.sleep(0)  # let the loop's other tasks run between checkpoints
        else:
            await self._run(self._commit_sync, session_id, body, checkpoint.revision, absorbs)

    async def _commit_in_group(
        self, session_id: str, body: bytes, revision: int, absorbs: int | None
    ) -> None:
        """Group commit: write on the loop's thread, then share a sync with the others.

        The append only reaches the page cache (microseconds, no thread hop); the
        group's next ``syncfs`` makes it durable along with every other session's.
        """
        assert self._group is not None
        try:
            start = self._append(session_id, body, revision, sync=False)
        except OSError as exc:
            raise StorageError(f"file store {self.path}: {exc}") from exc
        try:
            await self._group.wait()
        except BaseException:
            # Not durable (a failed sync) or not known to be (cancelled): never leave it
            # to be found later as if it had been acknowledged.
            self._tails.pop(session_id, None)
            with contextlib.suppress(OSError):
                _truncate_path(self._root() / session_id / JOURNAL, start)
            raise
        if self._compaction_due(session_id, absorbs):
            await self._run(self._compact_if_due, session_id, absorbs)

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox file without the lease; return its number.

        Posting an ``event.id`` the session holds, or its inbox still holds, returns
        its number again. Durable once this returns, whoever runs the session.

        Raises:
            SessionNotFoundError: no such session.
            SerializationError: the payload is not JSON.
            CorruptSessionError, DecryptionError: the session cannot be read.
        """
        validate_session_id(session_id)
        what = f"event {event.name!r} of session {session_id}"
        codec.dump_json(event, what)  # refused before a number or a file is used
        return await self._run(self._post_sync, session_id, event, what)

    async def delete(self, session_id: str) -> bool:
        """Remove a session's folder; return whether it existed."""
        return await self._run(self._delete_sync, validate_session_id(session_id))

    async def list(self) -> list[SessionInfo]:
        """Return a row per session folder, unreadable ones with ``problem`` set."""
        return await self._run(self._list_sync)

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after``, in id order."""
        if after is not None:
            validate_session_id(after)
        return await self._run(self._list_sync, after, limit)

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Take the session's ``flock``; None when another runner holds it.

        ``ttl`` is not needed here: the kernel drops the lock of a process that
        dies, so a crashed holder is taken over at once.
        """
        validate_session_id(session_id)
        wanted = Lease(session_id, owner, next(self._tokens))
        try:
            return await self._run(self._acquire_sync, wanted)
        except asyncio.CancelledError:
            # The thread may have taken the lock before the caller gave up on it: a lease
            # nobody will ever release would strand the session until this store closes.
            held = self._locks.get(session_id)
            if held is not None and held[1].token == wanted.token:
                self._unlock(session_id)
            raise

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
        """Release every lock this store holds, and stop the group-commit thread."""
        for session_id in list(self._locks):
            self._unlock(session_id)
        if self._group is not None:
            await asyncio.to_thread(self._group.close)

    # -- security: shredding, verification, rekeying ----------------------------

    async def shred(self, session_id: str) -> bool:
        """Destroy the session's data key first, then its files; return whether it existed.

        Once this returns, any copy of the session's records (a backup, a lost
        disk) can never be decrypted, even with the master key.

        Raises:
            StorageError: the session is stored in clear: there is no key to destroy.
        """
        return await self._run(self._shred_sync, validate_session_id(session_id))

    async def check(self, session_id: str) -> codec.SessionCheck:
        """Check every live record's checksum (and tag, when encrypted); change nothing."""
        return await self._run(self._check_sync, validate_session_id(session_id))

    async def quarantine(self, session_id: str) -> str:
        """Move a corrupt session's folder into ``.quarantine``; return where it went.

        Raises:
            StorageError: the session is not corrupt (an undecryptable one is never moved).
        """
        return await self._run(self._quarantine_sync, validate_session_id(session_id))

    async def rekey(self, session_id: str) -> RekeyOutcome:
        """Rewrite a session under a fresh data key wrapped by the active master key.

        Atomic per session: a crash at any point leaves every record readable, and
        running it again finishes the work. Returns ``"current"`` when there is
        nothing to do and ``"busy"`` when a runner holds the session.

        Raises:
            EngineError: the store has no key; the session is unreadable (nothing
                is rewritten then).
        """
        return await self._run(self._rekey_sync, validate_session_id(session_id))

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
        if self._sync:
            sync_folder(folder)

    def _keys(self, session_id: str, *, create: bool = False) -> SessionKeys | None:
        """Return the session's data keys; None without a key or for a session in clear."""
        if self._encryption is None:
            return None
        return self._encryption.keys_for(self._vault, session_id, create=create)

    def _forget_keys(self, session_id: str) -> None:
        if self._encryption is not None:
            self._encryption.forget(session_id)

    def _write_snapshot(self, folder: Path, frame: bytes) -> int:
        """Atomically replace ``folder``'s snapshot with ``frame``; return its size."""
        temp = folder / f"{SNAPSHOT}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | O_CLOEXEC
        fd = os.open(temp, flags, 0o600)
        try:
            write_all(fd, frame, 0)
            if self._sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, folder / SNAPSHOT)
        self._sync_dir(folder)
        return len(frame)

    def _create_sync(self, session_id: str, revision: int, body: bytes) -> None:
        root = self._root()
        if self._session_dir(session_id) is not None:
            raise SessionExistsError(f"session {session_id} already exists")
        # The data key is stored (durably) before any record: none exists without it.
        frame = codec.seal_frame(revision, _SESSION, body, self._keys(session_id, create=True))
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
        """Read the session, then add the events posted past its ``inbox_seq``."""
        previous: bytes | None = None
        for _ in range(READ_ATTEMPTS):
            folder = self._session_dir(session_id)
            if folder is None:
                return None
            # The inbox is read first: an event dropped from it after this read was
            # absorbed by a checkpoint that the session read next already holds.
            posted = file_inbox.read(folder)
            found = self._read_session(session_id)
            if found is None:
                return None
            session = found[0]
            try:
                events = file_inbox.decode(
                    posted, folder / INBOX, self._keys(session_id), above=session.inbox_seq
                ).events
            except (CorruptSessionError, DecryptionError):
                if previous == posted:  # the same bytes twice: real damage, not a rewrite
                    raise
                previous = posted
                self._forget_keys(session_id)  # rekeyed since its keys were cached?
                continue
            file_inbox.merge(session, events)
            return session
        raise StorageError(f"session {session_id}: changed on every one of {READ_ATTEMPTS} reads")

    def _read_session(
        self,
        session_id: str,
        model: type[_S] = Session,  # type: ignore[assignment]
    ) -> tuple[_S, _Tail] | None:
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
                fd = os.open(snapshot_path, os.O_RDONLY | os.O_NOFOLLOW | O_CLOEXEC)
            except FileNotFoundError:
                if self._session_dir(session_id) is None:
                    return None  # deleted while we looked
                raise CorruptSessionError(f"{snapshot_path}: snapshot missing") from None
            # Keep the snapshot open until the check: its inode cannot be reused meanwhile.
            with os.fdopen(fd, "rb") as handle:
                inode = os.fstat(fd).st_ino
                snapshot = handle.read()
                journal = read_file(folder / JOURNAL) or b""
                replaced = _inode(snapshot_path) != inode
            if replaced:
                continue
            try:
                return self._decode_session(session_id, folder, snapshot, journal, model)
            except (CorruptSessionError, DecryptionError):
                if previous == (snapshot, journal):
                    raise
                previous = (snapshot, journal)
                # The session may have been rekeyed since its keys were cached.
                self._forget_keys(session_id)
        raise StorageError(f"session {session_id}: changed on every one of {READ_ATTEMPTS} reads")

    def _decode_session(
        self, session_id: str, folder: Path, snapshot: bytes, journal: bytes, model: type[_S]
    ) -> tuple[_S, _Tail]:
        if self._encryption is not None and not self._vault.has_key(session_id):
            self._forget_keys(session_id)  # shredded elsewhere: never read with a cached key
        keys = self._keys(session_id)
        try:
            return self._decode_records(session_id, folder, snapshot, journal, keys, model)
        except DecryptionError as exc:
            if keys is None:
                raise self._explain_missing_key(session_id, exc) from None
            raise

    def _explain_missing_key(self, session_id: str, exc: DecryptionError) -> DecryptionError:
        """Say why a sealed record cannot be opened: no key given, or no data key left."""
        record = self._vault.get_key(session_id)
        if record is None and self._encryption is not None:
            return DecryptionError(
                f"{exc}: session {session_id} has no data key in {self.keys_path} "
                "(shredded, or its key was not copied with its records)"
            )
        if record is not None and self._encryption is None:
            masters = ", ".join(master_key_ids(session_id, record))
            return DecryptionError(
                f"session {session_id} is encrypted under master key {masters} and this "
                "store was opened without a key: set SESSION_ENCRYPTION_KEY or pass "
                "encryption_key"
            )
        return exc

    def _decode_records(
        self,
        session_id: str,
        folder: Path,
        snapshot: bytes,
        journal: bytes,
        keys: SessionKeys | None,
        model: type[_S],
    ) -> tuple[_S, _Tail]:
        """Rebuild the session (or only its listing head) from its snapshot and journal."""
        snapshot_path = folder / SNAPSHOT
        scan = codec.scan_frames(snapshot, str(snapshot_path))
        if scan.torn_tail or len(scan.frames) != 1:
            raise CorruptSessionError(f"{snapshot_path}: expected one complete record")
        frame = scan.frames[0]
        session = codec.decode_model(model, frame, str(snapshot_path), keys, kind=_SESSION)
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
        return session, _Tail(
            scan.valid_end, session.revision, len(snapshot), folder, str(journal_path)
        )

    def _tail(self, session_id: str) -> _Tail:
        """Return where the journal ends; only the lock holder caches it."""
        tail = self._tails.get(session_id)
        if tail is None:
            found = self._read_session(session_id)
            if found is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            self._sync_session(session_id)
            tail = self._tails[session_id] = found[1]
        return tail

    def _sync_session(self, session_id: str) -> None:
        """Make durable what a writer is about to build on.

        A process killed mid-write leaves its writes in the page cache: readable, but
        not on disk (a rename, an append, the journal's own name). A checkpoint built
        on them would be acknowledged, then lost with them in a power cut.
        """
        if not self._sync:
            return
        folder = self._root() / session_id
        # A snapshot is fsynced before its rename, so only its name can be pending.
        try:
            fd = os.open(folder / JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(folder)
        sync_folder(self._root())

    def _commit_sync(
        self, session_id: str, body: bytes, revision: int, absorbs: int | None = None
    ) -> None:
        self._append(session_id, body, revision, sync=True)
        self._compact_if_due(session_id, absorbs)

    def _append(self, session_id: str, body: bytes, revision: int, *, sync: bool) -> int:
        """Append the checkpoint as the journal's next record; return where it starts.

        With ``sync`` it is durable on return (fdatasync); without, the caller makes
        it durable (group commit) or undoes it.
        """
        tail = self._tail(session_id)
        frame = codec.seal_frame(revision, _CHECKPOINT, body, self._keys(session_id))
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC
        try:
            fd = os.open(tail.journal, flags, 0o600)
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
                write_all(fd, frame, tail.end)
                if sync and self._sync:
                    os.fdatasync(fd)
            except OSError:
                # Never report this record as committed, and never leave it to be
                # found later: a failed fsync may have dropped it from the cache.
                self._tails.pop(session_id, None)
                _truncate_quietly(fd, tail.end)
                raise
            if tail.end == 0 and sync:
                self._sync_dir(tail.folder)  # the journal's name must be durable too
        finally:
            os.close(fd)
        start = tail.end
        tail.end += len(frame)
        tail.revision = revision
        return start

    def _compaction_due(self, session_id: str, absorbs: int | None) -> bool:
        tail = self._tails.get(session_id)
        if tail is None:
            return False
        limit = max(self.compact_bytes, tail.snapshot_size)
        return tail.end > limit or (absorbs is not None and file_inbox.size(tail.folder) > limit)

    def _compact_if_due(self, session_id: str, absorbs: int | None) -> None:
        tail = self._tails.get(session_id)
        if tail is None:
            return
        if tail.end > max(self.compact_bytes, tail.snapshot_size):
            self._compact_quietly(session_id)
        elif absorbs is not None and file_inbox.size(tail.folder) > max(
            self.compact_bytes, tail.snapshot_size
        ):
            self._compact_inbox_quietly(tail.folder, session_id, absorbs)

    def _compact_quietly(self, session_id: str) -> None:
        """Fold the journal into the snapshot; a failure here loses nothing committed."""
        try:
            found = self._read_session(session_id)
            if found is not None:
                session = found[0]
                folder = self._root() / session_id
                frame = codec.encode_model(
                    session.revision, session, f"session {session_id}", self._keys(session_id)
                )
                self._replace_whole(folder, frame, session)
                self._compact_inbox(folder, session_id, session.inbox_seq)
        except (OSError, EngineError) as exc:
            self._tails.pop(session_id, None)
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _compact_inbox(
        self, folder: Path, session_id: str, absorbed: int, *, reseal: bool = False
    ) -> None:
        """Drop the posted events numbered ``absorbed`` or less: the session holds them.

        Only once a durable checkpoint (or snapshot) says so. With ``reseal``, every
        record left is sealed again under the session's current keys (a rekey).
        """
        if file_inbox.size(folder) == 0:
            return
        keys = self._keys(session_id)
        with file_inbox.locked(folder, session_id):
            data = file_inbox.read(folder)
            posted = file_inbox.decode(data, folder / INBOX, keys, above=absorbed)
            if posted.absorbed or reseal or posted.end != posted.size:
                rewritten = file_inbox.rewritten(posted, keys, session_id)
                file_inbox.replace(folder, rewritten, sync=self._sync)

    def _compact_inbox_quietly(self, folder: Path, session_id: str, absorbed: int) -> None:
        """Drop absorbed events; a failure loses nothing (loads skip them anyway)."""
        try:
            self._compact_inbox(folder, session_id, absorbed)
        except (OSError, EngineError) as exc:
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _replace_whole(self, folder: Path, frame: bytes, session: Session) -> None:
        """Make ``frame`` (``session`` encoded) the snapshot and empty the journal."""
        size = self._write_snapshot(folder, frame)
        journal = folder / JOURNAL
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC)
        except FileNotFoundError:
            pass
        else:
            try:
                os.ftruncate(fd, 0)
                if self._sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        self._tails[session.id] = _Tail(0, session.revision, size, folder, str(folder / JOURNAL))

    def _save_sync(self, saved: Session, body: bytes) -> None:
        folder = self._session_dir(saved.id)
        if folder is None:
            raise SessionNotFoundError(f"session {saved.id} not found")
        # Held here or elsewhere, a lease means a runner is committing: never overwrite.
        if not self._acquire_sync(Lease(saved.id, "save", next(self._tokens))):
            raise SessionBusyError(f"session {saved.id} is being run by another runner")
        try:
            # Reading first means a session we cannot decrypt is never overwritten.
            check_fresh(saved.id, saved.revision - 1, self._tail(saved.id).revision)
            frame = codec.seal_frame(saved.revision, _SESSION, body, self._keys(saved.id))
            self._replace_whole(folder, frame, saved)
            self._compact_inbox_quietly(folder, saved.id, saved.inbox_seq)
        finally:
            self._unlock(saved.id)

    def _post_sync(self, session_id: str, event: Event, what: str) -> int:
        folder = self._session_dir(session_id)
        if folder is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        with file_inbox.locked(folder, session_id):
            # Fresh keys: a rekey in another process may have replaced them, and a
            # record sealed under a dropped key could never be read again.
            self._forget_keys(session_id)
            # The session's inbox and inbox_seq decide the number: a checkpoint may have
            # absorbed events whose records a power cut then took from the file.
            found = self._read_session(session_id)
            if found is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            keys = self._keys(session_id)
            posted = file_inbox.decode(file_inbox.read(folder), folder / INBOX, keys)
            number, new = file_inbox.number_for(event, found[0], posted)
            sync = self._sync
            if new:
                record = file_inbox.event_record(event, number, what, keys)
                file_inbox.append(folder, record, posted.end, sync=sync)
            elif sync:
                file_inbox.make_durable(folder)  # a retry: the first post may have died unsynced
            return number

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
        self._vault.delete_key(session_id)  # a removed session leaves no key behind
        self._forget_keys(session_id)
        shutil.rmtree(doomed)
        return True

    def _shred_sync(self, session_id: str) -> bool:
        folder = self._session_dir(session_id)
        destroyed = self._vault.delete_key(session_id)  # first: from here on, copies are dead
        self._forget_keys(session_id)
        if folder is None:
            return destroyed  # a key left behind by an interrupted remove is shredded too
        if not destroyed and not _sealed(folder / SNAPSHOT):
            raise StorageError(
                f"session {session_id} is stored in clear: it can be removed, but it has "
                "no data key to shred"
            )
        return self._delete_sync(session_id)

    def _check_sync(self, session_id: str) -> codec.SessionCheck:
        folder = self._root() / session_id
        try:
            found = self._read_session(session_id)
            keys = self._keys(session_id)
            posted = file_inbox.decode(file_inbox.read(folder), folder / INBOX, keys)
        except DecryptionError as exc:
            return codec.SessionCheck(session_id, "undecryptable", str(exc))
        except CorruptSessionError as exc:
            return codec.SessionCheck(session_id, "corrupt", str(exc))
        except (StorageError, OSError) as exc:  # a symlink in place, permissions, I/O
            return codec.SessionCheck(session_id, "unreadable", str(exc))
        if found is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        journal = folder / JOURNAL
        torn = _torn_tail(
            session_id, journal, journal.lstat().st_size if journal.exists() else 0, found[1].end
        ) or _torn_tail(session_id, folder / INBOX, posted.size, posted.end)
        if torn is not None:
            return torn
        return codec.SessionCheck(session_id, "ok", "encrypted" if keys is not None else "in clear")

    def _quarantine_sync(self, session_id: str) -> str:
        check = self._check_sync(session_id)
        if check.verdict != "corrupt":
            raise StorageError(
                f"session {session_id} is {check.verdict}, not corrupt: only corrupt "
                "sessions are quarantined"
            )
        root = self._root()
        folder = private_folder(root / QUARANTINE, create=True)
        assert folder is not None  # created above
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = folder / f"{session_id}.{stamp}"
        # The key stays in place: the quarantined records stay readable for repair.
        (root / session_id).rename(target)
        self._sync_dir(root)
        self._sync_dir(folder)
        self._tails.pop(session_id, None)
        self._forget_keys(session_id)
        return str(target)

    def _rekey_sync(self, session_id: str) -> RekeyOutcome:
        encryption = self._encryption
        if encryption is None:
            raise EngineError("rekey needs an encryption key: set SESSION_ENCRYPTION_KEY")
        if not self._acquire_sync(Lease(session_id, "rekey", next(self._tokens))):
            return "busy"
        try:
            encryption.prepare(self._vault)
            record = self._vault.get_key(session_id)
            if record is not None and encryption.is_current(session_id, record):
                return "current"
            found = self._read_session(session_id)  # unreadable: raise, rewrite nothing
            if found is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            session, folder = found[0], self._root() / session_id
            # The inbox too: unreadable, raise and rewrite nothing.
            file_inbox.decode(file_inbox.read(folder), folder / INBOX, self._keys(session_id))
            in_use, clear_in_use = _keys_in_use(folder)
            # 1. the new data key joins the ones the records still use ...
            keys, record = encryption.begin_rekey(
                session_id, self._keys(session_id), in_use, clear_in_use
            )
            self._vault.put_key(session_id, record)
            encryption.remember(keys)
            # 2. ... the whole session is rewritten under it (atomically) ...
            what = f"session {session_id}"
            self._replace_whole(
                folder, codec.encode_model(session.revision, session, what, keys), session
            )
            # Posted events too, numbers kept (a sender posting meanwhile reads the new
            # key record, so it seals under the new key as well) ...
            self._compact_inbox(folder, session_id, session.inbox_seq, reseal=True)
            # 3. ... and only then are the old keys dropped.
            keys, record = encryption.finish_rekey(session_id, keys)
            self._vault.put_key(session_id, record)
            encryption.remember(keys)
            return "rekeyed"
        finally:
            self._unlock(session_id)

    def _list_sync(
        self, after: str | None = None, limit: int | None = None
    ) -> builtins.list[SessionInfo]:
        names = sorted(
            name
            for name in os.listdir(self._root())
            # Skips what is no session folder: .trash, an interrupted create, ...
            if is_session_id(name) and (after is None or name > after)
        )
        rows = []
        for name in names[:limit]:
            try:
                found = self._read_session(name, SessionHead)
                if found is not None:  # a damaged inbox makes the session unreadable too
                    codec.scan_frames(
                        file_inbox.read(found[1].folder), str(found[1].folder / INBOX)
                    )
            except (StorageError, OSError) as exc:
                # Unreadable (corrupt, undecryptable, a symlink, unreadable bytes):
                # report it rather than hide it or fail the whole listing.
                rows.append(SessionInfo(id=name, problem=str(exc)))
                continue
            if found is not None:
                rows.append(found[0].info())
        return rows

    def _acquire_sync(self, lease: Lease) -> Lease | None:
        session_id = lease.session_id
        folder = self._session_dir(session_id)
        if folder is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._locks:
            return None
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC, 0o600)
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
        self._forget_keys(session_id)  # ... or rekeyed it
        return lease

    def _unlock(self, session_id: str) -> None:
        held = self._locks.pop(session_id, None)
        self._tails.pop(session_id, None)
        if held is not None:
            # A blank lock file says "released on purpose"; a holder that crashes
            # leaves its name in it, which the next holder counts as a takeover.
            # Blanked in place, not truncated: no size change, no metadata to journal.
            with contextlib.suppress(OSError):
                write_all(held[0], b" " * max(LOCK_RECORD, os.fstat(held[0]).st_size), 0)
            os.close(held[0])  # closing the only descriptor releases the flock


def _replay(
    session: Session | SessionHead, frame: codec.Frame, source: str, keys: SessionKeys | None
) -> None:
    """Apply one journal record to the session (or its head), checking its number."""
    if isinstance(session, SessionHead):
        head = codec.decode_model(CheckpointHead, frame, source, keys, kind=_CHECKPOINT)
        _check_numbered(head.revision, frame, source)
        session.apply(head)
    else:
        checkpoint = codec.decode_model(Checkpoint, frame, source, keys)
        _check_numbered(checkpoint.revision, frame, source)
        session.apply(checkpoint)


def _check_numbered(revision: int, frame: codec.Frame, source: str) -> None:
    if revision != frame.seq:
        raise CorruptSessionError(f"{source}: mislabelled record at {frame.offset}")


def _record_holder(fd: int, owner: str) -> int:
    """Write our name into the lock file; return the takeovers it now records."""
    found = os.pread(fd, 256, 0)
    previous = found.split()
    takeovers = 0
    if previous:  # the last holder never released: it died holding the lock
        # The count is the last word: an owner's name may hold spaces.
        takeovers = 1 + (int(previous[-1]) if len(previous) > 1 and previous[-1].isdigit() else 0)
    # Padded with blanks to a fixed size (and over anything longer an older version
    # left), so that holding and releasing never change the file's size.
    record = f"{owner} {takeovers}\n".encode().ljust(max(LOCK_RECORD, len(found)), b" ")
    write_all(fd, record, 0)
    return takeovers


def _torn_tail(session_id: str, path: Path, size: int, end: int) -> codec.SessionCheck | None:
    """Report the bytes after a file's last complete record: an append never acknowledged."""
    if size <= end:
        return None
    cut_by = "next event posted" if path.name == INBOX else "next checkpoint"
    return codec.SessionCheck(
        session_id,
        "torn tail",
        f"{path}: {size - end} bytes after the last complete record (offset {end}): an "
        f"interrupted append, never acknowledged; the {cut_by} cuts it off",
    )


def _sealed(snapshot: Path) -> bool:
    """Tell whether a snapshot's record is encrypted (its header alone says so)."""
    head = read_file(snapshot, codec.HEADER_SIZE) or b""
    return len(head) == codec.HEADER_SIZE and bool(head[3] & codec.FLAG_ENCRYPTED)


def _keys_in_use(folder: Path) -> tuple[set[str], bool]:
    """Return the data key ids a session's live records use, and whether any is in clear."""
    snapshot = codec.scan_frames(read_file(folder / SNAPSHOT) or b"", str(folder / SNAPSHOT))
    journal = codec.scan_frames(read_file(folder / JOURNAL) or b"", str(folder / JOURNAL))
    revision = snapshot.frames[0].seq if snapshot.frames else 0
    live = snapshot.frames + [frame for frame in journal.frames if frame.seq > revision]
    ids = {codec.frame_key_id(frame) for frame in live} | file_inbox.key_ids(folder)
    return {key_id for key_id in ids if key_id is not None}, None in ids


def _inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except FileNotFoundError:
        return None


def _truncate_path(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _truncate_quietly(fd: int, size: int) -> None:
    # If even this fails, the record stays unacknowledged and the next commit re-reads.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
