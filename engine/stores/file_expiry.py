"""When each session expires, without reading it: the ``.expiry`` folder.

A cleanup sweep looks for expired sessions; reading every session to learn its
expiry costs a read per session per sweep. An empty file ``.expiry/<id>`` carries,
as its modification time, a *bound*: a time before which the session is surely
not expired. A sweep reads only the sessions whose bound has passed, or that have
none (last written by an older stepvault, or a bound lost in a crash: the next
commit under a lease sets one).

The one rule: **a bound is never later than the session's expiry.** It is set
from an expiry that is already durable (after a commit or create), a sliding
expiry only moves later, a save, which may move it earlier, removes the bound
durably before it writes, and so does a create (a removed namesake's bound could
be left by a crash). A bound left behind by a crash is early, and early costs
only a read.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EngineError
from ..log import get_logger
from .base import is_session_id
from .file_index import drop_entry, open_entry, remove_entry

EXPIRY = ".expiry"
LAG = 60.0
"""Seconds a bound may fall behind a sliding expiry before a commit moves it up."""

_log = get_logger()


def set_bound(root: Path, session_id: str, expires: float) -> None:
    """Record ``expires`` (a durable expiry, POSIX seconds) as the session's bound.

    Not synced: a bound lost in a crash is older (or missing), never later.
    """
    try:
        fd = open_entry(root / EXPIRY, session_id)
        try:
            os.utime(fd, (expires, expires))
        finally:
            os.close(fd)
    except (OSError, EngineError) as exc:  # a missing bound only costs a read
        _log.warning("expiry_bound.failed", session_id=session_id, error=str(exc))


def remove_bound(root: Path, session_id: str, *, sync: bool) -> None:
    """Remove a session's bound, durably with ``sync``, before its expiry may move earlier.

    Raises:
        OSError: the bound could not be removed (the caller must not go on).
    """
    remove_entry(root / EXPIRY, session_id, sync=sync)


def forget(root: Path, session_id: str) -> None:
    """Drop the bound of a session that is gone (deleted, shredded, quarantined)."""
    drop_entry(root / EXPIRY, session_id, "expiry_bound.failed")


def bounds(root: Path) -> dict[str, float]:
    """Return each bounded session's bound (POSIX seconds)."""
    found: dict[str, float] = {}
    try:
        with os.scandir(root / EXPIRY) as entries:
            for entry in entries:
                if is_session_id(entry.name):
                    try:
                        found[entry.name] = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue  # removed while listed: the session is read instead
    except FileNotFoundError:
        pass
    return found
