"""Group commit for the SQLite store (``durability="batch"``).

With ``synchronous=FULL`` every transaction ends in a sync of the write-ahead
log, and that sync is most of a checkpoint's cost. In batch mode a commit queues
its checkpoint and asks the store's thread to drain the queue: the first drain to
run takes everything queued so far and writes it in one transaction, so the
commits that arrive while one transaction runs share the next one's sync. No
commit waits for company: a lone one is written as soon as the thread is free.

Each checkpoint is written in a savepoint of its own: one refused by its fence
(lease lost, revision out of order) rolls back alone and its caller gets the
refusal, while the others commit. A transaction that fails to commit fails every
checkpoint in it. A commit returns only after the transaction holding its
checkpoint has committed, so "batch" promises what "fsync" does.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError
from ..models import Checkpoint
from .base import Lease


@dataclass(slots=True, eq=False)
class Queued:
    """A checkpoint waiting for the next group transaction, and what became of it."""

    lease: Lease
    checkpoint: Checkpoint
    body: bytes
    error: Exception | None = None
    done: bool = False


class GroupCommit:
    """The queue of checkpoints waiting for a transaction, and the transaction.

    ``put`` runs on the event loop, ``drain`` on the store's thread.
    ``batches`` counts the group transactions committed; ``queued`` the commits
    handed over and not yet decided.
    """

    def __init__(self, path: Path) -> None:
        self.batches = 0
        self.queued = 0
        self._path = path
        self._queue: list[Queued] = []
        self._lock = threading.Lock()

    def put(self, lease: Lease, checkpoint: Checkpoint, body: bytes) -> Queued:
        """Queue a checkpoint for the next drain."""
        queued = Queued(lease, checkpoint, body)
        with self._lock:
            self._queue.append(queued)
        self.queued += 1
        return queued

    def outcome(self, queued: Queued) -> None:
        """Raise what became of a drained checkpoint, if it did not commit.

        Raises:
            StorageError: the group's transaction failed, or the database did.
            LeaseLostError, SessionNotFoundError: its fence refused it.
        """
        assert queued.done  # the drain that ran the caller's turn, or an earlier one
        error = queued.error
        if isinstance(error, sqlite3.Error | OSError):
            raise StorageError(f"sqlite store {self._path}: {error}") from error
        if error is not None:
            raise error

    def drain(
        self,
        connect: Callable[[], sqlite3.Connection],
        write: Callable[[sqlite3.Connection, Queued], bool],
    ) -> list[str]:
        """Write every queued checkpoint in one transaction, each in a savepoint.

        ``write`` writes one checkpoint and returns whether its session is due a
        compaction. Returns those sessions' ids (for after the commit).
        """
        with self._lock:
            batch, self._queue = self._queue, []
        if not batch:
            return []
        try:
            return self._write_all(connect(), batch, write)
        except BaseException as exc:
            for queued in batch:
                if queued.error is None:
                    queued.error = self._failed(queued, exc, len(batch))
            if not isinstance(exc, Exception):
                raise
            return []
        finally:
            for queued in batch:
                queued.done = True

    def _write_all(
        self,
        db: sqlite3.Connection,
        batch: list[Queued],
        write: Callable[[sqlite3.Connection, Queued], bool],
    ) -> list[str]:
        """Run the group's transaction; a checkpoint refused keeps its error."""
        folded: list[str] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for queued in batch:
                db.execute("SAVEPOINT stepvault_commit")
                try:
                    if write(db, queued):
                        folded.append(queued.lease.session_id)
                except Exception as exc:  # its own caller gets it; the others go on
                    queued.error = exc
                    if not db.in_transaction:  # SQLite gave up the whole transaction
                        raise StorageError(f"the transaction was rolled back: {exc}") from exc
                    db.execute("ROLLBACK TO stepvault_commit")
                db.execute("RELEASE stepvault_commit")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.batches += 1
        return folded

    def _failed(self, queued: Queued, exc: BaseException, size: int) -> StorageError:
        """Return the error a checkpoint gets when its group's transaction did not commit."""
        error = StorageError(
            f"sqlite store {self._path}: checkpoint {queued.checkpoint.revision} of session "
            f"{queued.lease.session_id} not committed: its group of {size} failed: {exc}"
        )
        error.__cause__ = exc
        return error
