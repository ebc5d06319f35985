"""Storage backends and ``open_store``, which picks one from a URL."""

from __future__ import annotations

from ..crypto import KeyInput
from ..errors import EngineError
from .base import Lease, Store, validate_session_id
from .file import FileStore
from .memory import MemoryStore
from .postgres import PostgresStore
from .sqlite import SQLiteStore

__all__ = [
    "FileStore",
    "Lease",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "open_store",
    "validate_session_id",
]

STORE_URLS = "a folder, file://folder, sqlite:///file.db, postgresql://... or memory://"


def open_store(url: str, *, encryption_key: KeyInput | None = None) -> Store:
    """Open a store from a URL; nothing is touched until the store is first used.

    ``./dir`` or ``file://dir`` (FileStore), ``sqlite:///file.db`` (SQLiteStore:
    three slashes and a relative path, four for an absolute one),
    ``postgresql://user@host/db`` or ``postgres://...`` (PostgresStore; add
    ``?schema=name`` for a schema other than ``stepvault``), ``memory://``.
    ``encryption_key`` (a key, a passphrase or a ``crypto.KeyRing``) encrypts
    every record, whichever the store.

    Raises:
        EngineError: the URL's scheme is unknown, or names no database file.
    """
    if url.startswith("memory://"):
        return MemoryStore(encryption_key=encryption_key)
    if url.startswith("file://"):
        return FileStore(url.removeprefix("file://"), encryption_key=encryption_key)
    scheme, separator, rest = url.partition("://")
    if not separator:
        return FileStore(url, encryption_key=encryption_key)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, encryption_key=encryption_key)
    if scheme == "sqlite":
        path = rest.removeprefix("/")  # sqlite:///rel.db -> rel.db, sqlite:////abs -> /abs
        if not rest.startswith("/") or not path or path.endswith("/"):
            raise EngineError(
                f"store URL {url!r}: a SQLite URL names a file, as in sqlite:///sessions.db "
                "(relative) or sqlite:////var/lib/app/sessions.db (absolute)"
            )
        return SQLiteStore(path, encryption_key=encryption_key)
    raise EngineError(f"store URL {url!r}: scheme {scheme!r} is not supported (use {STORE_URLS})")
