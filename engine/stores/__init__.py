"""Storage backends and ``open_store``, which picks one from a URL."""

from __future__ import annotations

from ..errors import EngineError
from .base import Lease, Store, validate_session_id
from .file import FileStore
from .memory import MemoryStore

__all__ = ["FileStore", "Lease", "MemoryStore", "Store", "open_store", "validate_session_id"]


def open_store(url: str, *, encryption_key: str | bytes | None = None) -> Store:
    """Open a store from a URL: ``./dir``, ``file://dir`` or ``memory://``.

    Raises:
        EngineError: the URL's scheme is unknown or not available in this version.
    """
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("file://"):
        return FileStore(url.removeprefix("file://"), encryption_key=encryption_key)
    scheme, separator, _ = url.partition("://")
    if separator:
        raise EngineError(
            f"store URL {url!r}: scheme {scheme!r} is not supported "
            "(use a folder path, file://, or memory://)"
        )
    return FileStore(url, encryption_key=encryption_key)
