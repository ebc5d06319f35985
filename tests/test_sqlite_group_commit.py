"""SQLiteStore(durability="batch"): commits that arrive together share one transaction.

The Store contract runs on this mode too (the ``sqlite-batch`` store kind); this
module covers what is particular to it: fewer transactions than commits, a
refused commit failing alone inside its group, a failed group failing every
commit in it, and the keys a lease holder seals with, read once at acquire.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from workflow_support import eventually

from engine import Checkpoint, LeaseLostError, Session, StorageError
from engine.crypto import generate_key
from engine.models import utcnow
from engine.stores import Lease, SQLiteStore

MakeSession = Callable[..., Session]
DEADLINE = 20.0


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
async def make(database: Path) -> AsyncIterator[Callable[..., SQLiteStore]]:
    """Open stores on this test's database file; close them after."""
    built: list[SQLiteStore] = []

    def open_one(**options: Any) -> SQLiteStore:
        store = SQLiteStore(database, **options)
        built.append(store)
        return store

    yield open_one
    for store in built:
        await store.close()


def checkpoint_for(session: Session, step: str) -> Checkpoint:
    now = utcnow()
    return Checkpoint(
        revision=session.revision + 1,
        status="running",
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        step=step,
        output={"step": step},
        state_set={step: session.id},
    )


async def leased(store: SQLiteStore, sessions: list[Session]) -> list[Lease]:
    for session in sessions:
        await store.create(session)
    leases = [await store.acquire(session.id, "runner", ttl=60) for session in sessions]
    assert all(lease is not None for lease in leases)
    return [lease for lease in leases if lease is not None]


@contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """Hold the database's write lock (as another process's transaction would)."""
    with closing(sqlite3.connect(database, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("COMMIT")


async def test_many_sessions_committing_at_once_all_land_in_fewer_transactions(
    make: Callable[..., SQLiteStore], make_session: MakeSession, database: Path
) -> None:
    # Given 40 sessions, each leased, on a batch store
    store = make(durability="batch")
    sessions = [make_session() for _ in range(40)]
    leases = await leased(store, sessions)

    # When each commits three steps, all sessions at once, each round arriving while
    # another writer holds the database (so they are all queued together, whatever
    # the machine's speed, rather than as fast as the store's thread drains them)
    for index in range(3):
        checkpoints = [checkpoint_for(session, f"step-{index}") for session in sessions]
        with write_lock(database):
            commits = [
                asyncio.create_task(store.commit(lease, checkpoint))
                for lease, checkpoint in zip(leases, checkpoints, strict=True)
            ]
            await eventually(lambda: store.queued == 40, within=DEADLINE, what="40 queued")
        await asyncio.gather(*commits)
        for session, checkpoint in zip(sessions, checkpoints, strict=True):
            session.apply(checkpoint)

    # Then every step is stored, as another connection reads the file
    reader = make()
    for session in sessions:
        stored = await reader.load(session.id)
        assert stored is not None
        assert stored.revision == 3
        assert stored.state == {f"step-{index}": session.id for index in range(3)}
    # And the 120 commits shared six transactions at most: a drain that took the
    # first commit of a round before the rest queued, then one for all the rest
    assert 3 <= store.batches <= 6


async def test_a_commit_refused_in_the_middle_of_a_group_fails_alone(
    make: Callable[..., SQLiteStore], make_session: MakeSession, database: Path
) -> None:
    # Given five leased sessions, the middle one taken over by another runner
    store = make(durability="batch")
    sessions = [make_session() for _ in range(5)]
    leases = await leased(store, sessions)
    other = make()
    await other.renew(leases[2], ttl=0)  # the middle lease runs out now
    taken = await other.acquire(sessions[2].id, "other-runner")
    assert taken is not None

    # When all five commit while another writer holds the database, so they queue
    checkpoints = [checkpoint_for(session, "step") for session in sessions]
    with write_lock(database):
        commits = [
            asyncio.create_task(store.commit(lease, checkpoint))
            for lease, checkpoint in zip(leases, checkpoints, strict=True)
        ]
        await eventually(lambda: store.queued == 5, within=DEADLINE, what="five queued commits")
    outcomes = await asyncio.gather(*commits, return_exceptions=True)

    # Then only the middle one failed, with its own error
    assert isinstance(outcomes[2], LeaseLostError)
    assert sessions[2].id in str(outcomes[2])
    assert [outcome for index, outcome in enumerate(outcomes) if index != 2] == [None] * 4
    # And the four others are stored, in at most two transactions
    assert store.batches <= 2
    for index, session in enumerate(sessions):
        stored = await other.load(session.id)
        assert stored is not None
        assert stored.revision == (0 if index == 2 else 1)


async def test_a_commit_out_of_order_in_a_group_fails_alone(
    make: Callable[..., SQLiteStore], make_session: MakeSession, database: Path
) -> None:
    # Given three leased sessions, the second committing a revision that skips one
    store = make(durability="batch")
    sessions = [make_session() for _ in range(3)]
    leases = await leased(store, sessions)
    checkpoints = [checkpoint_for(session, "step") for session in sessions]
    checkpoints[1] = checkpoints[1].model_copy(update={"revision": 2})

    # When they commit together
    with write_lock(database):
        commits = [
            asyncio.create_task(store.commit(lease, checkpoint))
            for lease, checkpoint in zip(leases, checkpoints, strict=True)
        ]
        await eventually(lambda: store.queued == 3, within=DEADLINE, what="three queued commits")
    outcomes = await asyncio.gather(*commits, return_exceptions=True)

    # Then the second alone is refused, and the others are stored
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], StorageError)
    assert "does not follow stored revision 0" in str(outcomes[1])
    revisions = [(await make().load(session.id)) for session in sessions]
    assert [stored.revision if stored else None for stored in revisions] == [1, 0, 1]


