"""FileStore: the embedded default, one folder per session on the local disk.

Each session folder holds ``snapshot`` (one framed record: the whole session at
some revision, replaced atomically by temp file + fsync + rename + directory
fsync), ``journal`` (framed checkpoints written after that revision, each made
durable with fdatasync before ``commit`` returns, into zeros reserved after the
last record where it can: ``RESERVE_BYTES``) and ``lock`` (an ``flock`` held
by the runner that owns the session, released by the kernel if it dies).

Events posted without the lease (``engine.events.EventInbox``) go to the
folder's ``inbox`` file under an ``inbox.lock`` of their own (``file_inbox``), so a
runner holding ``lock`` in another process does not keep them out.

A checkpoint costs one write and one fdatasync, whatever the session's history.
The journal is folded into a new snapshot once it outgrows the snapshot, which
keeps loading bounded while the copying stays amortised constant per byte
(``file_compaction``).

With an encryption key every record is sealed under the session's data key, whose
wrapped form lives in ``<root>/.keys/<id>.key`` (``file_keys``), apart from the
session's folder: see docs/security.md.

This module holds the store and its writes under the lease. Creating a session
is ``file_create``'s; the snapshot and journal files are read and written by
``file_records``, the ``lock`` file by ``file_locks``; lock-free reads and listing
live in ``file_reads`` (helped by the finished marks of ``file_index`` and the
expiry bounds of ``file_expiry``), and shred, check, quarantine and rekey in
``file_security``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

from .. import codec
from ..crypto import Encryption, KeyInput, RekeyOutcome, SessionKeys
from ..errors import (
    LeaseLostError,
    SessionBusyError,
    SessionNotFoundError,
    StorageError,
)
from ..models import UNFINISHED, Checkpoint, Event, Session, SessionInfo
from . import (
    file_compaction,
    file_create,
    file_expiry,
    file_inbox,
    file_index,
    file_locks,
    file_reads,
    file_records,
    file_security,
)
from .base import (
    DEFAULT_LEASE_TTL,
    LIST_PAGE,
    Durability,
    Lease,
    LoopTurns,
    check_durability,
    check_fresh,
    to_the_end,
    validate_session_id,
)
from .file_inbox import INBOX
from .file_keys import KeyFiles
from .file_records import CHECKPOINT_KIND, JOURNAL, SESSION_KIND, Tail
from .fsutil import O_CLOEXEC, sync_folder, write_all
from .group_sync import GroupSync

TRASH = ".trash"
KEYS = ".keys"
COMPACT_MIN_BYTES = 1 << 20
"""A journal smaller than this is never compacted: replaying it is cheap."""
RESERVE_FIRST = 1 << 12
"""The fewest zeros reserved after a record that grows the journal (a page)."""
RESERVE_BYTES = 1 << 16
"""The most zeros reserved after a record that grows the journal, for the next to overwrite.

As many as the journal holds, from ``RESERVE_FIRST`` to this. An fdatasync of a
write that leaves the file's size as it was need not commit a new size and new
blocks to the filesystem's journal (see docs/storage.md). Group commit reserves
none: its shared syncfs commits every file's metadata anyway."""

_T = TypeVar("_T")


_Held = tuple[int, Lease, tuple[int, int]]
"""A held session: its lock file's descriptor, the lease, its folder's (device, inode)."""


