"""SQLiteStore: URLs, file permissions, WAL, waiting for other processes, schema, damage.

The Store contract (test_store_contract.py) runs on SQLite too; this module covers
what is particular to one database file shared by processes.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import stat
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Checkpoint,
    CorruptSessionError,
    EngineError,
    InvalidArgumentError,
    Session,
    StorageError,
    open_store,
)
from engine.models import utcnow
from engine.stores import SQLiteStore
from engine.stores.sqlite import SCHEMA_VERSION

MakeSession = Callable[..., Session]

HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()  # hold the write lock until told to let go
db.execute("COMMIT")
"""


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sessions.db"


@pytest.fixture
async def sqlite_store(database: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(database)
    yield store
    await store.close()


def checkpoint_for(session: Session, **changes: Any) -> Checkpoint:
    now = utcnow()
    values: dict[str, Any] = {
        "revision": session.revision + 1,
        "status": "running",
        "last_activity": now,
        "expires_at": now + timedelta(hours=1),
    }
    values.update(changes)
    return Checkpoint(**values)


async def commit(store: SQLiteStore, session: Session, **changes: Any) -> None:
    lease = await store.acquire(session.id, "runner-a")
    assert lease is not None
    checkpoint = checkpoint_for(session, **changes)
    await store.commit(lease, checkpoint)
    session.apply(checkpoint)
    await store.release(lease)


def raw(database: Path, query: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one statement on the file directly, as another program would."""
    db = sqlite3.connect(database, isolation_level=None)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


# -- URLs and options -----------------------------------------------------------------


def test_open_store_reads_sqlite_urls(tmp_path: Path) -> None:
    relative = open_store("sqlite:///sessions.db")
    absolute = open_store(f"sqlite:///{tmp_path}/sessions.db")

    assert isinstance(relative, SQLiteStore)
    assert relative.path == Path("sessions.db")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == tmp_path / "sessions.db"


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///d/"])
def test_a_sqlite_url_without_a_file_is_refused(url: str) -> None:
    with pytest.raises(EngineError, match=re.escape("sqlite:///sessions.db")):
        open_store(url)


def test_an_unknown_durability_is_refused(database: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="durability"):
        SQLiteStore(database, durability="sometimes")  # type: ignore[arg-type]


async def test_a_folder_in_place_of_the_file_is_a_storage_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    with pytest.raises(StorageError, match=re.escape(str(tmp_path))):
        await store.list()
    await store.close()


# -- the file -----------------------------------------------------------------------


async def test_nothing_is_created_until_first_use_and_then_only_privately(
    sqlite_store: SQLiteStore, database: Path, make_session: MakeSession
) -> None:
    assert not database.parent.exists()

    await sqlite_store.create(make_session())

    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    files = sorted(database.parent.iterdir())
    assert [path.name for path in files] == ["sessions.db", "sessions.db-shm", "sessions.db-wal"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}


async def test_a_reader_in_another_program_does_not_hold_up_a_commit(
    sqlite_store: SQLiteStore, database: Path, make_session: MakeSession
) -> None:
    # Given another connection in the middle of a read transaction
    session = make_session()
    await sqlite_store.create(session)
    reader = sqlite3.connect(database, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM stepvault_sessions").fetchone() == (1,)

        # When the store commits (WAL: writers do not wait for readers)
        await asyncio.wait_for(commit(sqlite_store, session, step="one"), timeout=10)

        # Then the commit landed, and the reader still sees its own snapshot
        assert reader.execute("SELECT steps_done FROM stepvault_sessions").fetchone() == (0,)
    finally:
        reader.close()
    assert await sqlite_store.load(session.id) == session


async def test_a_commit_waits_for_another_processs_write_without_blocking_the_loop(
    sqlite_store: SQLiteStore, database: Path, make_session: MakeSession
) -> None:
    # Given a store running one session (so it commits on the loop's thread), and
    # another process holding the database's write lock
    session = make_session()
    await sqlite_store.create(session)
    lease = await sqlite_store.acquire(session.id, "runner-a")
    assert lease is not None
    first = checkpoint_for(session, step="zero")
    await sqlite_store.commit(lease, first)
    session.apply(first)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_WRITE_LOCK,
        str(database),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), timeout=30) == b"locked\n"

        # When the store commits, the commit waits while the event loop keeps running
        checkpoint = checkpoint_for(session, step="one")
        committing = asyncio.ensure_future(sqlite_store.commit(lease, checkpoint))
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert loop.time() - began < 10  # not blocked for SQLite's busy timeout (60 s)
        assert not committing.done()

        # Then once the other process lets go, the commit completes (no "database is locked")
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
        await asyncio.wait_for(committing, timeout=30)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.communicate()
    session.apply(checkpoint)
    assert await sqlite_store.load(session.id) == session


def test_workers_opening_a_new_database_together_all_get_in(tmp_path: Path) -> None:
    # Given several workers (threads here: SQLite's file locks behave as between
    # processes) that open the same new database at the same instant, many times
    failures: list[BaseException] = []
    for round_ in range(100):
        path = tmp_path / f"round-{round_}" / "sessions.db"
        start = threading.Barrier(4)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                asyncio.run(_migrate_and_close(SQLiteStore(path)))
            except BaseException as exc:  # collected: an error in a thread is lost
                failures.append(exc)

        workers = [threading.Thread(target=open_it) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    # Then none was refused ("database is locked" while another switched it to WAL)
    assert failures == []


async def _migrate_and_close(store: SQLiteStore) -> None:
    try:
        assert await store.migrate() == SCHEMA_VERSION
    finally:
        await store.close()


# -- schema -------------------------------------------------------------------------


async def test_migrate_creates_the_schema_once(sqlite_store: SQLiteStore, database: Path) -> None:
    assert await sqlite_store.migrate() == SCHEMA_VERSION
    assert await SQLiteStore(database).migrate() == SCHEMA_VERSION

    versions = raw(database, "SELECT version FROM stepvault_schema")
    assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


async def test_a_schema_from_a_newer_stepvault_is_refused(
    sqlite_store: SQLiteStore, database: Path, make_session: MakeSession
) -> None:
    # Given a database a newer stepvault has migrated
    session = make_session()
    await sqlite_store.create(session)
    await sqlite_store.close()
    raw(database, "INSERT INTO stepvault_schema VALUES (99)")

    # When this version opens it, it refuses to touch it
    newer = SQLiteStore(database)
    with pytest.raises(StorageError, match="newer"):
        await newer.load(session.id)
    await newer.close()

    # Then the data is untouched
    assert raw(database, "SELECT id FROM stepvault_sessions") == [(session.id,)]


async def test_steps_are_folded_into_the_snapshot_once_they_outgrow_it(
    database: Path, make_session: MakeSession
) -> None:
    # Given a store that compacts as soon as the steps outgrow the snapshot
    store = SQLiteStore(database, compact_bytes=1)
    session = make_session()
    await store.create(session)

    # When a step bigger than the snapshot, then a small one, are committed
    await commit(store, session, step="big", output="x" * 10_000)
    await commit(store, session, step="small", output=1)

    # Then the big one was folded into the snapshot, the small one waits in the steps
    assert raw(database, "SELECT revision FROM stepvault_steps") == [(2,)]
    assert raw(database, "SELECT snapshot_revision FROM stepvault_sessions") == [(1,)]
    assert await store.load(session.id) == session
    await store.close()


# -- damage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "where"), [("stepvault_snapshots", "snapshot"), ("stepvault_steps", "step 1")]
)
async def test_a_damaged_record_raises_on_every_read(
    sqlite_store: SQLiteStore, database: Path, make_session: MakeSession, table: str, where: str
) -> None:
    # Given a session whose snapshot or step record had one byte flipped on disk
    session = make_session(state={"v": "a" * 100})
    await sqlite_store.create(session)
    await commit(sqlite_store, session, step="one", output="b" * 100)
    (record,) = raw(database, f"SELECT record FROM {table}")[0]  # noqa: S608  # a test's own table
    damaged = bytearray(record)
    damaged[-10] ^= 0xFF
    raw(database, f"UPDATE {table} SET record = ?", bytes(damaged))  # noqa: S608

    # When it is read, twice
    for _ in range(2):
        with pytest.raises(CorruptSessionError, match=f"{re.escape(str(database))}.*{where}"):
            await sqlite_store.load(session.id)

    # Then it is still listed (never silently dropped)
    assert [row.id for row in await sqlite_store.list()] == [session.id]


async def test_a_store_reused_after_close_reconnects(
    sqlite_store: SQLiteStore, make_session: MakeSession
) -> None:
    session = make_session()
    await sqlite_store.create(session)
    await sqlite_store.close()

    assert await sqlite_store.load(session.id) == session
    assert await sqlite_store.load(str(uuid.uuid4())) is None

