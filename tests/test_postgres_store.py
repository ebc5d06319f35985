"""PostgresStore against the real server: URLs, driver, schema and migrations, the
database's clock, no held locks or open transactions, damage, and bad input.

The Store contract (test_store_contract.py) runs on PostgreSQL too, and
test_takeover.py runs several runner processes on one schema.
"""

from __future__ import annotations

import asyncio
import re
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest

from engine import (
    Checkpoint,
    CorruptSessionError,
    EngineError,
    InvalidArgumentError,
    Lease,
    Session,
    StorageError,
    open_store,
)
from engine.models import utcnow
from engine.stores import PostgresStore
from engine.stores.postgres import SCHEMA_VERSION

asyncpg = pytest.importorskip("asyncpg", reason="pip install 'stepvault[postgres]'")

MakeSession = Callable[..., Session]


@pytest.fixture
async def pg_store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(postgres_url)
    yield store
    await store.close()


@pytest.fixture
async def sql(pg_store: PostgresStore) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the same schema, as an operator's psql would be."""
    conn = await asyncpg.connect(pg_store.dsn, server_settings={"search_path": pg_store.schema})
    yield conn
    await conn.close()


async def commit(store: PostgresStore, session: Session, **changes: Any) -> None:
    """Commit one checkpoint under a lease taken for it, then let go."""
    lease = await store.acquire(session.id, "runner-a")
    assert lease is not None
    await commit_under(store, lease, session, **changes)
    await store.release(lease)


async def commit_under(
    store: PostgresStore, lease: Lease, session: Session, **changes: Any
) -> None:
    """Commit the session's next checkpoint (``changes`` on a running one) and apply it."""
    now = utcnow()
    values: dict[str, Any] = {
        "revision": session.revision + 1,
        "status": "running",
        "last_activity": now,
        "expires_at": now + timedelta(hours=1),
    }
    checkpoint = Checkpoint(**{**values, **changes})
    await store.commit(lease, checkpoint)
    session.apply(checkpoint)


