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
from ..errors import (
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
from .sql import COMPACT_MIN_BYTES, encode_event, rebuild_session, refuse_commit

SCHEMA_VERSION = 2
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
}


class SQLiteStore:
    """Store sessions in one SQLite database file (WAL mode).

    Args:
        path: the database file (created 0600 on first use, with its folder).
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
        durability: Durability = "fsync",
        compact_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.path = Path(path)
        self.durability = check_durability(durability)
        self.compact_bytes = compact_bytes
        self._executor: ThreadPoolExecutor | None = None
        # Touched only on the store's thread, like the connection.
        self._db: sqlite3.Connection | None = None
        self._held: dict[str, Lease] = {}

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, durability={self.durability!r})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Insert a new session row with its snapshot."""
        validate_session_id(session.id)
        snapshot = codec.encode_model(session.revision, session, f"session {session.id}")
        await self._run(self._create_sync, session, snapshot)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot, later steps and posted events."""
        return await self._run(self._load_sync, validate_session_id(session_id))

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` while a runner's lease is live."""
        validate_session_id(session.id)
        saved = session.model_copy(update={"revision": session.revision + 1})
        snapshot = codec.encode_model(saved.revision, saved, f"session {saved.id}")
        await self._run(self._save_sync, saved, snapshot)
        session.revision = saved.revision  # only once the new revision is stored

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Insert one step row and update the session row, fenced by the lease."""
        session_id = validate_session_id(lease.session_id)
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        record = codec.encode_model(checkpoint.revision, checkpoint, what)
        await self._run(self._commit_sync, lease, checkpoint, record)

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
                _migrate(db, self.path)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

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

    def _create_sync(self, session: Session, snapshot: bytes) -> None:
        db = self._conn()
        try:
            with _write(db):
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

    def _load_sync(self, session_id: str, *, posted: bool = True) -> Session | None:
        """Rebuild the session; with ``posted``, its posted events join its inbox."""
        db = self._conn()
        db.execute("BEGIN")  # one read snapshot for the row, its steps and its events
        try:
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
        finally:
            db.execute("COMMIT")
        source = f"{self.path} session {session_id}"
        return rebuild_session(source, session_id, row[0], row[1], steps, events)

    def _commit_sync(self, lease: Lease, checkpoint: Checkpoint, record: bytes) -> None:
        db = self._conn()
        with _write(db):
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
            db.execute(
                "INSERT INTO stepvault_events (session_id, seq, event_id, record)"
                " VALUES (?, ?, ?, ?)",
                (session_id, seq, event.id, encode_event(session_id, seq, event)),
            )
        return seq

    def _compact_quietly(self, session_id: str) -> None:
        """Fold the steps into the snapshot; a failure here loses nothing committed."""
        try:
            # Posted events stay apart until a checkpoint absorbs them.
            session = self._load_sync(session_id, posted=False)
            if session is None:
                return
            snapshot = codec.encode_model(session.revision, session, f"session {session_id}")
            db = self._conn()
            with _write(db):
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

    def _save_sync(self, saved: Session, snapshot: bytes) -> None:
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
            db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM stepvault_snapshots WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM stepvault_events WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM stepvault_inboxes WHERE session_id = ?", (session_id,))
            existed = db.execute(
                "DELETE FROM stepvault_sessions WHERE id = ?", (session_id,)
            ).rowcount
        self._held.pop(session_id, None)
        return existed > 0

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
