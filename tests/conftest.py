"""Shared fixtures: every store the contract suite runs against, built in tmp_path.

Fixtures only; test modules import nothing else from here.

- ``store``: one store of each kind (the contract suite runs once per kind).
- ``make_store``: a factory for more stores of the same kind; for ``file`` they
  share one folder (a second process's view), for ``memory`` each is a new store.
- ``file_store`` / ``make_file_store``: the same for FileStore alone.
- ``store_path``: the folder the file stores live in (not created in advance).
- ``make_session``: a factory for valid, unsaved sessions.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import FileStore, MemoryStore, Session, Store
from engine import log as engine_log
from engine.models import utcnow

STORE_KINDS = ["memory", "file"]


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """The folder file stores use; tests can assert it was never created."""
    return tmp_path / "sessions"


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of store under test."""
    kind: str = request.param
    return kind


@pytest.fixture
async def make_store(store_kind: str, store_path: Path) -> AsyncIterator[Callable[..., Store]]:
    """Build stores of ``store_kind``; every one built is closed after the test.

    Keyword options (``durability``, ``compact_bytes``) apply to the file store only.
    """
    built: list[Store] = []

    def make(**options: Any) -> Store:
        new: Store
        if store_kind == "memory":
            new = MemoryStore()
        else:
            new = FileStore(store_path, **{"durability": "fsync", **options})
        built.append(new)
        return new

    yield make
    for made in built:
        await made.close()


@pytest.fixture
def store(make_store: Callable[..., Store]) -> Store:
    """One store of each kind, closed after the test."""
    return make_store()


@pytest.fixture
async def make_file_store(store_path: Path) -> AsyncIterator[Callable[..., FileStore]]:
    """Build FileStores on ``store_path`` (fsync unless told otherwise); close them after."""
    built: list[FileStore] = []

    def make(**options: Any) -> FileStore:
        new = FileStore(store_path, **{"durability": "fsync", **options})
        built.append(new)
        return new

    yield make
    for made in built:
        await made.close()


@pytest.fixture
def file_store(make_file_store: Callable[..., FileStore]) -> FileStore:
    """A FileStore with fsync durability on ``store_path``."""
    return make_file_store()


@pytest.fixture
def make_session() -> Callable[..., Session]:
    """Build a valid session (fresh UUIDv4, one hour TTL); keyword arguments override."""

    def make(**fields: Any) -> Session:
        now = utcnow()
        values: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "created_at": now,
            "last_activity": now,
            "expires_at": now + timedelta(hours=1),
            "ttl": 3600.0,
        }
        values.update(fields)
        return Session(**values)

    return make


@pytest.fixture(autouse=True)
def _restore_engine_logging() -> Iterator[None]:
    """Undo ``configure_logging`` (a process-wide switch) after every test."""
    logger = logging.getLogger(engine_log.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate, engine_log._renderer)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    engine_log._renderer = saved[3]
