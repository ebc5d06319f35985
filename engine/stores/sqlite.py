"""SQLiteStore: an embedded database file, safe for several processes on one machine.

Schema: ``stepvault_sessions`` holds one row per session: the clear fields that
listings and expiry need and the lease (owner, expiry, epoch, takeovers).
``stepvault_snapshots`` holds a framed snapshot of the whole session at the
session row's ``snapshot_revision``, and ``stepvault_steps`` is append-only: one
framed checkpoint per row. A checkpoint inserts one step row and updates one
session row in one transaction, fenced by the lease's owner and epoch, so its
cost does not grow with the session's history; once the steps outgrow the
snapshot they are folded into it. The snapshot has a table of its own because
SQLite rewrites a whole row when any column changes: kept in the session row, it
would be copied by every checkpoint. Records are the same checksummed frames the
file store writes (``codec.encode_model``).

Events are taken without the lease (``engine.events.EventInbox``):
``stepvault_events`` holds each posted event as a framed record numbered per
session, and ``stepvault_inboxes`` the last number each session handed out. A
checkpoint that absorbs events up to number n deletes them in its transaction.

The database runs in WAL mode (readers never wait for the writer) with
``synchronous=FULL`` for durability ``"fsync"``; every write transaction is
``BEGIN IMMEDIATE`` under a busy timeout, so processes queue for the write lock
instead of failing with "database is locked". All sqlite3 calls of a store run on
one thread of its own: the event loop never waits on the database.

With an encryption key every record (snapshot, step, event) is sealed under its
session's data key, wrapped in ``stepvault_session_keys`` (see docs/security.md);
the connection then runs with ``secure_delete`` on, so deleted rows are zeroed.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .. import codec
from ..crypto import SEAL_OVERHEAD, Encryption, KeyInput, RekeyOutcome, SessionKeys
from ..errors import (
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
from .base import (
    DEFAULT_LEASE_TTL,
    Durability,
    Lease,
    check_durability,
    check_fresh,
    validate_session_id,
)
from .sql import (
    COMPACT_MIN_BYTES,
    check_session,
    decode_events,
    encode_event,
    in_clear,
    missing_key,
    not_corrupt,
    open_records,
    rebuild_session,
    refuse_commit,
    rekeyed,
    sealed_record,
    unwrap,
)

SCHEMA_VERSION = 3
BUSY_TIMEOUT = 60.0
"""Seconds a write waits for another process's transaction before giving up."""
MIN_SQLITE = (3, 35, 0)
"""``RETURNING`` arrived in SQLite 3.35."""

