"""The file store's session locks: an ``flock`` on the folder's ``lock`` file.

The runner that owns a session holds the lock; the kernel releases it when that
process dies, so a crashed holder is taken over at once. The file's bytes say
who held it last: a holder writes its name and the takeover count in, and blanks
them when it releases on purpose. A name still there when the lock is taken means
its holder died holding it, and the new holder counts one more takeover.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .fsutil import O_CLOEXEC, write_all

LOCK = "lock"
LOCK_RECORD = 64
"""Bytes of a lock file: the holder's name and takeover count, padded with blanks."""


def take(folder: Path, owner: str) -> tuple[int, int] | None:
    """Take ``folder``'s lock without waiting; None when another holds it.

    Returns:
        The lock file's descriptor (closing it releases the lock) and the number
        of takeovers it now records.
    """
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
        return fd, _record_holder(fd, owner)
    except BaseException:
        os.close(fd)
        raise


def give_back(fd: int) -> None:
    """Release the lock taken as ``fd``, saying it was released on purpose."""
    # A blank lock file says "released on purpose"; a holder that crashes
    # leaves its name in it, which the next holder counts as a takeover.
    # Blanked in place, not truncated: no size change, no metadata to journal.
    with contextlib.suppress(OSError):
        write_all(fd, b" " * max(LOCK_RECORD, os.fstat(fd).st_size), 0)
    os.close(fd)  # closing the only descriptor releases the flock


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
