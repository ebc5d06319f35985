"""SQLite commits on the event loop's thread, while a store runs a single session.

A commit on the store's own thread costs two thread wake-ups, there and back;
on a virtual machine each can cost more than the commit itself. While a store
holds one lease and its thread is idle, the store runs the commit's transaction
on the caller's thread instead, over a second connection whose busy timeout is
zero: if another writer (another process, say) holds the database's write lock,
``try_write`` gives up at once and the store waits for the lock on its own
thread as usual. The loop never waits for another writer; it waits for the
commit's own sync, as the file store's inline commits do.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


class Busy:
    """``try_write``'s answer when another writer holds the write lock."""


BUSY = Busy()


def prepare(db: sqlite3.Connection) -> sqlite3.Connection:
    """Make ``db`` (opened for use from any thread) give up at once on a held write lock."""
    db.execute("PRAGMA busy_timeout = 0")
    return db


def try_write(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T | Busy:
    """Run ``work`` in one write transaction on ``db``; ``BUSY`` if the lock is held.

    Raises:
        sqlite3.Error: the transaction failed (nothing of it is committed).
    """
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
            return BUSY
        raise
    try:
        result = work(db)
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back
            db.execute("ROLLBACK")
        raise
    return result