@dataclass(frozen=True, slots=True)
class _Write:
    """One checkpoint on its way to the journal, and what follows from it."""

    session_id: str
    body: bytes  # the checkpoint's JSON
    revision: int
    absorbs: int | None  # the inbox number it takes events up to, if any
    finished: bool  # its status ends the session: mark it (``file_index``)
    expires: float  # the session's expiry, POSIX seconds (``file_expiry``)


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
            the disk). An inline commit gives the loop's other tasks a turn once
            ``base.INLINE_TURN`` (2 ms) has passed since the store last did.

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
        self._tails: dict[str, Tail] = {}
        self._turns = LoopTurns()  # inline commits let the loop's other tasks run
        # Per held session: its lock file's descriptor, the lease, and the (device,
        # inode) of the folder the lock was taken in (``_same_folder``).
        self._locks: dict[str, _Held] = {}
        self._tokens = itertools.count(1)
        self._root_ready = False
        # The ids a paged walk skipping finished or unexpired sessions visits, listed
        # by its first page: (what it skips, the ids, the last id it returned, when).
        self._walk: tuple[tuple[bool, float | None], list[str], str, float] | None = None

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"FileStore({str(self.path)!r}, durability={self.durability!r}{encrypted})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Store a new session: built in a temporary folder, then renamed into place."""
        await file_create.create(self, session)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot and journal, or None."""
        return await self._io(file_reads.load, self, validate_session_id(session_id))

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
        write = _Write(
            session_id,
            codec.dump_json(checkpoint, what),
            checkpoint.revision,
            checkpoint.inbox_seq,
            checkpoint.status not in UNFINISHED,
            checkpoint.expires_at.timestamp(),
        )
        if self._group is not None:
            await self._commit_in_group(write)
        elif self.inline_commits and len(self._locks) == 1:
            try:
                self._commit_sync(write)
            except OSError as exc:
                raise StorageError(f"file store {self.path}: {exc}") from exc
            await self._turns.maybe()
        else:
            await self._run(self._commit_sync, write)

    async def _commit_in_group(self, write: _Write) -> None:
        """Group commit: write on the loop's thread, then share a sync with the others.

        The append only reaches the page cache (microseconds, no thread hop); the
        group's next ``syncfs`` makes it durable along with every other session's.
        """
        assert self._group is not None
        session_id = write.session_id
        try:
            self._group.prepare()  # before the write: its errors must reach the sync
            start = self._append(write, sync=False)
        except OSError as exc:
            raise StorageError(f"file store {self.path}: {exc}") from exc
        try:
            await self._group.wait()
        except BaseException:
            # Not durable (a failed sync) or not known to be (cancelled): never leave it
            # to be found later as if it had been acknowledged.
            self._forget_tail(session_id)
            with contextlib.suppress(OSError):
                file_records.truncate(self._root() / session_id / JOURNAL, start)
            raise
        self._mark_if_finished(session_id, write.finished)
        self._bound_if_behind(session_id, write.expires)
        if file_compaction.due(self, session_id, write.absorbs):
            await self._run(file_compaction.compact_if_due, self, session_id, write.absorbs)

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
        return await self._run(file_reads.rows, self, None, None)

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after``, in id order."""
        if after is not None:
            validate_session_id(after)
        return await self._run(file_reads.rows, self, after, limit)

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Like ``list_page``, skipping unread the sessions marked finished (``file_index``)."""
        if after is not None:
            validate_session_id(after)
        return await self._run(partial(file_reads.rows, unfinished=True), self, after, limit)

    async def list_expired_page(
        self, now: datetime, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Like ``list_page``, skipping unread the sessions whose expiry bound is after ``now``."""
        if after is not None:
            validate_session_id(after)
        rows = partial(file_reads.rows, expired_by=now.timestamp())
        return await self._run(rows, self, after, limit)

    async def count_unexpired(self, now: datetime) -> int:
        """Count the sessions not expired at ``now``, reading only those whose bound passed."""
        return await self._run(file_reads.count_unexpired, self, now.timestamp())

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
            return await self._io(self._acquire_sync, wanted)
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
        return await self._run(file_security.shred, self, validate_session_id(session_id))

    async def check(self, session_id: str) -> codec.SessionCheck:
        """Check every live record's checksum (and tag, when encrypted); change nothing."""
        return await self._run(file_security.check, self, validate_session_id(session_id))

    async def quarantine(self, session_id: str) -> str:
        """Move a corrupt session's folder into ``.quarantine``; return where it went.

        Raises:
            StorageError: the session is not corrupt (an undecryptable one is never moved).
        """
        return await self._run(file_security.quarantine, self, validate_session_id(session_id))

    async def rekey(self, session_id: str) -> RekeyOutcome:
        """Rewrite a session under a fresh data key wrapped by the active master key.

        Atomic per session: a crash at any point leaves every record readable, and
        running it again finishes the work. Returns ``"current"`` when there is
        nothing to do and ``"busy"`` when a runner holds the session.

        Raises:
            EngineError: the store has no key; the session is unreadable (nothing
                is rewritten then).
        """
        return await self._run(file_security.rekey, self, validate_session_id(session_id))

    # -- implementation (runs in a worker thread) -----------------------------

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        try:
            # A thread cannot be stopped: a cancelled caller waits for its I/O before
            # it releases the lock, or a late write could land after another runner's.
            return await to_the_end(asyncio.to_thread(fn, *args))
        except OSError as exc:
            raise StorageError(f"file store {self.path}: {exc}") from exc

    async def _io(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run a session's I/O on the loop's thread with group commit, else on a worker.

        Group commit is for many sessions at once: their small reads and writes cost
        less inline than the thread hops, whose threads would also contend with the
        loop for the interpreter; the syncs, the slow part, run on the group's thread.
        """
        if self._group is None:
            return await self._run(fn, *args)
        try:
            return fn(*args)
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

    def _tail(self, session_id: str, *, sync: bool = True) -> Tail:
        """Return where the journal ends; only the lock holder caches it.

        What it found is made durable first, unless the caller's write is to be made
        durable by a group sync, which covers what was found too.
        """
        tail = self._tails.get(session_id)
        if tail is None:
            found = file_reads.read_session(self, session_id)
            if found is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            tail = self._tails[session_id] = found[1]
        if sync and not tail.synced:
            self._sync_session(session_id)
            tail.synced = True
        return tail

    def _keep_tail(self, session_id: str, tail: Tail, held: _Held | None) -> None:
        """Keep where a load under this store's lock found the journal's end.

        The runner loads a session right after taking its lease, then commits: the
        first commit need not read the session again. ``held`` is the lock as the
        load found it before reading: a read begun before this lock was taken may
        predate another process's last writes, and its tail is not kept. (Writes
        into reserved zeros leave the file's size as it was, so the size check in
        ``_append`` cannot tell such a tail is stale.)
        """
        if held is not None and self._locks.get(session_id) is held:
            self._tails.setdefault(session_id, tail)

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
        file_records.sync_journal(folder)
        sync_folder(folder)
        sync_folder(self._root())

    def _commit_sync(self, write: _Write) -> None:
        self._append(write, sync=True)
        self._mark_if_finished(write.session_id, write.finished)
        self._bound_if_behind(write.session_id, write.expires)
        file_compaction.compact_if_due(self, write.session_id, write.absorbs)

    def _mark_if_finished(self, session_id: str, finished: bool) -> None:
        """Mark a session whose finished status is now durable (``file_index``)."""
        tail = self._tails.get(session_id)
        if finished and tail is not None and not tail.marked:
            file_index.mark(self._root(), session_id)
            tail.marked = True

    def _bound_if_behind(self, session_id: str, expires: float) -> None:
        """Move the session's expiry bound (``file_expiry``) up to a durable expiry.

        Once per lease, then only when it lags by more than ``file_expiry.LAG``: a
        sliding expiry moves at every checkpoint, and an early bound costs a sweep
        no more than a read.
        """
        tail = self._tails.get(session_id)
        if tail is not None and (tail.bound is None or expires - tail.bound > file_expiry.LAG):
            file_expiry.set_bound(self._root(), session_id, expires)
            tail.bound = expires

    def _append(self, write: _Write, *, sync: bool) -> int:
        """Append the checkpoint as the journal's next record; return where it starts.

        With ``sync`` it is durable on return (fdatasync); without, the caller makes
        it durable (group commit) or undoes it. A checkpoint that leaves the session
        unfinished first removes its finished mark, durably.
        """
        session_id, revision = write.session_id, write.revision
        tail = self._tail(session_id, sync=sync)
        if not write.finished and tail.marked is not False:
            file_index.unmark(self._root(), session_id, sync=self._sync)
            tail.marked = False
        frame = codec.seal_frame(revision, CHECKPOINT_KIND, write.body, self._keys(session_id))
        with tail.guard:
            fd = self._journal_fd(session_id, tail)
            # Not os.fstat of the journal: it asks for its change time, and since Linux
            # 6.13 a change time that was asked for makes the next write stamp a
            # fine-grained one, which costs the fdatasync after it 30-50 µs on ext4
            # (measured: a fifth of a step). The folder's identity and the journal's
            # size tell what the check needs.
            if not self._same_folder(session_id, tail):  # removed, maybe made again
                self._forget_tail(session_id)
                raise SessionNotFoundError(f"session {session_id} was removed")
            if os.lseek(fd, 0, os.SEEK_END) == tail.size:
                return self._write_frame(session_id, tail, fd, frame, revision, sync=sync)
            # Someone else wrote since we looked, or a torn tail follows the last
            # good record: re-read, then cut whatever is not a complete record.
            self._forget_tail(session_id)
        tail = self._tail(session_id, sync=sync)
        with tail.guard:
            fd = self._journal_fd(session_id, tail)
            os.ftruncate(fd, tail.end)
            tail.size = tail.end
            return self._write_frame(session_id, tail, fd, frame, revision, sync=sync)

    def _write_frame(
        self, session_id: str, tail: Tail, fd: int, frame: bytes, revision: int, *, sync: bool
    ) -> int:
        """Write ``frame`` at the journal's end (``tail.guard`` held); return where it starts."""
        if revision != tail.revision + 1:
            self._forget_tail(session_id)  # read again before the next commit
            raise StorageError(
                f"session {session_id}: checkpoint revision {revision} does not "
                f"follow stored revision {tail.revision}"
            )
        start, end = tail.end, tail.end + len(frame)
        size = max(end, tail.size)
        # Reserve space for the next records, up to the compaction limit; not with group
        # commit, whose shared syncfs commits every file's metadata anyway.
        if end > tail.size and self._group is None:
            # As much as the journal holds already (a short session writes few zeros),
            # from a page up to RESERVE_BYTES.
            grown = min(max(end, RESERVE_FIRST), RESERVE_BYTES)
            reserve = min(grown, file_compaction.limit(self, tail) - end)
            if reserve >= len(frame):  # room for one more record at least
                size = end + reserve
                frame += bytes(reserve)
        try:
            write_all(fd, frame, start)
            if sync and self._sync:
                os.fdatasync(fd)
        except OSError:
            # Never report this record as committed, and never leave it to be
            # found later: a failed fsync may have dropped it from the cache.
            file_records.truncate_quietly(fd, start)
            self._forget_tail(session_id)
            raise
        if start == 0 and sync:
            self._sync_dir(tail.folder)  # the journal's name must be durable too
        tail.end, tail.size, tail.revision = end, size, revision
        return start

    def _journal_fd(self, session_id: str, tail: Tail) -> int:
        """Return the journal's descriptor, opened once while the lease is held.

        Called with ``tail.guard`` held.

        Raises:
            SessionNotFoundError: the session's folder is gone.
            LeaseLostError: the session was let go (released, or the store closed)
                while this commit ran.
        """
        # Let go by another thread (deleted, released, the store closed) between this
        # commit's check of its lease and its write: the lock is no longer ours.
        if tail.dropped or session_id not in self._locks:
            self._forget_tail(session_id)
            if self._session_dir(session_id) is None:
                raise SessionNotFoundError(f"session {session_id} was removed")
            raise LeaseLostError(f"session {session_id}: let go while a commit ran")
        fd = tail.fd
        if fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC
            try:
                fd = os.open(tail.journal, flags, 0o600)
            except FileNotFoundError:
                raise SessionNotFoundError(f"session {session_id} was removed") from None
            # After the open: a folder made again under this id since the lease was
            # taken must not get this holder's writes (its journal is not ours).
            if not self._same_folder(session_id, tail):
                os.close(fd)
                raise SessionNotFoundError(f"session {session_id} was removed")
            tail.fd = fd
        return fd

    def _same_folder(self, session_id: str, tail: Tail) -> bool:
        """Tell whether the session's folder is still the one its lease was taken in.

        The lock file held open pins that folder's inode: a folder made again under
        the same id gets another one.
        """
        try:
            found = os.stat(tail.folder)
        except FileNotFoundError:
            return False
        held = self._locks.get(session_id)
        return held is not None and (found.st_dev, found.st_ino) == held[2]

    def _forget_tail(self, session_id: str, *, trim: bool = False) -> None:
        """Drop what is cached of the session's journal: it is read again when needed.

        With ``trim`` (a lease given back), the zeros reserved after its records are
        cut off, so a session at rest takes only the space its records do. Not
        synced: a crash before the cut leaves zeros, which read as the end.
        """
        tail = self._tails.pop(session_id, None)
        if tail is None:
            return
        with tail.guard:  # waits for a commit writing through it on another thread
            tail.dropped = True
            if tail.fd is not None:
                if trim and tail.size > tail.end:
                    file_records.truncate_quietly(tail.fd, tail.end)
                with contextlib.suppress(OSError):  # nothing was written since the last sync
                    os.close(tail.fd)
                tail.fd = None

    def _replace_whole(self, folder: Path, frame: bytes, session: Session) -> None:
        """Make ``frame`` (``session`` encoded) the snapshot and empty the journal.

        Raises:
            LeaseLostError: the session's lock is no longer held here (let go by
                another thread while a compaction read it).
        """
        if session.id not in self._locks:
            raise LeaseLostError(f"session {session.id}: let go before it was rewritten")
        size = file_records.write_snapshot(folder, frame, sync=self._sync)
        file_records.empty_journal(folder, sync=self._sync)
        self._forget_tail(session.id)
        self._tails[session.id] = Tail(
            0, session.revision, size, folder, str(folder / JOURNAL), 0, synced=True
        )

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
            frame = codec.seal_frame(saved.revision, SESSION_KIND, body, self._keys(saved.id))
            finished = saved.status not in UNFINISHED
            if not finished:
                file_index.unmark(self._root(), saved.id, sync=self._sync)
            # A save may move the expiry earlier: no bound may outlive the old one.
            file_expiry.remove_bound(self._root(), saved.id, sync=self._sync)
            self._replace_whole(folder, frame, saved)
            self._mark_if_finished(saved.id, finished)
            self._bound_if_behind(saved.id, saved.expires_at.timestamp())
            file_compaction.compact_inbox_quietly(self, folder, saved.id, saved.inbox_seq)
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
            found = file_reads.read_session(self, session_id)
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
        self._forget_tail(session_id)
        self._unlock(session_id)
        self._vault.delete_key(session_id)  # a removed session leaves no key behind
        self._forget_keys(session_id)
        file_index.forget(self._root(), session_id)
        file_expiry.forget(self._root(), session_id)
        shutil.rmtree(doomed)
        return True

    def _acquire_sync(self, lease: Lease) -> Lease | None:
        session_id = lease.session_id
        folder = self._session_dir(session_id)
        if folder is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if session_id in self._locks:
            return None
        try:
            home = os.stat(folder)  # before the lock: a folder replaced between reads as removed
        except FileNotFoundError:
            raise SessionNotFoundError(f"session {session_id} not found") from None
        taken = file_locks.take(folder, lease.owner)
        if taken is None:
            return None
        fd, takeovers = taken
        lease = replace(lease, takeovers=takeovers)
        self._locks[session_id] = (fd, lease, (home.st_dev, home.st_ino))
        self._forget_tail(session_id)  # another process may have written meanwhile
        self._forget_keys(session_id)  # ... or rekeyed it
        return lease

    def _unlock(self, session_id: str) -> None:
        held = self._locks.pop(session_id, None)
        self._forget_tail(session_id, trim=held is not None)
        if held is not None:
            file_locks.give_back(held[0])
