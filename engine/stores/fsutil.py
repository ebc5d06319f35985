"""Small file helpers the file store and its key files share: no symlinks, whole writes.

Everything here refuses to follow a symlink where a store file should be, and
creates files 0600 and folders 0700 whatever the umask (the umask can only take
permission bits away, never add them).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import StorageError

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | O_CLOEXEC
_O_NOATIME = getattr(os, "O_NOATIME", 0)


def open_to_read(path: Path | str) -> int:
    """Open a store file to read, without following a symlink or updating its access time.

    A read right after a write would otherwise update the access time (``relatime``):
    a metadata write that waits on the filesystem's journal while a sync runs.
    ``O_NOATIME`` is refused on files we do not own: those are opened plainly.

    Raises:
        FileNotFoundError: there is no such file.
    """
    if _O_NOATIME:
        try:
            return os.open(path, _READ | _O_NOATIME)
        except PermissionError:
            pass
    return os.open(path, _READ)


def private_folder(folder: Path, *, create: bool) -> Path | None:
    """Return ``folder`` (made 0700 if ``create``), None if absent; refuse a symlink.

    Raises:
        StorageError: something other than a real folder sits at ``folder``.
    """
    try:
        mode = folder.lstat().st_mode
    except FileNotFoundError:
        if not create:
            return None
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = folder.lstat().st_mode
    if not stat.S_ISDIR(mode):
        raise StorageError(f"{folder}: not a folder (a symlink or a file)")
    return folder


def read_file(path: Path, limit: int | None = None) -> bytes | None:
    """Read a whole file (at most ``limit`` bytes) without following a symlink; None if absent."""
    try:
        fd = open_to_read(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read() if limit is None else handle.read(limit)


def write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``, continuing after short writes."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_new(path: Path, data: bytes, *, sync: bool) -> None:
    """Create ``path`` 0600 holding ``data`` (fsynced if ``sync``); it must not exist."""
    _write(path, NEW_FILE, data, sync=sync)


def _write(path: Path, flags: int, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, flags, 0o600)
    try:
        write_all(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    """Make a file's bytes durable (fsync), if it exists: its writer may have died unsynced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make ``folder``'s entries (renames, new and removed files) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Make ``data`` the content of ``path`` atomically.

    Temp file, fsync, rename over ``path``, folder fsync: a crash leaves the old
    file or the new one, never a mix (the fsyncs only when ``sync``).
    """
    temp = path.with_name(f"{path.name}.tmp")
    _write(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | O_CLOEXEC, data, sync=sync)
    os.replace(temp, path)
    if sync:
        sync_folder(path.parent)
