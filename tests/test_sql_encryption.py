"""Encryption at rest in the SQLite, PostgreSQL and memory stores.

Real database files and the real test server: round trips, nothing in clear in the
database's bytes or columns, tampering and swapped records, wrong keys, rekeying,
shredding, and ``stepvault verify`` / ``rekey`` on database URLs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    EngineError,
    MemoryStore,
    Session,
    SessionManager,
    Store,
    ToolResult,
    codec,
    open_store,
)
from engine.cli import app
from engine.crypto import Encryption, KeyRing, generate_key
from engine.models import Event, utcnow
from engine.stores import PostgresStore, SQLiteStore

MakeSession = Callable[..., Session]
MARK = "Qx9-plaintext-marker"
KINDS = ["sqlite", "postgres", "memory"]


def key_id(key: str) -> str:
    return Encryption(KeyRing(key)).active_key_id


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where this test's sessions live (``memory://`` is one store's memory)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"
    if kind == "postgres":
        pg: str = request.getfixturevalue("postgres_url")
        return pg
    return "memory://"


@pytest.fixture
async def make(kind: str, url: str) -> AsyncIterator[Callable[..., Store]]:
    """Open stores on this test's database (memory: always the same store)."""
    built: list[Store] = []
    memory: dict[str, Store] = {}

    def open_one(key: Any = None, **options: Any) -> Store:
        store: Store
        if kind == "memory":
            store = memory.setdefault("one", MemoryStore(encryption_key=key))
        elif kind == "sqlite":
            store = SQLiteStore(url.removeprefix("sqlite:///"), encryption_key=key, **options)
        else:
            store = PostgresStore(url, encryption_key=key, **options)
        built.append(store)
        return store

    yield open_one
    for store in built:
        await store.close()


def shared(kind: str) -> None:
    if kind == "memory":
        pytest.skip("a memory store cannot be opened again, under another key")


async def stored_bytes(kind: str, url: str, store: Store) -> bytes:
    """Everything the store keeps, as the bytes someone with a copy of it would see."""
    if kind == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.is_file())
    if kind == "postgres":
        assert isinstance(store, PostgresStore)
        pool = await store._connect()
        tables = await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", store.schema
        )
        text = []
        for table in tables:
            query = f"SELECT t::text AS row FROM {store.schema}.{table[0]} AS t"  # noqa: S608
            rows = await pool.fetch(query)
            text += [row["row"] for row in rows]
        return "\n".join(text).encode()
    assert isinstance(store, MemoryStore)
    return repr(store._sessions).encode() + repr(store._vault).encode()


def leaks(data: bytes) -> bool:
    return MARK.encode() in data or MARK.encode().hex().encode() in data


async def build(store: Store, session: Session, *, steps: int = 2, event: bool = True) -> None:
    """Store ``session`` with ``steps`` checkpoints and one posted event, all holding MARK."""
    await store.create(session)
    lease = await store.acquire(session.id, "test")
    assert lease is not None
    for index in range(steps):
        now = utcnow()
        result = ToolResult(
            name=f"step-{index}",
            output=MARK,
            error=f"{MARK} failed",
            started_at=now,
            finished_at=now,
            duration=0.0,
        )
        await store.commit(
            lease,
            Checkpoint(
                revision=index + 1,
                status="running",
                last_activity=now,
                expires_at=session.expires_at,
                step=f"step-{index}",
                output={"secret": f"{MARK}-{index}"},
                state_set={"diagnosis": MARK},
                tool_results=[result],
                error=MARK,
            ),
        )
    await store.release(lease)
    if event:
        sent = Event(
            id=str(uuid.uuid4()), name="approved", payload={"note": MARK}, sent_at=utcnow()
        )
        await store.post_event(session.id, sent)  # type: ignore[attr-defined]


def secret_session(make_session: MakeSession, **fields: Any) -> Session:
    return make_session(
        state={"input": MARK},
        metadata={"user_agent": MARK, "tags": [MARK], "origin": MARK},
        context={"user_id": MARK},
        **fields,
    )


# -- round trips, nothing in clear ----------------------------------------------------


