"""The SQLite store's tables: opening the file, migrating it, and the statements.

``stepvault_sessions`` holds one row per session: the clear fields that listings
and expiry need and the lease (owner, expiry, epoch, takeovers).
``stepvault_snapshots`` holds a framed snapshot of the whole session at the
session row's ``snapshot_revision``, and ``stepvault_steps`` is append-only: one
framed checkpoint per row. The snapshot has a table of its own because SQLite
rewrites a whole row when any column changes: kept in the session row, it would
be copied by every checkpoint. ``stepvault_events`` and ``stepvault_inboxes`` hold
posted events and each session's last event number, ``stepvault_session_keys``
the wrapped data keys, ``stepvault_quarantine`` the records of corrupt sessions.

The store (``engine.stores.sqlite``) decides what to write and seals the records;
the functions here hold the SQL, run inside the caller's transaction.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SessionNotFoundError, StorageError
from ..models import Checkpoint, Session
from .base import Lease
from .sql import check_complete, refuse_commit

SCHEMA_VERSION = 3
BUSY_TIMEOUT = 60.0
"""Seconds a write waits for another process's transaction before giving up."""
MIN_SQLITE = (3, 35, 0)
"""``RETURNING`` arrived in SQLite 3.35."""

Records = list[tuple[int, bytes]]
Fetched = tuple[bytes, int, Records, Records, bytes | None]
"""A session's snapshot, its revision, the steps after it, its posted events, its key row."""

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


