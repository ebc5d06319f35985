"""SQLiteStore: an embedded database file, safe for several processes on one machine.

A session is a snapshot record plus the step records committed after it (tables
in ``engine.stores.sqlite_schema``). A checkpoint inserts one step row and
updates one session row in one transaction, fenced by the lease's owner and
epoch, so its cost does not grow with the session's history; once the steps
outgrow the snapshot they are folded into it. Records are the same checksummed
frames the file store writes (``codec.encode_model``). Events are taken without
the lease (``engine.events.EventInbox``), numbered per session; a checkpoint
that absorbs events up to number n deletes them in its transaction.

The database runs in WAL mode (readers never wait for the writer) with
``synchronous=FULL`` for durability ``"fsync"`` and ``"batch"`` (group commit:
``engine.stores.sqlite_group``); every write transaction is ``BEGIN IMMEDIATE``
under a busy timeout, so processes queue for the write lock instead of failing
with "database is locked". The sqlite3 calls of a store run on one thread of its
own, so the event loop never waits for another writer; while the store runs a
single session, its commits run on the loop's thread (``sqlite_inline``).

With an encryption key every record (snapshot, step, event) is sealed under its
session's data key, wrapped in ``stepvault_session_keys`` (see docs/security.md);
the connection then runs with ``secure_delete`` on, so deleted rows are zeroed.
Shredding, quarantine and rekeying live in ``engine.stores.sqlite_security``.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .. import codec
from ..crypto import Encryption, KeyInput, RekeyOutcome, SessionKeys
from ..errors import (
    EngineError,
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..log import get_logger
from ..models import UNFINISHED, Checkpoint, Event, Session, SessionInfo
from . import sqlite_inline as inline
from . import sqlite_security as security
from .base import (
    DEFAULT_LEASE_TTL,
    LIST_PAGE,
    Durability,
    Lease,
    LoopTurns,
    check_durability,
    check_fresh,
    new_session_body,
    to_the_end,
    validate_session_id,
)
from .sql import (
    COMPACT_MIN_BYTES,
    check_session,
    encode_event,
    not_corrupt,
    open_records,
    rebuild_session,
)
from .sqlite_group import GroupCommit
from .sqlite_schema import (
    SCHEMA_VERSION,
    add_event,
    append_step,
    connect,
    delete_rows,
    fetch,
    fold_steps,
    insert_session,
    release_lease,
    renew_lease,
    replace_session,
    take_lease,
    write,
)

_T = TypeVar("_T")
_log = get_logger()
_SESSION = Session.__name__  # record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__
_DURABILITY = ("fsync", "batch", "none")


_LIST = (
    "SELECT id, status, workflow, created_at, last_activity, expires_at, steps_done"
    " FROM stepvault_sessions WHERE id > ? ORDER BY id LIMIT ?"
)
_LIST_UNFINISHED = _LIST.replace(  # the statuses are our own names, not input
    "WHERE id > ?", f"WHERE id > ? AND status IN ({', '.join(map(repr, sorted(UNFINISHED)))})"
)


class SQLiteStore:
    """Store sessions in one SQLite database file (WAL mode).

    Args:
        path: the database file (created 0600 on first use, with its folder).
        encryption_key: encrypt every record (AES-256-GCM) as ``FileStore`` does:
            32 bytes, a base64 string of 32 bytes, a passphrase, or a
            ``crypto.KeyRing`` holding old keys too. None stores records in clear.
        durability: ``"fsync"`` (``synchronous=FULL``: every commit is durable when
            it returns), ``"batch"`` (the same promise, with the commits that arrive
            together written in one transaction: one sync for all; see ``batches``)
            or ``"none"`` (``synchronous=OFF``, for tests).
        compact_bytes: step bytes below which no compaction happens.
        inline_commits: while this store holds a single lease and its thread is idle,
            commit on the event loop's thread (``engine.stores.sqlite_inline``): two
            thread wake-ups less per checkpoint. Another writer holding the
            database's lock sends the commit to the store's thread, so the loop
            never waits for it. False always uses the store's thread. An inline
            commit gives the loop's other tasks a turn once ``base.INLINE_TURN``
            (2 ms) has passed since the store last did.

    A lease lasts the ``ttl`` its runner asks for unless the runner's heartbeat
    renews it; a runner that dies is taken over once its lease has run out.

    ``batches`` counts the group transactions a ``"batch"`` store has committed
    and ``queued`` the commits waiting for one (for tests and monitoring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_key: KeyInput | None = None,
        durability: Durability = "fsync",
        compact_bytes: int = COMPACT_MIN_BYTES,
        inline_commits: bool = True,
    ) -> None:
        self.path = Path(path)
        self.inline_commits = inline_commits
        self.durability = check_durability(durability, supported=_DURABILITY)
        self.compact_bytes = compact_bytes
        self._encryption = Encryption.of(encryption_key)
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the store's thread, like the connection.
        self._db: sqlite3.Connection | None = None
        self._vault = security.KeyRows(self._open_db)
        self._held: dict[str, Lease] = {}
        self._lease_keys: dict[str, bytes | None] = {}  # key row read with the held lease
        self._group = GroupCommit(self.path)
        self._inline: sqlite3.Connection | None = None  # used on the loop's thread only
        self._running = 0  # calls handed to the store's thread and not yet finished
        self._turns = LoopTurns()  # inline commits let the loop's other tasks run

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"SQLiteStore({str(self.path)!r}, durability={self.durability!r}{encrypted})"

    @property
    def batches(self) -> int:
        """Group transactions committed (``"batch"`` only): fewer than the commits."""
        return self._group.batches

    @property
    def queued(self) -> int:
        """Commits handed over and not yet decided (``"batch"`` only)."""
        return self._group.queued

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Insert a new session row with its snapshot (and its data key, when encrypted)."""
        body = new_session_body(session, sealed=self._encryption is not None)
        await self._run(self._create_sync, session, body)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot, later steps and posted events."""
        return await self._run(self._load_sync, validate_session_id(session_id))

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` while a runner's lease is live."""
        validate_session_id(session.id)
        saved = session.model_copy(update={"revision": session.revision + 1})
        body = codec.dump_json(saved, f"session {saved.id}")
        await self._run(self._save_sync, saved, body)
        session.revision = saved.revision  # only once the new revision is stored

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Insert one step row and update the session row, fenced by the lease.

        With ``"batch"`` the checkpoint joins the next group transaction in a
        savepoint of its own: it returns once that transaction is durable, and
        raises only its own refusal (or the group's failure to commit).
        """
        session_id = validate_session_id(lease.session_id)
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        body = codec.dump_json(checkpoint, what)
        if self.durability != "batch":
            if await self._commit_inline(lease, checkpoint, body):
                return
            await self._run(self._commit_sync, lease, checkpoint, body)
            return
        queued = self._group.put(lease, checkpoint, body)
        try:
            # Whichever drain runs first takes it, and runs before this one ends.
            await self._run(self._drain_sync)
        finally:
            self._group.queued -= 1
        self._group.outcome(queued)

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox without the lease; return its number.

        Posting an ``event.id`` the inbox still holds returns its number again.

        Raises:
            SessionNotFoundError: no such session.
            SerializationError: the payload is not JSON.
        """
        return await self._run(self._post_sync, validate_session_id(session_id), event)

    async def delete(self, session_id: str) -> bool:
        """Remove a session, its steps and its posted events; return whether it existed."""
        return await self._run(self._delete_sync, validate_session_id(session_id))

    async def list(self) -> builtins.list[SessionInfo]:
        """Return a row per session from the clear columns, without decoding snapshots."""
        return await self._run(self._list_sync)

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after``, in id order."""
        if after is not None:
            validate_session_id(after)
        return await self._run(self._list_sync, after or "", limit)

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Like ``list_page``, for the unfinished sessions only (their clear status)."""
        if after is not None:
            validate_session_id(after)
        return await self._run(self._list_sync, after or "", limit, True)

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Take the session's lease if it is free or its holder's lease ran out."""
        validate_session_id(session_id)
        return await self._run(self._acquire_sync, session_id, owner, float(ttl))

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Extend a lease; ``LeaseLostError`` if another runner took the session."""
        validate_session_id(lease.session_id)
        await self._run(self._renew_sync, lease, float(ttl))

    async def release(self, lease: Lease) -> None:
        """Give a lease back if it is still this one; otherwise do nothing."""
        validate_session_id(lease.session_id)
        await self._run(self._release_sync, lease)

    async def close(self) -> None:
        """Release this store's leases, close the connection and its thread. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        self._running += 1  # no inline commit while the connections close
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            self._running -= 1
            executor.shutdown(wait=False)

    async def migrate(self) -> int:
        """Create or upgrade the schema now rather than on first use; return its version."""
        return await self._run(self._migrate_sync)

    # -- security: shredding, verification, rekeying ----------------------------

    async def shred(self, session_id: str) -> bool:
        """Destroy the session's data key with its rows; return whether it existed.

        One transaction deletes the key row and the session's records; with
        ``secure_delete`` the freed pages are zeroed, and a ``wal_checkpoint
        (TRUNCATE)`` then removes the old pages from the write-ahead log too. A
        copy of the records made without the key row can never be decrypted.

        Raises:
            StorageError: the session is stored in clear: there is no key to destroy.
        """
        return await self._run(self._shred_sync, validate_session_id(session_id))

    async def check(self, session_id: str) -> codec.SessionCheck:
        """Decode every live record of the session (checksums, tags); change nothing."""
        return await self._run(self._check_sync, validate_session_id(session_id))

    async def quarantine(self, session_id: str) -> str:
        """Move a corrupt session's records (and key) to ``stepvault_quarantine``.

        Raises:
            StorageError: the session is not corrupt (an undecryptable one is never moved).
        """
        return await self._run(self._quarantine_sync, validate_session_id(session_id))

    async def rekey(self, session_id: str) -> RekeyOutcome:
        """Rewrite a session under a fresh data key wrapped by the active master key.

        One transaction: the session is rewritten whole (its steps folded into the
        snapshot, its posted events sealed again) with its new key row, or not at
        all. Returns ``"current"`` when there is nothing to do and ``"busy"`` while
        a runner's lease is live.

        Raises:
            EngineError: the store has no key; the session is unreadable (nothing
                is rewritten then).
        """
        return await self._run(self._rekey_sync, validate_session_id(session_id))

    async def _commit_inline(self, lease: Lease, checkpoint: Checkpoint, body: bytes) -> bool:
        """Commit on this thread if it is the store's only session; return whether it did."""
        session_id = lease.session_id
        if not (
            self.inline_commits
            and len(self._held) == 1
            and self._held.get(session_id) == lease
            and self._db is not None
        ):
            return False
        if self._inline is None:
            self._inline = await self._run(self._open_inline)
        if self._running:  # the store's thread is busy with this store: take turns
            return False
        try:
            folded = inline.try_write(
                self._inline, lambda db: self._commit_in(db, lease, checkpoint, body)
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"sqlite store {self.path}: {exc}") from exc
        if folded is inline.BUSY:
            return False
        if folded:
            await self._run(self._compact_quietly, session_id)
        await self._turns.maybe()
        return True

    def _open_inline(self) -> sqlite3.Connection:
        return inline.prepare(
            connect(
                self.path,
                synchronous="OFF" if self.durability == "none" else "FULL",
                secure_delete=self._encryption is not None,
                any_thread=True,
            )
        )

    # -- running on the store's thread ----------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="stepvault-sqlite")
        work = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        self._running += 1
        work.add_done_callback(self._finished)
        try:
            # A cancelled caller waits for the call (a lease it took is recorded, and
            # released on close).
            return await to_the_end(work)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"sqlite store {self.path}: {exc}") from exc

    def _finished(self, _: object) -> None:
        self._running -= 1

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = connect(
                self.path,
                synchronous="OFF" if self.durability == "none" else "FULL",
                secure_delete=self._encryption is not None,  # deleted keys are zeroed
            )
        if self._encryption is not None and not self._encryption.prepared:
            with write(self._db):  # a passphrase needs the store's salt (made once)
                self._encryption.prepare(self._vault)
        return self._db

    def _open_db(self) -> sqlite3.Connection:
        """Return the open connection (for the key vault, used only inside ``_conn``'s users)."""
        if self._db is None:
            raise RuntimeError("the SQLite connection is not open")
        return self._db

    def _write_keys(self, session_id: str) -> SessionKeys | None:
        """Return the keys to seal a write without the lease with (None: in clear).

        Read from the key row inside the write transaction: another process may have
        rekeyed the session since its keys were cached here.
        """
        record = self._vault.get_key(session_id)
        return security.sealing_keys(self._encryption, session_id, record, cached=False)

    def _commit_keys(self, lease: Lease) -> SessionKeys | None:
        """Return the keys a lease holder seals its checkpoints with (None: in clear).

        The key row is the one read when this store took the lease: no write to a
        session's key row leaves a lease taken before it able to commit. Create and
        delete, shred and quarantine remove the session row with it; rekey refuses
        a live lease and clears the owner of one that ran out. So a checkpoint
        sealed with a stale key state is refused by the commit's own fence.
        """
        session_id = lease.session_id
        if self._held.get(session_id) == lease:
            record = self._lease_keys[session_id]
        else:  # a lease taken through another store object: read the row now
            record = self._vault.get_key(session_id)
        return security.sealing_keys(self._encryption, session_id, record, cached=True)

    def _migrate_sync(self) -> int:
        self._conn()  # opening migrates
        return SCHEMA_VERSION

    def _close_sync(self) -> None:
        for lease in list(self._held.values()) if self._db is not None else []:
            try:
                self._release_sync(lease)
            except (sqlite3.Error, EngineError) as exc:  # it runs out on its own
                _log.warning("lease.release_failed", session_id=lease.session_id, error=str(exc))
        self._held.clear()
        self._lease_keys.clear()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._inline is not None:  # no inline commit runs while this does (``_running``)
            self._inline.close()
            self._inline = None

    def _dropped(self, session_id: str) -> None:
        """Forget what this store held of a session just removed: its lease, its keys."""
        self._held.pop(session_id, None)
        self._lease_keys.pop(session_id, None)
        if self._encryption is not None:
            self._encryption.forget(session_id)

    def _create_sync(self, session: Session, body: bytes) -> None:
        db = self._conn()
        try:
            with write(db):
                if db.execute(
                    "SELECT 1 FROM stepvault_sessions WHERE id = ?", (session.id,)
                ).fetchone():
                    raise SessionExistsError(f"session {session.id} already exists")
                # The key row commits with the session's rows, so neither exists alone;
                # a key row left without a session (it cannot be its) is replaced.
                keys = None
                if self._encryption is None:
                    self._vault.delete_key(session.id)
                else:
                    record = self._encryption.new_session_record(session.id)
                    self._vault.put_key(session.id, record)
                    keys = self._encryption.open_session_keys(session.id, record)
                snapshot = codec.seal_frame(session.revision, _SESSION, body, keys)
                insert_session(db, session, snapshot)
        except sqlite3.IntegrityError:
            raise SessionExistsError(f"session {session.id} already exists") from None
        if keys is not None and self._encryption is not None:
            self._encryption.remember(keys)

    def _load_sync(self, session_id: str, *, posted: bool = True) -> Session | None:
        """Rebuild the session; with ``posted``, its posted events join its inbox."""
        return self._read_sync(session_id, posted=posted)[0]

    def _read_sync(self, session_id: str, *, posted: bool = True) -> tuple[Session | None, bool]:
        """Return the session (None if absent) and whether it is encrypted."""
        db = self._conn()
        db.execute("BEGIN")  # one read snapshot for the row, its steps, events and key
        try:
            found = fetch(db, session_id, posted=posted)
        finally:
            db.execute("COMMIT")
        if found is None:
            return None, False
        snapshot, revision, steps, events, key_record = found
        source = f"{self.path} session {session_id}"
        session = open_records(
            self._encryption,
            session_id,
            key_record,
            lambda keys: rebuild_session(
                source, session_id, snapshot, revision, steps, events, keys
            ),
        )
        return session, key_record is not None

    def _commit_sync(self, lease: Lease, checkpoint: Checkpoint, body: bytes) -> None:
        db = self._conn()
        with write(db):
            folded = self._commit_in(db, lease, checkpoint, body)
        if folded:
            self._compact_quietly(lease.session_id)

    def _commit_in(
        self, db: sqlite3.Connection, lease: Lease, checkpoint: Checkpoint, body: bytes
    ) -> bool:
        """Write one checkpoint in the caller's transaction; return whether to compact.

        Raises:
            LeaseLostError, SessionNotFoundError, StorageError: ``refuse_commit``.
        """
        record = codec.seal_frame(checkpoint.revision, _CHECKPOINT, body, self._commit_keys(lease))
        snapshot_bytes, steps_bytes = append_step(db, lease, checkpoint, record)
        return steps_bytes > max(self.compact_bytes, snapshot_bytes)

    def _drain_sync(self) -> None:
        """Write the queued checkpoints in one transaction, then compact where due."""
        folded = self._group.drain(
            self._conn,
            lambda db, queued: self._commit_in(db, queued.lease, queued.checkpoint, queued.body),
        )
        for session_id in folded:
            self._compact_quietly(session_id)

    def _post_sync(self, session_id: str, event: Event) -> int:
        db = self._conn()
        with write(db):
            return add_event(
                db,
                session_id,
                event.id,
                lambda seq: encode_event(session_id, seq, event, self._write_keys(session_id)),
            )

    def _compact_quietly(self, session_id: str) -> None:
        """Fold the steps into the snapshot; a failure here loses nothing committed."""
        try:
            # Posted events stay apart until a checkpoint absorbs them.
            session = self._load_sync(session_id, posted=False)
            if session is None:
                return
            body = codec.dump_json(session, f"session {session_id}")
            db = self._conn()
            with write(db):
                # The key row is read again: the fold below is fenced by revision only.
                record = self._vault.get_key(session_id)
                keys = security.sealing_keys(self._encryption, session_id, record, cached=True)
                snapshot = codec.seal_frame(session.revision, _SESSION, body, keys)
                fold_steps(db, session_id, session.revision, snapshot)
        except (sqlite3.Error, OSError, EngineError) as exc:
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _save_sync(self, saved: Session, body: bytes) -> None:
        db = self._conn()
        with write(db):
            row = db.execute(
                "SELECT revision, owner IS NOT NULL AND lease_expires > ?"
                " FROM stepvault_sessions WHERE id = ?",
                (time.time(), saved.id),
            ).fetchone()
            if row is None:
                raise SessionNotFoundError(f"session {saved.id} not found")
            if row[1]:
                raise SessionBusyError(f"session {saved.id} is being run by a runner")
            check_fresh(saved.id, saved.revision - 1, row[0])
            keys = self._write_keys(saved.id)
            snapshot = codec.seal_frame(saved.revision, _SESSION, body, keys)
            replace_session(db, saved, snapshot)

    def _delete_sync(self, session_id: str) -> bool:
        db = self._conn()
        with write(db):
            existed = delete_rows(db, session_id)
            self._vault.delete_key(session_id)  # a removed session leaves no key behind
        self._dropped(session_id)
        return existed

    def _shred_sync(self, session_id: str) -> bool:
        destroyed = security.shred(self._conn(), self._vault, session_id)
        self._dropped(session_id)
        return destroyed

    def _check_sync(self, session_id: str) -> codec.SessionCheck:
        return check_session(session_id, lambda: self._read_sync(session_id))

    def _quarantine_sync(self, session_id: str) -> str:
        check = self._check_sync(session_id)
        if check.verdict != "corrupt":
            not_corrupt(check)
        moved_at = security.quarantine(self._conn(), self._vault, session_id)
        self._dropped(session_id)
        return (
            f"{self.path}: table stepvault_quarantine, session_id {session_id}, moved_at {moved_at}"
        )

    def _rekey_sync(self, session_id: str) -> RekeyOutcome:
        if self._encryption is None:
            raise EngineError("rekey needs an encryption key: set SESSION_ENCRYPTION_KEY")
        return security.rekey(self._conn(), self._vault, self._encryption, session_id, self.path)

    def _list_sync(
        self, after: str = "", limit: int = -1, unfinished: bool = False
    ) -> builtins.list[SessionInfo]:
        query = _LIST_UNFINISHED if unfinished else _LIST
        rows = self._conn().execute(query, (after, limit))
        return [SessionInfo.model_validate(dict(zip(_INFO, row, strict=True))) for row in rows]

    def _acquire_sync(self, session_id: str, owner: str, ttl: float) -> Lease | None:
        db = self._conn()
        with write(db):
            taken = take_lease(db, session_id, owner, ttl)
            if taken is None:
                return None
            epoch, takeovers = taken
            # Read with the epoch: the key state every commit under this lease keeps.
            key_record = self._vault.get_key(session_id)
        lease = self._held[session_id] = Lease(session_id, owner, epoch, takeovers)
        self._lease_keys[session_id] = key_record
        if self._encryption is not None:
            self._encryption.forget(session_id)  # another process may have rekeyed it
        return lease

    def _renew_sync(self, lease: Lease, ttl: float) -> None:
        db = self._conn()
        with write(db):
            renewed = renew_lease(db, lease, ttl)
        if not renewed:
            raise LeaseLostError(f"session {lease.session_id}: lease lost to another runner")

    def _release_sync(self, lease: Lease) -> None:
        db = self._conn()
        with write(db):
            release_lease(db, lease)
        if self._held.get(lease.session_id) == lease:
            del self._held[lease.session_id]
            self._lease_keys.pop(lease.session_id, None)


_INFO = ("id", "status", "workflow", "created_at", "last_activity", "expires_at", "steps_done")
