"""The SQLite store's keys and integrity operations: shred, quarantine, rekey.

``KeyRows`` is the ``crypto.KeyVault`` on ``stepvault_session_keys``, and
``sealing_keys`` picks the keys a write seals with. The other functions each run
one write transaction on the store's connection (on the store's thread); the
store keeps the bookkeeping (its leases, its cached keys).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from ..crypto import Encryption, RekeyOutcome, SessionKeys
from ..errors import DecryptionError, SessionNotFoundError
from ..log import get_logger
from .sql import (
    decode_events,
    in_clear,
    missing_key,
    open_records,
    rebuild_session,
    rekeyed,
    sealed_record,
    unwrap,
)
from .sqlite_schema import delete_rows, fetch, key_row, put_snapshot, write

_log = get_logger()


class KeyRows:
    """A ``crypto.KeyVault`` on the ``stepvault_session_keys`` table.

    Runs on the store's thread, inside the caller's transaction when there is one;
    a row is durable once that transaction commits (``synchronous=FULL``).
    """

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection

    def get_key(self, name: str) -> bytes | None:
        """Return the record stored under ``name``, or None."""
        return key_row(self._connection(), name)

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


def sealing_keys(
    encryption: Encryption | None, session_id: str, record: bytes | None, *, cached: bool
) -> SessionKeys | None:
    """Return the keys to seal a session's next record with, given its key row.

    None: the session is in clear, and its records stay so. With ``cached``,
    keys cached for the session are trusted to match ``record``.

    Raises:
        DecryptionError: the session is encrypted and this store has no key.
    """
    if encryption is None:
        if record is not None:  # a clear record must never join sealed ones
            raise missing_key(session_id, DecryptionError(""), record, None)
        return None
    if cached and record is not None:
        keys = encryption.cached(session_id)
        if keys is not None:
            return keys
    return unwrap(encryption, session_id, record)


def shred(db: sqlite3.Connection, vault: KeyRows, session_id: str) -> bool:
    """Delete the session's key row and records in one transaction, then empty the log.

    Returns whether there was anything to destroy.

    Raises:
        StorageError: the session is stored in clear (nothing is removed then).
    """
    with write(db):
        destroyed = vault.delete_key(session_id)
        snapshot = db.execute(
            "SELECT record FROM stepvault_snapshots WHERE session_id = ?", (session_id,)
        ).fetchone()
        if not destroyed and snapshot is not None and not sealed_record(snapshot[0]):
            in_clear(session_id)  # raises: the transaction rolls back, nothing removed
        existed = delete_rows(db, session_id)
    truncate_log(db, session_id)  # the key's old page may still sit in the log
    return destroyed or existed


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


def quarantine(db: sqlite3.Connection, vault: KeyRows, session_id: str) -> str:
    """Move every record of the session (and its key) to ``stepvault_quarantine``.

    The caller has checked that the session is corrupt. Returns the ``moved_at``
    the rows are filed under.
    """
    moved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with write(db):
        # The key goes with the records: they stay readable for repair.
        for kind, query in _QUARANTINED:
            db.execute(
                "INSERT INTO stepvault_quarantine (session_id, moved_at, kind, seq, record) "
                + query,
                (session_id, moved_at, kind, session_id),
            )
        delete_rows(db, session_id)
        vault.delete_key(session_id)
    return moved_at


def rekey(
    db: sqlite3.Connection, vault: KeyRows, encryption: Encryption, session_id: str, path: Path
) -> RekeyOutcome:
    """Rewrite a session under a fresh data key in one transaction, unless leased or current.

    Raises:
        SessionNotFoundError: no such session.
        EngineError: the session is unreadable (nothing is rewritten then).
    """
    with write(db):
        row = db.execute(
            "SELECT owner IS NOT NULL AND lease_expires > ? FROM stepvault_sessions WHERE id = ?",
            (time.time(), session_id),
        ).fetchone()
        if row is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if row[0]:
            return "busy"
        found = fetch(db, session_id, posted=True)
        assert found is not None  # the row is there, in this transaction
        snapshot, revision, steps, events, key_record = found
        if key_record is not None and encryption.is_current(session_id, key_record):
            return "current"
        source = f"{path} session {session_id}"
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
        # cached key is gone, and its next commit is fenced out).
        db.execute(
            "UPDATE stepvault_sessions SET revision = ?, snapshot_revision = ?,"
            " snapshot_bytes = ?, steps_bytes = 0, owner = NULL, lease_expires = NULL"
            " WHERE id = ?",
            (new.session.revision, new.session.revision, len(new.snapshot), session_id),
        )
        db.execute("DELETE FROM stepvault_steps WHERE session_id = ?", (session_id,))
        put_snapshot(db, session_id, new.snapshot)
        db.executemany(
            "UPDATE stepvault_events SET record = ? WHERE session_id = ? AND seq = ?",
            [(record, session_id, seq) for seq, record in new.events],
        )
        vault.put_key(session_id, new.key_record)
    encryption.remember(new.keys)
    if key_record is None:  # it was in clear: its old pages must leave the log too
        truncate_log(db, session_id)
    return "rekeyed"


def truncate_log(db: sqlite3.Connection, session_id: str) -> None:
    """Copy the write-ahead log into the file (where deleted rows are zeroed), empty it."""
    busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        _log.warning(
            "wal_checkpoint.busy",
            session_id=session_id,
            detail="a reader kept the log: the next checkpoint overwrites the old pages",
        )
