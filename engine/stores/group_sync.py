"""Group commit: one filesystem sync makes many sessions' writes durable at once.

Each session has its own journal, so their checkpoints cannot share one
``fdatasync``. ``syncfs`` (Linux) writes back every dirty file of one filesystem
and flushes the disk's cache once, whatever the number of files: the store writes
a checkpoint without syncing it, then waits here for a sync that *started after*
the write. While one sync runs, the writes that arrive meanwhile gather, and the
next sync covers them all (PostgreSQL's and InnoDB's group commit, on a whole
filesystem). A lone writer waits for one sync, as with ``fdatasync``; a thousand
concurrent writers share a handful.

The cost of the filesystem-wide sync is that it also writes back other programs'
dirty data on the same filesystem; docs/stores.md says when to prefer ``fsync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgumentError, StorageError

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


def _load_syncfs() -> Callable[[int], int] | None:
    """Return libc's ``syncfs``, or None where the platform has none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def syncfs(fd: int) -> None:
    """Write back and flush the whole filesystem holding ``fd``; raise OSError on failure.

    Linux reports a write-back error of any file on that filesystem (since 5.8)
    once per open file description: ``fd`` must stay open between calls.
    """
    if _SYNCFS is None:
        raise OSError("syncfs is not available on this platform")
    if _SYNCFS(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def check_available() -> None:
    """Refuse group commit where there is no ``syncfs`` to build it on."""
    if _SYNCFS is None:
        raise InvalidArgumentError(
            'durability="batch" needs Linux (syncfs); use durability="fsync" here'
        )


class GroupSync:
    """Make writes under ``path`` durable in groups: one ``syncfs`` per group.

    ``await wait()`` after a write returns once a sync that began after the call
    has succeeded; it raises ``StorageError`` if that sync failed (the caller must
    then treat its write as never made). One daemon thread does the syncing, so the
    event loop never blocks on the disk.

    A failed sync fails every later wait too, for good. Linux reports a write-back
    error once, to the first sync that sees it, and marks the failed pages clean:
    a later sync would succeed without ever writing them, acknowledging writes the
    disk lost. Like PostgreSQL after a failed fsync, the only safe answer is to
    stop: the store must be opened anew (after the disk is looked at), and what is
    on disk then is what a reader sees.
    """

    def __init__(self, path: Path) -> None:
        check_available()
        self.path = path
        self._waiting: list[_Waiter] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed: StorageError | None = None
        self._fd: int | None = None
        self.syncs = 0
        """How many syncs ran: with N concurrent writers, far fewer than N writes."""

    async def wait(self) -> None:
        """Return once everything written before this call is on disk."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._wake:
            if self._failed is not None:
                raise StorageError(str(self._failed))
            self._waiting.append((loop, future))
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="stepvault-group-sync", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        await future

    def close(self) -> None:
        """Stop the sync thread once the writes waiting are synced (a later wait restarts it)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def prepare(self) -> None:
        """Open the descriptor the syncs use; call it before the first write.

        Linux reports a write-back error to the descriptors open when it happened:
        one opened after the first write could miss an error on that write. It
        stays open for this object's life (closed when it is collected).
        """
        if self._fd is not None:  # every commit asks: no lock once it is open
            return
        with self._wake:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                weakref.finalize(self, os.close, self._fd)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._thread = None  # under the lock: a new wait starts a new thread
                    return
                error = self._failed
            if error is None:
                error = self._sync()
                if error is not None:
                    with self._wake:
                        self._failed = error
            _notify(batch, error)

    def _sync(self) -> StorageError | None:
        try:
            self.prepare()
            assert self._fd is not None  # opened above
            syncfs(self._fd)
        except OSError as exc:
            return StorageError(
                f"file store {self.path}: group sync failed ({exc}); what was written "
                "since the last good sync may be lost, so this store takes no more "
                "commits: check the disk, then open the store again"
            )
        self.syncs += 1
        return None


def _notify(batch: list[_Waiter], error: StorageError | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for loop, future in batch:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():  # one wake-up per loop, not per write
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: StorageError | None) -> None:
    for future in futures:
        if future.done():  # the waiter was cancelled; its write is the caller's to undo
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(StorageError(str(error)))  # one each: tracebacks differ