_T = TypeVar("_T")
_log = get_logger()

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE stepvault_sessions (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            workflow TEXT,
            created_at TEXT NOT NULL,
            last_activity TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            steps_done INTEGER NOT NULL,
            revision INTEGER NOT NULL,
            snapshot_revision INTEGER NOT NULL,
            snapshot_bytes INTEGER NOT NULL,
            steps_bytes INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            lease_expires REAL,
            epoch INTEGER NOT NULL DEFAULT 0,
            takeovers INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE stepvault_snapshots (
            session_id TEXT PRIMARY KEY,
            record BLOB NOT NULL
        )""",
        """CREATE TABLE stepvault_steps (
            session_id TEXT NOT NULL,
            revision INTEGER NOT NULL,
            record BLOB NOT NULL,
            PRIMARY KEY (session_id, revision)
        )""",
        # Lease epochs come from one counter, so a session deleted and created again
        # never hands out an epoch a lease of its earlier life still carries.
        "CREATE TABLE stepvault_epoch (value INTEGER NOT NULL)",
        "INSERT INTO stepvault_epoch VALUES (0)",
    ),
    # Events posted without the lease. A session without an inbox row (created
    # before this version) gets one when its first event is posted.
    2: (
        """CREATE TABLE stepvault_inboxes (
            session_id TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL
        )""",
        """CREATE TABLE stepvault_events (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            event_id TEXT NOT NULL,
            record BLOB NOT NULL,
            PRIMARY KEY (session_id, seq),
            UNIQUE (session_id, event_id)
        )""",
    ),
    # Encryption at rest: each session's wrapped data key (and the passphrase salt,
    # under crypto.SALT_NAME), and the records of sessions moved aside as corrupt.
    3: (
        """CREATE TABLE stepvault_session_keys (
            name TEXT PRIMARY KEY,
            record BLOB NOT NULL
        )""",
        """CREATE TABLE stepvault_quarantine (
            session_id TEXT NOT NULL,
            moved_at TEXT NOT NULL,
            kind TEXT NOT NULL,
            seq INTEGER NOT NULL,
            record BLOB NOT NULL
        )""",
    ),
}
_SESSION = Session.__name__  # record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__


class SQLiteStore:
    """Store sessions in one SQLite database file (WAL mode).

    Args:
        path: the database file (created 0600 on first use, with its folder).
        encryption_key: encrypt every record (AES-256-GCM) as ``FileStore`` does:
            32 bytes, a base64 string of 32 bytes, a passphrase, or a
            ``crypto.KeyRing`` holding old keys too. None stores records in clear.
        durability: ``"fsync"`` (``synchronous=FULL``: every commit is durable when
            it returns) or ``"none"`` (``synchronous=OFF``, for tests).
        compact_bytes: step bytes below which no compaction happens.

    A lease lasts the ``ttl`` its runner asks for unless the runner's heartbeat
    renews it; a runner that dies is taken over once its lease has run out.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        encryption_key: KeyInput | None = None,
        durability: Durability = "fsync",
        compact_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.path = Path(path)
        self.durability = check_durability(durability)
        self.compact_bytes = compact_bytes
        self._encryption = Encryption.of(encryption_key)
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the store's thread, like the connection.
        self._db: sqlite3.Connection | None = None
        self._vault = _KeyRows(self._open_db)
        self._held: dict[str, Lease] = {}

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"SQLiteStore({str(self.path)!r}, durability={self.durability!r}{encrypted})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Insert a new session row with its snapshot (and its data key, when encrypted)."""
        validate_session_id(session.id)
        body = codec.dump_json(session, f"session {session.id}")
        # Before touching the database: bad data creates nothing, not even a data key.
        overhead = SEAL_OVERHEAD if self._encryption is not None else 0
        codec.check_record_size(session.revision, len(body) + overhead)
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
        """Insert one step row and update the session row, fenced by the lease."""
        session_id = validate_session_id(lease.session_id)
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        body = codec.dump_json(checkpoint, what)
        await self._run(self._commit_sync, lease, checkpoint, body)

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
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
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

    # -- running on the store's thread ----------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="stepvault-sqlite")
        work = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be stopped mid-call: let it finish (its lease, if it
            # took one, is recorded and released on close) before the caller goes on.
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # seen here: the caller gets the cancellation
            raise
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"sqlite store {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if sqlite3.sqlite_version_info < MIN_SQLITE:
                raise StorageError(
                    f"SQLiteStore needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; "
                    f"this Python has {sqlite3.sqlite_version}"
                )
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_file(self.path)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StorageError(f"{self.path}: cannot use WAL mode (got {mode!r})")
                sync = "FULL" if self.durability == "fsync" else "OFF"
                db.execute(f"PRAGMA synchronous = {sync}")
                if self._encryption is not None:
                    db.execute("PRAGMA secure_delete = ON")  # deleted keys are zeroed
                _migrate(db, self.path)
            except BaseException:
                db.close()
                raise
            self._db = db
        if self._encryption is not None and not self._encryption.prepared:
            with _write(self._db):  # a passphrase needs the store's salt (made once)
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

        Raises:
            DecryptionError: the session is encrypted and this store has no key.
        """
        record = self._vault.get_key(session_id)
        if self._encryption is None:
            if record is not None:
                raise missing_key(session_id, DecryptionError(""), record, None)
            return None
        return unwrap(self._encryption, session_id, record)

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
        if self._db is not None:
            self._db.close()
            self._db = None

    def _create_sync(self, session: Session, body: bytes) -> None:
        db = self._conn()
        try:
            with _write(db):
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
                db.execute(
                    "INSERT INTO stepvault_sessions (id, status, workflow, created_at,"
                    " last_activity, expires_at, steps_done, revision, snapshot_revision,"
                    " snapshot_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session.id,
                        session.status,
                        session.workflow,
                        session.created_at.isoformat(),
                        session.last_activity.isoformat(),
                        session.expires_at.isoformat(),
                        session.cursor,
                        session.revision,
                        session.revision,
                        len(snapshot),
                    ),
                )
                _put_snapshot(db, session.id, snapshot)
                # A stepvault older than the inbox may have deleted an earlier session
                # under this id and left its events behind: they are not this one's.
                db.execute("DELETE FROM stepvault_events WHERE session_id = ?", (session.id,))
                db.execute(
                    "INSERT OR REPLACE INTO stepvault_inboxes (session_id, last_seq) VALUES (?, ?)",
                    (session.id, session.inbox_seq),
                )
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
            found = self._fetch(db, session_id, posted=posted)
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

    def _fetch(
        self, db: sqlite3.Connection, session_id: str, *, posted: bool
    ) -> (
        tuple[
            bytes,
            int,
            builtins.list[tuple[int, bytes]],
            builtins.list[tuple[int, bytes]],
            bytes | None,
        ]
        | None
    ):
        """Read a session's records and key row (the caller holds a transaction)."""
        row = db.execute(
            "SELECT record, snapshot_revision FROM stepvault_sessions"
            " JOIN stepvault_snapshots ON session_id = id WHERE id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        steps = db.execute(
            "SELECT revision, record FROM stepvault_steps"
            " WHERE session_id = ? AND revision > ? ORDER BY revision",
            (session_id, row[1]),
        ).fetchall()
        events = (
            db.execute(
                "SELECT seq, record FROM stepvault_events WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
            if posted
            else []
        )
        return row[0], row[1], steps, events, self._vault.get_key(session_id)

    def _commit_keys(self, session_id: str) -> SessionKeys | None:
        """Return the keys a lease holder seals its checkpoints with (cached: see acquire).

        Raises:
            DecryptionError: the session is encrypted and this store has no key.
        """
        if self._encryption is None:
            return self._write_keys(session_id)  # a clear record must never join sealed ones
        return self._encryption.keys_for(self._vault, session_id)

    def _commit_sync(self, lease: Lease, checkpoint: Checkpoint, body: bytes) -> None:
        db = self._conn()
        with _write(db):
            keys = self._commit_keys(lease.session_id)
            record = codec.seal_frame(checkpoint.revision, _CHECKPOINT, body, keys)
            row = db.execute(
                "UPDATE stepvault_sessions SET status = ?, last_activity = ?, expires_at = ?,"
                " steps_done = steps_done + ?, revision = ?, steps_bytes = steps_bytes + ?"
                " WHERE id = ? AND owner = ? AND epoch = ? AND revision = ?"
                " RETURNING snapshot_bytes, steps_bytes",
                (
                    checkpoint.status,
                    checkpoint.last_activity.isoformat(),
                    checkpoint.expires_at.isoformat(),
                    int(checkpoint.step is not None),
                    checkpoint.revision,
                    len(record),
                    lease.session_id,
                    lease.owner,
                    lease.token,
                    checkpoint.revision - 1,
                ),
            ).fetchone()
            if row is None:
                found = db.execute(
                    "SELECT owner, epoch, revision FROM stepvault_sessions WHERE id = ?",
                    (lease.session_id,),
                ).fetchone()
                refuse_commit(lease, checkpoint, found)
            db.execute(
                "INSERT INTO stepvault_steps (session_id, revision, record) VALUES (?, ?, ?)",
                (lease.session_id, checkpoint.revision, record),
            )
            if checkpoint.inbox_seq is not None:  # the session holds these events now
                _forget_posted(db, lease.session_id, checkpoint.inbox_seq)
        snapshot_bytes, steps_bytes = row
        if steps_bytes > max(self.compact_bytes, snapshot_bytes):
            self._compact_quietly(lease.session_id)

    def _post_sync(self, session_id: str, event: Event) -> int:
        db = self._conn()
        with _write(db):
            known = db.execute(
                "SELECT seq FROM stepvault_events WHERE session_id = ? AND event_id = ?",
                (session_id, event.id),
            ).fetchone()
            if known is not None:
                seq: int = known[0]
                return seq
            # The counter is bumped and the event inserted in one transaction: a
            # number is never handed out twice, nor seen before the ones below it.
            bumped = db.execute(
                "INSERT INTO stepvault_inboxes (session_id, last_seq)"
                " SELECT id, 1 FROM stepvault_sessions WHERE id = ?"
                " ON CONFLICT (session_id) DO UPDATE SET last_seq = last_seq + 1"
                " RETURNING last_seq",
                (session_id,),
            ).fetchone()
            if bumped is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            seq = bumped[0]
            record = encode_event(session_id, seq, event, self._write_keys(session_id))
            db.execute(
                "INSERT INTO stepvault_events (session_id, seq, event_id, record)"
                " VALUES (?, ?, ?, ?)",
                (session_id, seq, event.id, record),
            )
        return seq

    def _compact_quietly(self, session_id: str) -> None:
        """Fold the steps into the snapshot; a failure here loses nothing committed."""
        try:
            # Posted events stay apart until a checkpoint absorbs them.
            session = self._load_sync(session_id, posted=False)
            if session is None:
                return
            body = codec.dump_json(session, f"session {session_id}")
            db = self._conn()
            with _write(db):
                keys = self._commit_keys(session_id)
                snapshot = codec.seal_frame(session.revision, _SESSION, body, keys)
                folded = db.execute(
                    "UPDATE stepvault_sessions SET snapshot_revision = ?, snapshot_bytes = ?,"
                    " steps_bytes = 0 WHERE id = ? AND revision = ?",
                    (session.revision, len(snapshot), session_id, session.revision),
                ).rowcount
                if folded:
                    _put_snapshot(db, session_id, snapshot)
                    db.execute(
                        "DELETE FROM stepvault_steps WHERE session_id = ? AND revision <= ?",
                        (session_id, session.revision),
                    )
        except (sqlite3.Error, OSError, EngineError) as exc:
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    def _save_sync(self, saved: Session, body: bytes) -> None:
        db = self._conn()
        with _write(db):
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
            # A lease that ran out is void from here on: its holder must not commit
            # on top of the replaced session, so the owner is cleared.
            db.execute(
                "UPDATE stepvault_sessions SET status = ?, workflow = ?, last_activity = ?,"
                " expires_at = ?, steps_done = ?, revision = ?,"
                " snapshot_revision = ?, snapshot_bytes = ?, steps_bytes = 0, owner = NULL,"
                " lease_expires = NULL WHERE id = ?",
                (
                    saved.status,
                    saved.workflow,
                    saved.last_activity.isoformat(),
                    saved.expires_at.isoformat(),
                    saved.cursor,
                    saved.revision,
                    saved.revision,
                    len(snapshot),
                    saved.id,
                ),
            )
            db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (saved.id,))
            _put_snapshot(db, saved.id, snapshot)
            _forget_posted(db, saved.id, saved.inbox_seq)

    def _delete_sync(self, session_id: str) -> bool:
        db = self._conn()
        with _write(db):
            existed = _delete_rows(db, session_id)
            self._vault.delete_key(session_id)  # a removed session leaves no key behind
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        return existed

    def _forget_keys(self, session_id: str) -> None:
        if self._encryption is not None:
            self._encryption.forget(session_id)

    def _shred_sync(self, session_id: str) -> bool:
        db = self._conn()
        with _write(db):
            destroyed = self._vault.delete_key(session_id)
            snapshot = db.execute(
                "SELECT record FROM stepvault_snapshots WHERE session_id = ?", (session_id,)
            ).fetchone()
            if not destroyed and snapshot is not None and not sealed_record(snapshot[0]):
                in_clear(session_id)  # raises: the transaction rolls back, nothing removed
            existed = _delete_rows(db, session_id)
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        self._truncate_log(session_id)  # the key's old page may still sit in the log
        return destroyed or existed

    def _check_sync(self, session_id: str) -> codec.SessionCheck:
        return check_session(session_id, lambda: self._read_sync(session_id))

    def _quarantine_sync(self, session_id: str) -> str:
        check = self._check_sync(session_id)
        if check.verdict != "corrupt":
            not_corrupt(check)
        moved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        db = self._conn()
        with _write(db):
            # The key goes with the records: they stay readable for repair.
            for kind, query in _QUARANTINED:
                db.execute(
                    "INSERT INTO stepvault_quarantine (session_id, moved_at, kind, seq, record) "
                    + query,
                    (session_id, moved_at, kind, session_id),
                )
            _delete_rows(db, session_id)
            self._vault.delete_key(session_id)
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        return (
            f"{self.path}: table stepvault_quarantine, session_id {session_id}, moved_at {moved_at}"
        )

    def _rekey_sync(self, session_id: str) -> RekeyOutcome:
        encryption = self._encryption
        if encryption is None:
            raise EngineError("rekey needs an encryption key: set SESSION_ENCRYPTION_KEY")
        db = self._conn()
        with _write(db):
            row = db.execute(
                "SELECT owner IS NOT NULL AND lease_expires > ? FROM stepvault_sessions"
                " WHERE id = ?",
                (time.time(), session_id),
            ).fetchone()
            if row is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            if row[0]:
                return "busy"
            found = self._fetch(db, session_id, posted=True)
            assert found is not None  # the row is there, in this transaction
            snapshot, revision, steps, events, key_record = found
            if key_record is not None and encryption.is_current(session_id, key_record):
                return "current"
            source = f"{self.path} session {session_id}"
            session, posted = open_records(  # unreadable: raise, rewrite nothing
                encryption,
                session_id,
                key_record,
                lambda keys: (
                    rebuild_session(source, session_id, snapshot, revision, steps, (), keys),
                    decode_events(source, events, keys),
                ),
            )
            new = rekeyed(encryption, session, posted)
            # As a save: steps folded, and a lease that ran out is void (its holder's
            # cached key is gone).
            db.execute(
                "UPDATE stepvault_sessions SET revision = ?, snapshot_revision = ?,"
                " snapshot_bytes = ?, steps_bytes = 0, owner = NULL, lease_expires = NULL"
                " WHERE id = ?",
                (new.session.revision, new.session.revision, len(new.snapshot), session_id),
            )
            db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (session_id,))
            _put_snapshot(db, session_id, new.snapshot)
            db.executemany(
                "UPDATE stepvault_events SET record = ? WHERE session_id = ? AND seq = ?",
                [(record, session_id, seq) for seq, record in new.events],
            )
            self._vault.put_key(session_id, new.key_record)
        encryption.remember(new.keys)
        if key_record is None:  # it was in clear: its old pages must leave the log too
            self._truncate_log(session_id)
        return "rekeyed"

    def _truncate_log(self, session_id: str) -> None:
        """Copy the write-ahead log into the file (where deleted rows are zeroed), empty it."""
        busy, _, _ = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            _log.warning(
                "wal_checkpoint.busy",
                session_id=session_id,
                detail="a reader kept the log: the next checkpoint overwrites the old pages",
            )

    def _list_sync(self) -> builtins.list[SessionInfo]:
        rows = self._conn().execute(
            "SELECT id, status, workflow, created_at, last_activity, expires_at, steps_done"
            " FROM stepvault_sessions ORDER BY id"
        )
        return [SessionInfo.model_validate(dict(zip(_INFO, row, strict=True))) for row in rows]

    def _acquire_sync(self, session_id: str, owner: str, ttl: float) -> Lease | None:
        db = self._conn()
        with _write(db):
            row = db.execute(
                "SELECT owner, lease_expires, takeovers FROM stepvault_sessions WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                raise SessionNotFoundError(f"session {session_id} not found")
            holder, expires, takeovers = row
            now = time.time()
            if holder is not None and expires > now:
                return None
            # A holder whose lease ran out without a release died (or stalled) holding it.
            takeovers += holder is not None
            (epoch,) = db.execute(
                "UPDATE stepvault_epoch SET value = value + 1 RETURNING value"
            ).fetchone()
            db.execute(
                "UPDATE stepvault_sessions SET owner = ?, lease_expires = ?, epoch = ?,"
                " takeovers = ? WHERE id = ?",
                (owner, now + ttl, epoch, takeovers, session_id),
            )
        lease = self._held[session_id] = Lease(session_id, owner, epoch, takeovers)
        self._forget_keys(session_id)  # another process may have rekeyed it
        return lease

    def _renew_sync(self, lease: Lease, ttl: float) -> None:
        db = self._conn()
        with _write(db):
            renewed = db.execute(
                "UPDATE stepvault_sessions SET lease_expires = ?"
                " WHERE id = ? AND owner = ? AND epoch = ?",
                (time.time() + ttl, lease.session_id, lease.owner, lease.token),
            ).rowcount
        if not renewed:
            raise LeaseLostError(f"session {lease.session_id}: lease lost to another runner")

    def _release_sync(self, lease: Lease) -> None:
        db = self._conn()
        with _write(db):
            db.execute(
                "UPDATE stepvault_sessions SET owner = NULL, lease_expires = NULL,"
                " takeovers = 0 WHERE id = ? AND owner = ? AND epoch = ?",
                (lease.session_id, lease.owner, lease.token),
            )
        if self._held.get(lease.session_id) == lease:
            del self._held[lease.session_id]


_INFO = ("id", "status", "workflow", "created_at", "last_activity", "expires_at", "steps_done")

_QUARANTINED = (
    (
        "snapshot",
        "SELECT ?, ?, ?, snapshot_revision, record FROM stepvault_sessions"
        " JOIN stepvault_snapshots ON session_id = id WHERE id = ?",
    ),
    ("step", "SELECT ?, ?, ?, revision, record FROM stepvault_steps WHERE session_id = ?"),
    ("event", "SELECT ?, ?, ?, seq, record FROM stepvault_events WHERE session_id = ?"),
    ("key", "SELECT ?, ?, ?, 0, record FROM stepvault_session_keys WHERE name = ?"),
)
"""What ``quarantine`` copies aside: every record of the session, and its key row."""


class _KeyRows:
    """A ``crypto.KeyVault`` on the ``stepvault_session_keys`` table.

    Runs on the store's thread, inside the caller's transaction when there is one;
    a row is durable once that transaction commits (``synchronous=FULL``).
    """

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection

    def get_key(self, name: str) -> bytes | None:
        """Return the record stored under ``name``, or None."""
        row = (
            self._connection()
            .execute("SELECT record FROM stepvault_session_keys WHERE name = ?", (name,))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def add_key(self, name: str, record: bytes) -> bytes:
        """Store ``record`` unless ``name`` exists; return what is stored."""
        self._connection().execute(
            "INSERT OR IGNORE INTO stepvault_session_keys (name, record) VALUES (?, ?)",
            (name, record),
        )
        stored = self.get_key(name)
        assert stored is not None  # inserted, or there already, in this transaction
        return stored

    def put_key(self, name: str, record: bytes) -> None:
        """Store ``record`` under ``name``, replacing any record there."""
        self._connection().execute(
            "INSERT OR REPLACE INTO stepvault_session_keys (name, record) VALUES (?, ?)",
            (name, record),
        )

    def delete_key(self, name: str) -> bool:
        """Delete the row (zeroed on disk: ``secure_delete``); return whether it existed."""
        deleted: int = (
            self._connection()
            .execute("DELETE FROM stepvault_session_keys WHERE name = ?", (name,))
            .rowcount
        )
        return deleted > 0


_CREATING = threading.Lock()
"""Taken around creating a database file, so no connection of this process has it open."""


def _create_file(path: Path) -> None:
    """Create the database file 0600 (sqlite would use the umask), never via a symlink.

    Only a file that does not exist yet is opened outside SQLite: closing any
    descriptor of a file drops every POSIX lock this process holds on it, the locks
    of this process's other SQLite connections to it included, and a connection
    that silently lost its locks lets other processes checkpoint and remove the
    write-ahead log under it (commits then vanish). See "How To Corrupt An SQLite
    Database File", section 2.2.

    Raises:
        StorageError: ``path`` is a symbolic link or not a regular file.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with _CREATING:
        try:
            os.close(os.open(path, flags, 0o600))
            return
        except FileExistsError:
            pass
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise StorageError(f"{path}: not a regular file (a symbolic link?): refusing to open it")


def _delete_rows(db: sqlite3.Connection, session_id: str) -> bool:
    """Delete a session's rows (not its key); return whether it existed."""
    db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_snapshots WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_events WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_inboxes WHERE session_id = ?", (session_id,))
    existed: int = db.execute("DELETE FROM stepvault_sessions WHERE id = ?", (session_id,)).rowcount
    return existed > 0


def _forget_posted(db: sqlite3.Connection, session_id: str, absorbed: int) -> None:
    """Delete the posted events numbered ``absorbed`` or less: the session holds them."""
    db.execute(
        "DELETE FROM stepvault_events WHERE session_id = ? AND seq <= ?", (session_id, absorbed)
    )


def _put_snapshot(db: sqlite3.Connection, session_id: str, snapshot: bytes) -> None:
    db.execute(
        "INSERT OR REPLACE INTO stepvault_snapshots (session_id, record) VALUES (?, ?)",
        (session_id, snapshot),
    )


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """Run a block as one write transaction: BEGIN IMMEDIATE, COMMIT, ROLLBACK on error.

    IMMEDIATE takes the write lock up front (waiting under the busy timeout): a
    transaction that starts reading and upgrades later could fail with "database
    is locked" without waiting at all.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Create or upgrade the schema, in one transaction whichever process gets there first."""
    with _write(db):
        db.execute("CREATE TABLE IF NOT EXISTS stepvault_schema (version INTEGER NOT NULL)")
        current = db.execute("SELECT max(version) FROM stepvault_schema").fetchone()[0] or 0
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"{path}: schema version {current} is newer than this stepvault "
                f"understands ({SCHEMA_VERSION}): upgrade stepvault"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO stepvault_schema VALUES (?)", (version,))