async def test_an_encrypted_session_round_trips_and_no_plaintext_is_stored(
    kind: str, url: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    # Given sessions with steps, tool results, errors and a posted event, under a key
    key = generate_key()
    store = make(key, **({} if kind == "memory" else {"compact_bytes": 1}))
    folded, kept = secret_session(make_session), secret_session(make_session)
    await build(store, folded, steps=3)
    await build(make(key), kept, steps=2)

    # When they are read back (by another store of the same database)
    again = await make(key).load(folded.id)

    # Then everything is there, and the marker is nowhere in what the store keeps
    assert again is not None
    assert again.state == {"input": MARK, "diagnosis": MARK}
    assert again.outputs["step-2"] == {"secret": f"{MARK}-2"}
    assert again.metadata.tags == [MARK]
    assert [result.error for result in again.tool_history] == [f"{MARK} failed"] * 3
    assert [event.payload for event in again.inbox] == [{"note": MARK}]
    assert {row.id for row in await store.list()} == {folded.id, kept.id}
    assert not leaks(await stored_bytes(kind, url, store))


async def test_a_store_without_a_key_is_told_which_key_is_missing_and_changes_nothing(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    # Given an expired encrypted session
    key, other = generate_key(), generate_key()
    session = secret_session(make_session, expires_at=utcnow() - timedelta(seconds=1))
    await build(make(key), session, steps=1)

    # When stores without the key read it, check it and clean up
    for wrong in (None, other):
        store = make(wrong)
        with pytest.raises(DecryptionError, match=key_id(key)) as raised:
            await store.load(session.id)
        assert not isinstance(raised.value, CorruptSessionError)
        check = await store.check(session.id)  # type: ignore[attr-defined]
        assert check.verdict == "undecryptable"
        result = await SessionManager(store, cleanup_interval=None).perform_cleanup()
        assert result.cleaned_sessions == 0
        assert session.id in result.skipped

    # Then nothing was removed or changed: the right key still reads everything
    again = await make(key).load(session.id)
    assert again is not None
    assert again.state["diagnosis"] == MARK


async def test_a_session_in_clear_stays_readable_and_rekey_encrypts_it(
    kind: str, url: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    # Given a session written before a key was given
    session = secret_session(make_session)
    await build(make(None), session, steps=1)
    key = generate_key()
    store = make(key)

    # Then a store with a key reads it and can go on writing it in clear
    assert (await store.check(session.id)).detail == "in clear"  # type: ignore[attr-defined]
    lease = await store.acquire(session.id, "test")
    assert lease is not None
    now = utcnow()
    await store.commit(
        lease, Checkpoint(revision=2, status="running", last_activity=now, expires_at=now)
    )
    await store.release(lease)

    # And a rekey encrypts it: nothing of it stays in clear
    assert await store.rekey(session.id) == "rekeyed"  # type: ignore[attr-defined]
    assert (await make(key).check(session.id)).detail == "encrypted"  # type: ignore[attr-defined]
    assert (await make(key).load(session.id)).state["diagnosis"] == MARK  # type: ignore[union-attr]
    # (PostgreSQL: the rows replaced stay as dead tuples until vacuum; live ones are checked.)
    assert not leaks(await stored_bytes(kind, url, make(key)))


# -- tampering ----------------------------------------------------------------------


def _records(kind: str) -> list[tuple[str, str, str]]:
    """(table, record column, key column) of each kind of record, per store."""
    if kind == "sqlite":
        return [
            ("stepvault_snapshots", "record", "session_id"),
            ("stepvault_steps", "record", "session_id"),
            ("stepvault_events", "record", "session_id"),
        ]
    return [("sessions", "snapshot", "id"), ("steps", "record", "session_id"),
            ("events", "record", "session_id")]  # fmt: skip


async def rows(store: Store, table: str, column: str, where: str, session_id: str) -> list[Any]:
    """Return ``(rowid-ish, record)`` pairs of a session's records in ``table``."""
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path)) as db:
            return db.execute(
                f"SELECT rowid, {column} FROM {table} WHERE {where} = ?",  # noqa: S608
                (session_id,),
            ).fetchall()
    assert isinstance(store, PostgresStore)
    pool = await store._connect()
    number = {"sessions": "0", "steps": "revision", "events": "seq"}[table]
    found = await pool.fetch(
        f"SELECT {number} AS n, {column} FROM {store.schema}.{table} WHERE {where} = $1",  # noqa: S608
        session_id,
    )
    # A row's place: its primary key (a ctid changes with every update).
    return [(f"{where} = '{session_id}' AND {number} = {row['n']}", row[1]) for row in found]


async def put(store: Store, table: str, column: str, place: Any, record: bytes) -> None:
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            query = f"UPDATE {table} SET {column} = ? WHERE rowid = ?"  # noqa: S608
            db.execute(query, (record, place))
        return
    assert isinstance(store, PostgresStore)
    pool = await store._connect()
    await pool.execute(
        f"UPDATE {store.schema}.{table} SET {column} = $1 WHERE {place}",  # noqa: S608
        record,
    )


def reframed(record: bytes, flip_at: int) -> bytes:
    """The record with one body byte flipped and its checksums made valid again."""
    frame = codec.scan_frames(record, "test").frames[0]
    body = bytearray(frame.body)
    body[flip_at % len(body)] ^= 0x01
    return codec.encode_frame(frame.seq, bytes(body), frame.flags)


@pytest.mark.parametrize("flip_at", [0, 10, 25, -1], ids=["key-id", "nonce", "text", "tag"])
async def test_a_changed_byte_in_any_record_is_detected(
    kind: str, make: Callable[..., Store], make_session: MakeSession, flip_at: int
) -> None:
    shared(kind)
    key = generate_key()
    store = make(key)
    session = secret_session(make_session)
    await build(store, session, steps=1)
    for table, column, where in _records(kind):
        # Given one record of the session changed by one byte (its CRCs still valid)
        ((place, record),) = await rows(store, table, column, where, session.id)
        await put(store, table, column, place, reframed(bytes(record), flip_at))

        # Then every read of the session says it is corrupt, naming it
        with pytest.raises(CorruptSessionError, match=session.id):
            await make(key).load(session.id)
        assert (await make(key).check(session.id)).verdict == "corrupt"  # type: ignore[attr-defined]

        await put(store, table, column, place, bytes(record))
        assert await make(key).load(session.id) is not None


async def test_a_deleted_last_step_is_detected_not_rolled_back_to(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    key = generate_key()
    store = make(key)
    session = secret_session(make_session)
    await build(store, session, steps=2)
    steps_table = "stepvault_steps" if kind == "sqlite" else "steps"
    found = await rows(store, steps_table, "record", "session_id", session.id)

    # Given the session's last step record deleted (each record alone still valid)
    last_place, _ = found[-1]
    if isinstance(store, SQLiteStore):
        with closing(sqlite3.connect(store.path, isolation_level=None)) as db:
            db.execute(f"DELETE FROM {steps_table} WHERE rowid = ?", (last_place,))  # noqa: S608
    else:
        assert isinstance(store, PostgresStore)
        pool = await store._connect()
        await pool.execute(f"DELETE FROM {store.schema}.steps WHERE {last_place}")  # noqa: S608

    # Then the session does not load one checkpoint back in time: it is corrupt
    with pytest.raises(CorruptSessionError, match="step records are missing"):
        await make(key).load(session.id)
    assert (await make(key).check(session.id)).verdict == "corrupt"  # type: ignore[attr-defined]

    # And a rekey refuses it rather than make the rollback permanent
    rekeyer = make(KeyRing(generate_key(), [key]))
    with pytest.raises(CorruptSessionError, match="step records are missing"):
        await rekeyer.rekey(session.id)  # type: ignore[attr-defined]
    with pytest.raises(CorruptSessionError):
        await make(key).load(session.id)


async def test_records_swapped_between_sessions_are_detected(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    key = generate_key()
    store = make(key)
    first, second = secret_session(make_session), secret_session(make_session)
    await build(store, first, steps=1)
    await build(store, second, steps=1)
    for table, column, where in _records(kind):
        # Given the same kind of record exchanged between the two sessions
        ((mine, a),) = await rows(store, table, column, where, first.id)
        ((theirs, b),) = await rows(store, table, column, where, second.id)
        await put(store, table, column, mine, bytes(b))
        await put(store, table, column, theirs, bytes(a))

        # Then neither session loads
        for session in (first, second):
            with pytest.raises(CorruptSessionError, match=session.id):
                await make(key).load(session.id)

        await put(store, table, column, mine, bytes(a))
        await put(store, table, column, theirs, bytes(b))


async def test_memory_store_seals_what_it_keeps_and_detects_tampering(
    make_session: MakeSession,
) -> None:
    store = MemoryStore(encryption_key=generate_key())
    session = secret_session(make_session)
    await build(store, session, steps=1)
    stored = store._sessions[session.id]

    stored.snapshot = reframed(stored.snapshot, 25)

    with pytest.raises(CorruptSessionError, match=session.id):
        await store.load(session.id)
    assert await store.shred(session.id)
    assert await store.load(session.id) is None
    plain = MemoryStore()
    kept = await SessionManager(plain, cleanup_interval=None).create_session()
    with pytest.raises(EngineError, match="cannot shred"):
        await plain.shred(kept.id)


# -- rekeying and shredding ---------------------------------------------------------


async def test_rekey_moves_a_session_to_the_new_key_and_the_old_key_no_longer_reads_it(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    # Given a session with steps and a posted event under the old key
    old, new = generate_key(), generate_key()
    session = secret_session(make_session)
    await build(make(old), session, steps=2)
    rotating = make(KeyRing(new, old=[old]))

    # When it is rekeyed (twice: the second does nothing)
    assert await rotating.rekey(session.id) == "rekeyed"  # type: ignore[attr-defined]
    assert await rotating.rekey(session.id) == "current"  # type: ignore[attr-defined]

    # Then the new key alone reads all of it, and the old key alone reads none of it
    again = await make(new).load(session.id)
    assert again is not None
    assert again.outputs["step-1"] == {"secret": f"{MARK}-1"}
    assert [event.payload for event in again.inbox] == [{"note": MARK}]
    with pytest.raises(DecryptionError, match=key_id(new)):
        await make(old).load(session.id)


async def test_rekey_leaves_a_session_a_runner_holds_alone(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    old, new = generate_key(), generate_key()
    session = secret_session(make_session)
    holder = make(old)
    await build(holder, session, steps=1)
    lease = await holder.acquire(session.id, "runner", ttl=60)
    assert lease is not None

    assert await make(KeyRing(new, old=[old])).rekey(session.id) == "busy"  # type: ignore[attr-defined]

    now = utcnow()
    await holder.commit(
        lease, Checkpoint(revision=2, status="running", last_activity=now, expires_at=now)
    )
    assert (await make(old).load(session.id)) is not None


async def test_a_shredded_session_cannot_be_read_back_even_with_the_master_key(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    # Given a copy of a session's records, taken before it is shredded
    key = generate_key()
    store = make(key)
    session = secret_session(make_session)
    await build(store, session, steps=1)
    copies = {
        (table, column, where): await rows(store, table, column, where, session.id)
        for table, column, where in _records(kind)
    }

    # When it is shredded, and the records come back (restored from that copy)
    assert await SessionManager(store, cleanup_interval=None).remove_session(session.id, shred=True)
    assert await make(key).load(session.id) is None
    await build(make(None), Session.model_validate(session.model_dump()), steps=1)
    for (table, column, where), copied in copies.items():
        for (place, _), (_, record) in zip(
            await rows(store, table, column, where, session.id), copied, strict=True
        ):
            await put(store, table, column, place, bytes(record))

    # Then the master key cannot read them: their data key is gone
    with pytest.raises(DecryptionError, match="no data key"):
        await make(key).load(session.id)


async def test_shredding_leaves_the_key_in_neither_the_sqlite_file_nor_its_log(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a backup of the database taken while the session lived
    key, path = generate_key(), tmp_path / "sessions.db"
    store = SQLiteStore(path, encryption_key=key)
    session = secret_session(make_session)
    await build(store, session, steps=1)
    backup = tmp_path / "backup" / "sessions.db"
    backup.parent.mkdir()
    with closing(sqlite3.connect(path)) as live, closing(sqlite3.connect(backup)) as copy:
        live.backup(copy)
        ((wrapped,),) = copy.execute(
            "SELECT record FROM stepvault_session_keys WHERE name = ?", (session.id,)
        ).fetchall()

    # When it is shredded
    assert await store.shred(session.id)

    # Then its wrapped key is in no byte of the database's files, its log included,
    # while the store is still open (closing it would empty the log anyway)
    live_bytes = await asyncio.to_thread(
        lambda: b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    )
    await store.close()
    assert len(wrapped) > 50
    assert bytes(wrapped) not in live_bytes
    assert bytes(wrapped)[20:40] not in live_bytes


async def test_shredding_a_session_in_clear_is_refused_and_removes_nothing(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    session = secret_session(make_session)
    await build(make(None), session, steps=1)

    with pytest.raises(EngineError, match="stored in clear"):
        await make(generate_key()).shred(session.id)  # type: ignore[attr-defined]

    assert await make(None).load(session.id) is not None


async def test_a_passphrase_is_stretched_under_the_databases_own_salt(
    kind: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    session = secret_session(make_session)
    await build(make("correct horse battery staple"), session, steps=1)

    assert await make("correct horse battery staple").load(session.id) is not None
    with pytest.raises(DecryptionError):
        await make("wrong horse battery staple").load(session.id)


async def test_a_version_2_database_gains_the_key_table_and_its_sessions_stay_readable(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a database as stepvault left it before encryption (schema version 2)
    path = tmp_path / "old.db"
    session = secret_session(make_session)
    await build(SQLiteStore(path), session, steps=1)
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("DROP TABLE stepvault_session_keys")
        db.execute("DROP TABLE stepvault_quarantine")
        db.execute("DELETE FROM stepvault_schema WHERE version = 3")

    # When a store with a key opens it
    store = SQLiteStore(path, encryption_key=generate_key())
    try:
        assert await store.migrate() == 3
        # Then its session reads, in clear, and the rekey encrypts it
        assert (await store.load(session.id)) is not None
        assert await store.rekey(session.id) == "rekeyed"
        assert (await store.check(session.id)).detail == "encrypted"
    finally:
        await store.close()


# -- the command line ----------------------------------------------------------------


def cli(url: str, *args: str, key: str | None = None, old: str | None = None) -> Result:
    env = {
        "STEPVAULT_STORE": url,
        "SESSION_ENCRYPTION_KEY": key,
        "SESSION_ENCRYPTION_OLD_KEYS": old,
    }
    return CliRunner().invoke(app, [*args, "--json"], env=env)


def verdicts(result: Result) -> dict[str, dict[str, Any]]:
    return {row["session_id"]: row for row in json.loads(result.stdout)}


async def test_verify_and_rekey_work_on_a_database_url(
    kind: str, url: str, make: Callable[..., Store], make_session: MakeSession
) -> None:
    shared(kind)
    # Given two sessions under the old key, one of them corrupt
    old, new = generate_key(), generate_key()
    store = make(old)
    healthy, broken = secret_session(make_session), secret_session(make_session)
    await build(store, healthy, steps=1)
    await build(store, broken, steps=1)
    table, column, where = _records(kind)[1]
    ((place, record),) = await rows(store, table, column, where, broken.id)
    await put(store, table, column, place, reframed(bytes(record), 25))
    await store.close()

    # Then verify tells them apart, and --quarantine moves the corrupt one aside
    checked = await asyncio.to_thread(cli, url, "verify", key=old)
    assert checked.exit_code == 1
    assert verdicts(checked)[healthy.id]["detail"] == "encrypted"
    assert verdicts(checked)[broken.id]["verdict"] == "corrupt"
    moved = await asyncio.to_thread(cli, url, "verify", "--quarantine", key=old)
    assert moved.stdout, moved.stderr
    assert "quarantine" in verdicts(moved)[broken.id]["quarantined_to"]
    assert (await asyncio.to_thread(cli, url, "verify", key=old)).exit_code == 0

    # And rekey moves the rest to the new key, which alone then verifies it
    rekeyed = await asyncio.to_thread(cli, url, "rekey", key=new, old=old)
    assert rekeyed.exit_code == 0, rekeyed.output
    assert [row["outcome"] for row in json.loads(rekeyed.stdout)] == ["rekeyed"]
    after = await asyncio.to_thread(cli, url, "verify", key=new)
    assert after.exit_code == 0
    assert set(verdicts(after)) == {healthy.id}
    stale = await asyncio.to_thread(cli, url, "verify", key=old)
    assert verdicts(stale)[healthy.id]["verdict"] == "undecryptable"


def test_open_store_passes_the_key_to_every_store(tmp_path: Path) -> None:
    key = generate_key()
    for url in (f"sqlite:///{tmp_path / 'a.db'}", "postgresql://h/db", "memory://"):
        assert "encrypted" in repr(open_store(url, encryption_key=key))
        assert "encrypted" not in repr(open_store(url))