async def test_a_group_whose_transaction_fails_fails_every_commit_in_it(
    make: Callable[..., SQLiteStore], make_session: MakeSession, database: Path
) -> None:
    # Given three leased sessions, and a trigger that rolls back the whole
    # transaction when the middle one's step is written (as a full disk might)
    store = make(durability="batch")
    sessions = [make_session() for _ in range(3)]
    leases = await leased(store, sessions)
    with closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute(
            "CREATE TRIGGER fail_group BEFORE INSERT ON stepvault_steps"
            f" WHEN NEW.session_id = '{sessions[1].id}'"
            " BEGIN SELECT RAISE(ROLLBACK, 'simulated failure'); END"
        )

    # When the three commit in one group
    checkpoints = [checkpoint_for(session, "step") for session in sessions]
    with write_lock(database):
        commits = [
            asyncio.create_task(store.commit(lease, checkpoint))
            for lease, checkpoint in zip(leases, checkpoints, strict=True)
        ]
        await eventually(lambda: store.queued == 3, within=DEADLINE, what="three queued commits")
    outcomes = await asyncio.gather(*commits, return_exceptions=True)

    # Then every commit of the failed group raised, naming its own session...
    failed = [outcome for outcome in outcomes if isinstance(outcome, StorageError)]
    assert len(failed) >= 2, outcomes  # the culprit never runs alone: three were queued
    for session, outcome in zip(sessions, outcomes, strict=True):
        if outcome is not None:
            assert isinstance(outcome, StorageError)
            assert session.id in str(outcome) or "simulated failure" in str(outcome)
    assert isinstance(outcomes[1], StorageError)
    assert "simulated failure" in str(outcomes[1])
    # ...and nothing it held is stored; a commit that raised left no trace
    reader = make()
    for session, outcome in zip(sessions, outcomes, strict=True):
        stored = await reader.load(session.id)
        assert stored is not None
        assert stored.revision == (0 if outcome is not None else 1)

    # And once the fault is gone, the same commits go through
    with closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("DROP TRIGGER fail_group")
    for lease, checkpoint, outcome in zip(leases, checkpoints, outcomes, strict=True):
        if outcome is not None:
            await store.commit(lease, checkpoint)
    for session in sessions:
        stored = await reader.load(session.id)
        assert stored is not None
        assert stored.revision == 1


async def test_a_lone_commit_in_batch_mode_is_durable_when_it_returns(
    make: Callable[..., SQLiteStore], make_session: MakeSession
) -> None:
    # Given a batch store and one session
    store = make(durability="batch")
    session = make_session()
    (lease,) = await leased(store, [session])

    # When it commits alone
    await store.commit(lease, checkpoint_for(session, "only"))

    # Then the commit is in the file for any other connection, in its own transaction
    stored = await make().load(session.id)
    assert stored is not None
    assert stored.revision == 1
    assert store.batches == 1
    assert store.queued == 0


@pytest.mark.parametrize("durability", ["fsync", "batch"])
async def test_a_session_encrypted_after_its_lease_ran_out_takes_no_clear_record(
    make: Callable[..., SQLiteStore], make_session: MakeSession, durability: str
) -> None:
    # Given a session in clear, leased by a store without a key (which keeps the
    # session's key state from acquire on)
    plain = make(durability=durability)
    session = make_session()
    await plain.create(session)
    lease = await plain.acquire(session.id, "runner", ttl=0.05)
    assert lease is not None
    await plain.commit(lease, checkpoint_for(session, "first"))
    session.revision += 1

    # When the lease runs out and a store with a key encrypts the session
    keyed = make(encryption_key=generate_key())

    async def rekeyed() -> bool:
        return await keyed.rekey(session.id) == "rekeyed"

    await eventually(rekeyed, within=DEADLINE, what="the rekey after the lease ran out")

    # Then the old holder's next commit is refused, not written in clear
    with pytest.raises(LeaseLostError, match=session.id):
        await plain.commit(lease, checkpoint_for(session, "second"))
    stored = await keyed.load(session.id)
    assert stored is not None
    assert list(stored.state) == ["first"]
    assert (await keyed.check(session.id)).detail == "encrypted"
