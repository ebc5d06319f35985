"""Which sessions are finished, without reading them: the ``.finished`` folder.

``resume_all`` looks for unfinished sessions; in a store that has run for a while
most sessions are finished, and reading each one to learn it costs a file read
per session. An empty file ``.finished/<id>`` marks a session whose status is
finished (completed, failed or cancelled), so the walk can skip it unread.

The marks are a hint with one rule that makes them safe: **a mark never sits on
a session that is durably unfinished.** A mark is made only after the finished
status is durable, and removed durably (unlink, then the folder's fsync) before
a commit, save or create could make the session unfinished. A mark that is
missing (a crash before it was made, a store written by an older stepvault)
costs only a read; the walk never skips a session that needs running.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EngineError
from ..log import get_logger
from .base import is_session_id
from .fsutil import O_CLOEXEC, sync_folder

FINISHED = ".finished"

_log = get_logger()


def is_marked(root: Path, session_id: str) -> bool:
    """Tell whether the session carries the finished mark."""
    return os.path.lexists(root / FINISHED / session_id)


def mark(root: Path, session_id: str) -> None:
    """Mark a session whose finished status is durable; a failure only costs a read later."""
    try:
        os.close(open_entry(root / FINISHED, session_id))
    except (OSError, EngineError) as exc:
        _log.warning("finished_mark.failed", session_id=session_id, error=str(exc))


def unmark(root: Path, session_id: str, *, sync: bool) -> None:
    """Remove a session's mark, durably with ``sync``, before it may become unfinished.

    Raises:
        OSError: the mark could not be removed (the caller must not go on).
    """
    remove_entry(root / FINISHED, session_id, sync=sync)


def forget(root: Path, session_id: str) -> None:
    """Drop the mark of a session that is gone (deleted, shredded, quarantined)."""
    drop_entry(root / FINISHED, session_id, "finished_mark.failed")


def open_entry(folder: Path, session_id: str) -> int:
    """Open (creating it, and ``folder`` on first use) the session's entry in ``folder``.

    Raises:
        OSError: it could not be opened.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | O_CLOEXEC
    try:
        return os.open(folder / session_id, flags, 0o600)
    except FileNotFoundError:  # the first entry of this store
        folder.mkdir(mode=0o700, exist_ok=True)
        return os.open(folder / session_id, flags, 0o600)


def remove_entry(folder: Path, session_id: str, *, sync: bool) -> None:
    """Remove the session's entry in ``folder``, durably with ``sync``.

    Raises:
        OSError: it could not be removed.
    """
    try:
        (folder / session_id).unlink()
    except FileNotFoundError:
        return
    if sync:
        sync_folder(folder)


def drop_entry(folder: Path, session_id: str, failure: str) -> None:
    """Remove the entry of a session that is gone; a failure is logged as ``failure``."""
    try:
        (folder / session_id).unlink(missing_ok=True)
    except OSError as exc:  # a stale entry of a gone session is harmless
        _log.warning(failure, session_id=session_id, error=str(exc))


def finished(root: Path) -> set[str]:
    """Return the ids of the marked sessions."""
    try:
        return {name for name in os.listdir(root / FINISHED) if is_session_id(name)}
    except FileNotFoundError:
        return set()
