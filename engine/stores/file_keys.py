"""The file store's key vault: each session's wrapped data key in a small file of its own.

Key files live in their own folder (``<root>/.keys`` unless told otherwise), never
inside a session's folder, so copying a session's records never copies its key,
and deleting the key file leaves any copy of those records unreadable.

    .keys/                    0700
      kdf-salt.key            the passphrase salt (only with a passphrase)
      <session id>.key        the session's wrapped data key(s), 0600
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from ..crypto import MAX_KEY_RECORD_BYTES, SALT_NAME
from ..errors import StorageError
from .base import Durability, validate_session_id
from .fsutil import O_CLOEXEC, private_folder, read_file, sync_folder, write_all, write_new


class KeyFiles:
    """A ``crypto.KeyVault`` on files: atomic writes, 0600 files, no symlinks followed."""

    def __init__(self, folder: Path, durability: Durability) -> None:
        self.folder = folder
        self._sync = durability != "none"

    def _path(self, name: str) -> Path:
        if name != SALT_NAME:
            validate_session_id(name)  # a name becomes a path: never "../x"
        return self.folder / f"{name}.key"

    def get_key(self, name: str) -> bytes | None:
        """Return the key file's bytes (bounded: longer is damage anyway), None if absent."""
        path = self._path(name)
        if private_folder(self.folder, create=False) is None:
            return None
        return read_file(path, MAX_KEY_RECORD_BYTES + 1)

    def has_key(self, name: str) -> bool:
        """Tell whether a key file exists (one ``lstat``: cheap enough for every load)."""
        try:
            self._path(name).lstat()
        except FileNotFoundError:
            return False
        return True

    def add_key(self, name: str, record: bytes) -> bytes:
        """Write the key file unless it exists (``link`` never replaces); return what is stored."""
        path = self._path(name)
        temp = self._temp(name, record)
        try:
            os.link(temp, path)
        except FileExistsError:
            stored = self.get_key(name)
            if stored is None:  # removed between our link and our read: a concurrent delete
                raise StorageError(f"{path}: removed while being created") from None
            self._sync_existing(path)  # its writer may have died before making it durable
            return stored
        finally:
            temp.unlink()
        self._sync_folder()
        return record

    def put_key(self, name: str, record: bytes) -> None:
        """Replace the key file atomically (temp file, fsync, rename, folder fsync)."""
        path = self._path(name)
        os.replace(self._temp(name, record), path)
        self._sync_folder()

    def delete_key(self, name: str) -> bool:
        """Overwrite the key file with zeros, then remove it; return whether it existed.

        The overwrite is best effort (a copy-on-write file system or an SSD may keep
        the old blocks); removing the file from the store is what shredding promises.
        """
        path = self._path(name)
        if private_folder(self.folder, create=False) is None:
            return False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            write_all(fd, bytes(os.fstat(fd).st_size), 0)
            if self._sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # a concurrent delete got there first
            path.unlink()
        self._sync_folder()
        return True

    def _temp(self, name: str, record: bytes) -> Path:
        private_folder(self.folder, create=True)
        temp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            write_new(temp, record, sync=self._sync)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return temp

    def _sync_existing(self, path: Path) -> None:
        if self._sync:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sync_folder(self.folder)

    def _sync_folder(self) -> None:
        if self._sync:
            sync_folder(self.folder)
