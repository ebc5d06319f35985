"""Shared fixtures: every store the contract suite runs against, built in tmp_path.

Fixtures only; test modules import nothing else from here.

- ``store``: one store of each kind (the contract suite runs once per kind):
  memory, file, file-batch and sqlite-batch (``durability="batch"``: group commit),
  sqlite and postgres.
- ``make_store``: a factory for more stores of the same kind; for ``file``,
  ``sqlite`` and ``postgres`` they share one folder, database file or schema (a
  second process's view), for ``memory`` each is a new store.
- ``store_url``: the URL ``open_store`` opens the same sessions with in another
  process (None for ``memory``); ``leases_expire``: whether the kind's leases run
  out by time (SQL stores) rather than with their holder's process.
- ``postgres_url``: a PostgreSQL URL with a schema of its own for this test,
  dropped afterwards. The server is ``STEPVAULT_TEST_PG`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``); when it does not answer, the
  tests that need it skip, or fail if ``STEPVAULT_REQUIRE_PG=1`` (CI).
- ``file_store`` / ``make_file_store``: the same for FileStore alone.
- ``store_path``: the folder the file stores live in (not created in advance).
- ``make_session``: a factory for valid, unsaved sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import FileStore, MemoryStore, Session, Store
from engine import log as engine_log
from engine.models import utcnow
from engine.stores import PostgresStore, SQLiteStore

STORE_KINDS = ["memory", "file", "file-batch", "sqlite", "sqlite-batch", "postgres"]
BATCH_KINDS = {"file-batch", "sqlite-batch"}
EXPIRING_LEASES = {"sqlite", "sqlite-batch", "postgres"}
PG_SERVER = os.environ.get("STEPVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("STEPVAULT_REQUIRE_PG") == "1"
_pg_problem: list[str] = []  # why the server cannot be used, once known ("" if it can)


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
def leases_expire(store_kind: str) -> bool:
    """Whether this kind's leases run out by time (a live holder can be superseded)."""
    return store_kind in EXPIRING_LEASES


async def _pg_unavailable() -> str:
    """Return why the test server cannot be used, or "" if it answers."""
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415  # Postgres tests only
    except ImportError:
        return "asyncpg is not installed: pip install 'stepvault[postgres]'"
    try:
        conn = await asyncpg.connect(PG_SERVER, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        url = urllib.parse.urlsplit(PG_SERVER)  # named without its password, if any
        where = f"{url.hostname}:{url.port or 5432}{url.path}"
        return f"PostgreSQL at {where} (STEPVAULT_TEST_PG) does not answer: {exc}"
    await conn.close()
    return ""


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A URL for a fresh schema on the test server, dropped after the test."""
    if not _pg_problem:
        _pg_problem.append(await _pg_unavailable())
    if _pg_problem[0]:
        if REQUIRE_PG:
            pytest.fail(f"{_pg_problem[0]}; STEPVAULT_REQUIRE_PG=1 requires it")
        pytest.skip(_pg_problem[0])
    schema = f"test_{uuid.uuid4().hex[:16]}"
    separator = "&" if "?" in PG_SERVER else "?"
    yield f"{PG_SERVER}{separator}schema={schema}"
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(PG_SERVER, timeout=5)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
def store_url(store_kind: str, store_path: Path, request: pytest.FixtureRequest) -> str | None:
    """The URL another process opens this test's sessions with; None for memory."""
    if store_kind in ("file", "file-batch"):
        return str(store_path)
    if store_kind in ("sqlite", "sqlite-batch"):
        return f"sqlite:///{store_path.with_suffix('.db')}"
    if store_kind == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return None


@pytest.fixture
async def make_store(store_kind: str, store_url: str | None) -> AsyncIterator[Callable[..., Store]]:
    """Build stores of ``store_kind``; every one built is closed after the test.

    Keyword options (``durability``, ``compact_bytes``) apply to every kind but memory.
    """
    built: list[Store] = []

    def make(**options: Any) -> Store:
        new: Store
        options = {"durability": "batch" if store_kind in BATCH_KINDS else "fsync", **options}
        if store_kind == "memory" or store_url is None:
            new = MemoryStore()
        elif store_kind in ("file", "file-batch"):
            new = FileStore(store_url, **options)
        elif store_kind in ("sqlite", "sqlite-batch"):
            new = SQLiteStore(store_url.removeprefix("sqlite:///"), **options)
        else:
            new = PostgresStore(store_url, **options)
        built.append(new)
        return new

    yield make
    await asyncio.gather(*(made.close() for made in built))


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