def _switch_to_wal(db: sqlite3.Connection, path: Path) -> str:
    """Put the database in WAL mode; return the mode SQLite reports.

    Processes opening a new database together race to switch its journal mode,
    and SQLite answers the losers "database is locked" at once, without its busy
    handler: wait and try again, for as long as any other lock would wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.005
    while True:
        try:
            mode: str = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)  # on the store's thread, never the event loop's
            pause = min(pause * 2, 0.1)
            continue
        return mode


def connect(
    path: Path, *, synchronous: str, secure_delete: bool, any_thread: bool = False
) -> sqlite3.Connection:
    """Open (creating if need be) and migrate the database in WAL mode.

    Args:
        synchronous: ``FULL`` (a commit is durable when it returns) or ``OFF``.
        secure_delete: zero deleted rows on disk (an encrypted store's keys).
        any_thread: the connection may be used from another thread than this one
            (one thread at a time: the caller sees to it).

    Raises:
        StorageError: SQLite is too old, the file is not a regular file, WAL mode
            is refused, or the schema is newer than this stepvault.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StorageError(
            f"SQLiteStore needs SQLite {'.'.join(map(str, MIN_SQLITE))} or newer; "
            f"this Python has {sqlite3.sqlite_version}"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _create_file(path)
    db = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=not any_thread
    )
    try:
        mode = _switch_to_wal(db, path)
        if mode != "wal":
            raise StorageError(f"{path}: cannot use WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        if secure_delete:
            db.execute("PRAGMA secure_delete = ON")
        _migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


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


@contextmanager
def write(db: sqlite3.Connection) -> Iterator[None]:
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
    with write(db):
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


def fetch(db: sqlite3.Connection, session_id: str, *, posted: bool) -> Fetched | None:
    """Read a session's records and key row (the caller holds a transaction)."""
    row = db.execute(
        "SELECT record, snapshot_revision, revision FROM stepvault_sessions"
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
    check_complete(f"session {session_id}", row[1], steps, row[2])
    events = (
        db.execute(
            "SELECT seq, record FROM stepvault_events WHERE session_id = ? ORDER BY seq",
            (session_id,),
        ).fetchall()
        if posted
        else []
    )
    return row[0], row[1], steps, events, key_row(db, session_id)


def key_row(db: sqlite3.Connection, name: str) -> bytes | None:
    """Return the key record stored under ``name`` (a session id, or the salt's name)."""
    row = db.execute("SELECT record FROM stepvault_session_keys WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


def delete_rows(db: sqlite3.Connection, session_id: str) -> bool:
    """Delete a session's rows (not its key); return whether it existed."""
    db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_snapshots WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_events WHERE session_id = ?", (session_id,))
    db.execute("DELETE FROM stepvault_inboxes WHERE session_id = ?", (session_id,))
    existed: int = db.execute("DELETE FROM stepvault_sessions WHERE id = ?", (session_id,)).rowcount
    return existed > 0


def forget_posted(db: sqlite3.Connection, session_id: str, absorbed: int) -> None:
    """Delete the posted events numbered ``absorbed`` or less: the session holds them."""
    db.execute(
        "DELETE FROM stepvault_events WHERE session_id = ? AND seq <= ?", (session_id, absorbed)
    )


def put_snapshot(db: sqlite3.Connection, session_id: str, snapshot: bytes) -> None:
    """Store ``snapshot`` as the session's snapshot record, replacing the old one."""
    db.execute(
        "INSERT OR REPLACE INTO stepvault_snapshots (session_id, record) VALUES (?, ?)",
        (session_id, snapshot),
    )


def insert_session(db: sqlite3.Connection, session: Session, snapshot: bytes) -> None:
    """Insert a new session's row, snapshot and empty inbox.

    Raises:
        sqlite3.IntegrityError: the id is taken.
    """
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
    put_snapshot(db, session.id, snapshot)
    # A stepvault older than the inbox may have deleted an earlier session under
    # this id and left its events behind: they are not this one's.
    db.execute("DELETE FROM stepvault_events WHERE session_id = ?", (session.id,))
    db.execute(
        "INSERT OR REPLACE INTO stepvault_inboxes (session_id, last_seq) VALUES (?, ?)",
        (session.id, session.inbox_seq),
    )


def replace_session(db: sqlite3.Connection, saved: Session, snapshot: bytes) -> None:
    """Replace a session whole by ``snapshot`` (its steps dropped, its lease void)."""
    # A lease that ran out is void from here on: its holder must not commit on top
    # of the replaced session, so the owner is cleared.
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
    put_snapshot(db, saved.id, snapshot)
    forget_posted(db, saved.id, saved.inbox_seq)


def append_step(
    db: sqlite3.Connection, lease: Lease, checkpoint: Checkpoint, record: bytes
) -> tuple[int, int]:
    """Apply one checkpoint, fenced by the lease; return the snapshot's and steps' bytes.

    Raises:
        LeaseLostError, SessionNotFoundError, StorageError: ``sql.refuse_commit``.
    """
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
        forget_posted(db, lease.session_id, checkpoint.inbox_seq)
    # A taken event's id posted again meanwhile (a sender's retry) is the same event:
    # forget that copy, or it would be delivered a second time once this one is gone.
    if checkpoint.events_consumed:  # most checkpoints take none: no statement to run
        db.executemany(
            "DELETE FROM stepvault_events WHERE session_id = ? AND event_id = ?",
            [(lease.session_id, taken) for taken in checkpoint.events_consumed],
        )
    return row[0], row[1]


def fold_steps(db: sqlite3.Connection, session_id: str, revision: int, snapshot: bytes) -> None:
    """Make ``snapshot`` (the session at ``revision``) the snapshot, if still current."""
    folded = db.execute(
        "UPDATE stepvault_sessions SET snapshot_revision = ?, snapshot_bytes = ?,"
        " steps_bytes = 0 WHERE id = ? AND revision = ?",
        (revision, len(snapshot), session_id, revision),
    ).rowcount
    if folded:
        put_snapshot(db, session_id, snapshot)
        db.execute(
            "DELETE FROM stepvault_steps WHERE session_id = ? AND revision <= ?",
            (session_id, revision),
        )


def take_lease(
    db: sqlite3.Connection, session_id: str, owner: str, ttl: float
) -> tuple[int, int] | None:
    """Take the lease if free or run out; return its epoch and takeovers, or None.

    Raises:
        SessionNotFoundError: no such session.
    """
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
    (epoch,) = db.execute("UPDATE stepvault_epoch SET value = value + 1 RETURNING value").fetchone()
    db.execute(
        "UPDATE stepvault_sessions SET owner = ?, lease_expires = ?, epoch = ?,"
        " takeovers = ? WHERE id = ?",
        (owner, now + ttl, epoch, takeovers, session_id),
    )
    return epoch, takeovers


def renew_lease(db: sqlite3.Connection, lease: Lease, ttl: float) -> bool:
    """Extend the lease by ``ttl`` seconds from now; return whether it was still held."""
    renewed: int = db.execute(
        "UPDATE stepvault_sessions SET lease_expires = ? WHERE id = ? AND owner = ? AND epoch = ?",
        (time.time() + ttl, lease.session_id, lease.owner, lease.token),
    ).rowcount
    return renewed > 0


def release_lease(db: sqlite3.Connection, lease: Lease) -> None:
    """Clear the lease (and the takeover count) if it is still this one."""
    db.execute(
        "UPDATE stepvault_sessions SET owner = NULL, lease_expires = NULL,"
        " takeovers = 0 WHERE id = ? AND owner = ? AND epoch = ?",
        (lease.session_id, lease.owner, lease.token),
    )


def add_event(
    db: sqlite3.Connection, session_id: str, event_id: str, seal: Callable[[int], bytes]
) -> int:
    """Insert an event as number n, sealed by ``seal(n)``, unless its id is posted already.

    Returns its number (the earlier one for an id already in the inbox).

    Raises:
        SessionNotFoundError: no such session.
    """
    known = db.execute(
        "SELECT seq FROM stepvault_events WHERE session_id = ? AND event_id = ?",
        (session_id, event_id),
    ).fetchone()
    if known is not None:
        before: int = known[0]
        return before
    # The counter is bumped and the event inserted in one transaction: a number is
    # never handed out twice, nor seen before the ones below it.
    bumped = db.execute(
        "INSERT INTO stepvault_inboxes (session_id, last_seq)"
        " SELECT id, 1 FROM stepvault_sessions WHERE id = ?"
        " ON CONFLICT (session_id) DO UPDATE SET last_seq = last_seq + 1"
        " RETURNING last_seq",
        (session_id,),
    ).fetchone()
    if bumped is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    seq: int = bumped[0]
    db.execute(
        "INSERT INTO stepvault_events (session_id, seq, event_id, record) VALUES (?, ?, ?, ?)",
        (session_id, seq, event_id, seal(seq)),
    )
    return seq