# -- URLs, options and the driver -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_open_store_reads_postgres_urls_and_their_schema(scheme: str) -> None:
    plain = open_store(f"{scheme}://user@db.example:5433/app")
    named = open_store(f"{scheme}://user@db.example/app?sslmode=disable&schema=tenant_7")

    assert isinstance(plain, PostgresStore)
    assert plain.schema == "stepvault"
    assert isinstance(named, PostgresStore)
    assert named.schema == "tenant_7"
    assert named.dsn == f"{scheme}://user@db.example/app?sslmode=disable"


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("postgresql://h/db?schema=Bad-Name", {}),
        ("postgresql://h/db", {"schema": "x; DROP TABLE y"}),
        ("postgresql://h/db?schema=one", {"schema": "two"}),
        ("postgresql://h/db", {"min_connections": 5, "max_connections": 2}),
        ("postgresql://h/db", {"durability": "sometimes"}),
    ],
)
def test_bad_options_are_refused_before_connecting(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        PostgresStore(url, **options)


async def test_without_asyncpg_the_error_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what a missing package looks like
    store = PostgresStore("postgresql://postgres@127.0.0.1/test")

    with pytest.raises(EngineError, match=r"pip install 'stepvault\[postgres\]'"):
        await store.list()


async def test_an_unreachable_server_is_a_storage_error_that_hides_the_password() -> None:
    store = PostgresStore("postgresql://stepvault:s3cret@127.0.0.1:1/app")

    with pytest.raises(StorageError, match=re.escape("127.0.0.1:1/app")) as caught:
        await store.list()

    assert "s3cret" not in str(caught.value)
    await store.close()


# -- schema and migrations -----------------------------------------------------------


async def test_the_store_creates_its_schema_once_even_when_runners_start_together(
    postgres_url: str, sql: asyncpg.Connection
) -> None:
    # Given five runners starting at once on a database without the schema
    stores = [PostgresStore(postgres_url) for _ in range(5)]

    # When each of them migrates
    versions = await asyncio.gather(*(store.migrate() for store in stores))

    # Then the schema exists at the current version, each migration recorded once
    assert versions == [SCHEMA_VERSION] * 5
    rows = await sql.fetch("SELECT version FROM schema_version ORDER BY version")
    assert [row["version"] for row in rows] == list(range(1, SCHEMA_VERSION + 1))
    await asyncio.gather(*(store.close() for store in stores))


async def test_a_schema_from_a_newer_stepvault_is_refused(
    pg_store: PostgresStore, postgres_url: str, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    # Given a schema a newer stepvault migrated
    session = make_session()
    await pg_store.create(session)
    await sql.execute("INSERT INTO schema_version VALUES (99)")

    # When this version connects, it refuses to touch it
    newer = PostgresStore(postgres_url)
    with pytest.raises(StorageError, match="newer"):
        await newer.load(session.id)
    await newer.close()

    # Then the data is untouched
    assert await pg_store.load(session.id) == session


# -- leases and connections ------------------------------------------------------------


async def test_leases_run_on_the_databases_clock(
    pg_store: PostgresStore, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    session = make_session()
    await pg_store.create(session)

    await pg_store.acquire(session.id, "runner-a", ttl=60)

    left = await sql.fetchval("SELECT extract(epoch FROM lease_expires - now()) FROM sessions")
    assert 55 < left <= 60


async def test_holding_leases_keeps_no_lock_and_no_transaction_open(
    postgres_url: str, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    # Given a store, known to the server by a name of its own, that committed steps
    # and now holds three leases
    name = f"stepvault-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{postgres_url}&application_name={name}", max_connections=3)
    for _ in range(3):
        session = make_session()
        await store.create(session)
        await commit(store, session, step="one")
        assert await store.acquire(session.id, "runner-a") is not None

    # When the server is asked what that store's connections hold
    states = await sql.fetch(
        "SELECT a.state, l.locktype FROM pg_stat_activity AS a"
        " LEFT JOIN pg_locks AS l ON l.pid = a.pid WHERE a.application_name = $1",
        name,
    )

    # Then they sit idle: no advisory lock (PgBouncer-safe), no transaction left open
    assert states
    assert {row["state"] for row in states} == {"idle"}
    assert {row["locktype"] for row in states} == {None}
    await store.close()


async def test_commits_go_on_after_the_server_drops_the_connection_they_use(
    postgres_url: str, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    # Given a store that committed a step (through the connection it keeps for commits)
    name = f"stepvault-test-{uuid.uuid4().hex[:8]}"
    store = PostgresStore(f"{postgres_url}&application_name={name}")
    session = make_session()
    await store.create(session)
    lease = await store.acquire(session.id, "runner-a")
    assert lease is not None

    await commit_under(store, lease, session, step="one")

    # When the server ends that connection (an operator, a failover), and waits for it
    ended = await sql.fetchval(
        "SELECT bool_and(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND query LIKE '%WITH fenced AS%'",
        name,
    )
    assert ended

    # Then at most the next commit fails, cleanly, and the ones after it land
    # (the client may read the connection's end only when it next uses it)
    try:
        await commit_under(store, lease, session, step="two")
    except StorageError:  # the client had not read the connection's end yet
        await commit_under(store, lease, session, step="two")
    await commit_under(store, lease, session, step="three")
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.steps_done == ["one", "two", "three"]
    await store.close()


async def test_commits_land_through_the_pool_when_no_connection_of_their_own_opens(
    postgres_url: str, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    # Given a role the server lets open one connection, and a store of one pooled
    # connection under it (the commits' own connection is one too many)
    role = f"stepvault_test_{uuid.uuid4().hex[:8]}"
    database = await sql.fetchval("SELECT current_database()")
    await sql.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    await sql.execute(f"GRANT CREATE ON DATABASE {database} TO {role}")
    parts = urllib.parse.urlsplit(postgres_url)
    netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    store = PostgresStore(parts._replace(netloc=netloc).geturl(), max_connections=1)
    try:
        session = make_session()
        await store.create(session)

        # When steps are committed
        await commit(store, session, step="one")
        await commit(store, session, step="two")

        # Then they land, through the pool
        loaded = await store.load(session.id)
        assert loaded is not None
        assert loaded.steps_done == ["one", "two"]
    finally:
        await store.close()
        await sql.execute(f"DROP OWNED BY {role}")
        await sql.execute(f"DROP ROLE {role}")


# -- records --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "where"),
    [("sessions.snapshot", "snapshot"), ("steps.record", "step 1")],
)
async def test_a_damaged_record_raises_on_every_read(
    pg_store: PostgresStore,
    sql: asyncpg.Connection,
    make_session: MakeSession,
    column: str,
    where: str,
) -> None:
    # Given a session whose snapshot or step record had one byte flipped in the table
    session = make_session(state={"v": "a" * 100})
    await pg_store.create(session)
    await commit(pg_store, session, step="one", output="b" * 100)
    table, field = column.split(".")
    stored = await sql.fetchval(f"SELECT {field} FROM {table}")  # noqa: S608  # test's names
    assert stored[:2] == b"SV"  # the framed, checksummed record, byte for byte
    damaged = bytearray(stored)
    damaged[-10] ^= 0xFF
    await sql.execute(f"UPDATE {table} SET {field} = $1", bytes(damaged))  # noqa: S608

    # When it is read, twice
    for _ in range(2):
        with pytest.raises(CorruptSessionError, match=f"{pg_store.schema} session .*{where}"):
            await pg_store.load(session.id)

    # Then it is still listed (never silently dropped)
    assert [row.id for row in await pg_store.list()] == [session.id]


async def test_steps_are_folded_into_the_snapshot_once_they_outgrow_it(
    postgres_url: str, sql: asyncpg.Connection, make_session: MakeSession
) -> None:
    # Given a store that compacts as soon as the steps outgrow the snapshot
    store = PostgresStore(postgres_url, compact_bytes=1)
    session = make_session()
    await store.create(session)

    # When a step bigger than the snapshot, then a small one, are committed
    await commit(store, session, step="big", output="x" * 10_000)
    await commit(store, session, step="small", output=1)

    # Then the big one was folded into the snapshot, the small one waits in the steps
    assert await sql.fetchval("SELECT array_agg(revision) FROM steps") == [2]
    assert await sql.fetchval("SELECT snapshot_revision FROM sessions") == 1
    assert await store.load(session.id) == session
    await store.close()


async def test_a_workflow_name_postgres_cannot_store_is_refused_whole(
    pg_store: PostgresStore, make_session: MakeSession
) -> None:
    session = make_session(workflow="bad\x00name")  # text columns cannot hold NUL

    with pytest.raises(StorageError):
        await pg_store.create(session)

    assert await pg_store.load(session.id) is None
    assert await pg_store.list() == []
