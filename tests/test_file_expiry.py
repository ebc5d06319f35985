"""The file store's expiry bounds: a cleanup sweep reads only what may have expired."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from engine import FileStore, Session, SessionLimitError, SessionManager
from engine.models import Checkpoint, utcnow
from engine.stores.file_expiry import EXPIRY, LAG

MakeSession = Callable[..., Session]
MakeFileStore = Callable[..., FileStore]


def bound_of(store: FileStore, session_id: str) -> float | None:
    path = store.path / EXPIRY / session_id
    return path.stat().st_mtime if path.exists() else None


def corrupt(store: FileStore, session_id: str) -> None:
    snapshot = store.path / session_id / "snapshot"
    data = bytearray(snapshot.read_bytes())
    data[-3] ^= 0xFF
    snapshot.write_bytes(bytes(data))


async def test_a_sweep_deletes_the_expired_and_leaves_the_others_unread(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given an expired session, a live one, and a live one damaged on disk
    store = make_file_store()
    now = utcnow()
    expired = make_session(expires_at=now - timedelta(seconds=1))
    live, damaged = make_session(), make_session()
    for session in (expired, live, damaged):
        await store.create(session)
    corrupt(store, damaged.id)

    # When the sweep runs
    result = await SessionManager(store, cleanup_interval=None).perform_cleanup()

    # Then the expired one is gone with its bound, the live ones stay, and the damaged
    # one was not read: its bound says it is live (a listing still reports it)
    assert result.cleaned_sessions == 1
    assert result.skipped == {}
    assert await store.load(expired.id) is None
    assert bound_of(store, expired.id) is None
    assert await store.load(live.id) == live
    rows = {row.id: row for row in await store.list()}
    assert rows[damaged.id].problem is not None


async def test_sessions_without_a_bound_are_read_by_the_sweep_until_a_commit_bounds_them(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given sessions stored before bounds existed (an older stepvault): no bounds
    store = make_file_store()
    expired = make_session(expires_at=utcnow() - timedelta(seconds=1))
    live = make_session()
    for session in (expired, live):
        await store.create(session)
    shutil.rmtree(store.path / EXPIRY)

    # When the sweep runs
    result = await SessionManager(store, cleanup_interval=None).perform_cleanup()

    # Then the expired one is found and deleted, and the live one is left as it was
    # (the sweep writes nothing to a session it does not delete)
    assert result.cleaned_sessions == 1
    assert await store.load(expired.id) is None
    assert await store.load(live.id) == live
    assert bound_of(store, live.id) is None

    # And the live one's next commit under a lease gives it its bound
    lease = await store.acquire(live.id, "runner")
    assert lease is not None
    now = utcnow()
    checkpoint = Checkpoint(
        revision=live.revision + 1,
        status="running",
        last_activity=now,
        expires_at=now + timedelta(hours=1),
    )
    await store.commit(lease, checkpoint)
    assert bound_of(store, live.id) == checkpoint.expires_at.timestamp()
    await store.release(lease)


async def test_a_save_that_moves_the_expiry_earlier_lowers_the_bound(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a live session with its bound an hour ahead
    store = make_file_store()
    session = make_session()
    await store.create(session)
    assert bound_of(store, session.id) == session.expires_at.timestamp()

    # When a save makes it expired already
    session.expires_at = utcnow() - timedelta(seconds=1)
    await store.save(session)

    # Then its bound follows, and the sweep deletes it
    assert bound_of(store, session.id) == session.expires_at.timestamp()
    result = await SessionManager(store, cleanup_interval=None).perform_cleanup()
    assert result.cleaned_sessions == 1
    assert await store.load(session.id) is None


async def test_a_sliding_expiry_moves_the_bound_only_once_it_lags(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a session under a lease with one commit made (the bound set to its expiry)
    store = make_file_store()
    session = make_session()
    await store.create(session)
    lease = await store.acquire(session.id, "runner")
    assert lease is not None
    start = utcnow()

    async def commit_expiring(at: timedelta) -> None:
        checkpoint = Checkpoint(
            revision=session.revision + 1,
            status="running",
            last_activity=start,
            expires_at=start + at,
        )
        await store.commit(lease, checkpoint)
        session.apply(checkpoint)

    await commit_expiring(timedelta(hours=1))
    first = bound_of(store, session.id)
    assert first == (start + timedelta(hours=1)).timestamp()

    # When later commits slide the expiry a little, then by more than the lag
    await commit_expiring(timedelta(hours=1, seconds=LAG / 2))
    assert bound_of(store, session.id) == first  # early by less than LAG: left alone
    await commit_expiring(timedelta(hours=1, seconds=LAG * 2))

    # Then the bound moved up only the second time, never past the stored expiry
    moved = bound_of(store, session.id)
    assert moved == (start + timedelta(hours=1, seconds=LAG * 2)).timestamp()
    stored = await store.load(session.id)
    assert stored is not None
    assert moved <= stored.expires_at.timestamp()
    await store.release(lease)


async def test_a_deleted_session_leaves_no_bound(
    make_file_store: MakeFileStore, make_session: MakeSession, store_path: Path
) -> None:
    store = make_file_store()
    session = make_session()
    await store.create(session)
    assert await store.delete(session.id)
    assert not (store_path / EXPIRY / session.id).exists()


async def test_counting_unexpired_sessions_agrees_with_a_listing(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given live, expired and damaged sessions, some without a bound (an older store's)
    store = make_file_store()
    now = utcnow()
    live = [make_session() for _ in range(3)]
    expired = [make_session(expires_at=now - timedelta(seconds=1)) for _ in range(2)]
    for session in (*live, *expired):
        await store.create(session)
    damaged_live, damaged_expired = live[0], expired[0]
    corrupt(store, damaged_live.id)
    (store.path / EXPIRY / live[1].id).unlink()
    corrupt(store, damaged_expired.id)

    # When they are counted as max_sessions does before a create
    counted = await store.count_unexpired(now)

    # Then the count is the listing's (an unreadable row counts: it has no expiry)
    rows = await store.list()
    assert counted == sum(1 for row in rows if not row.is_expired(now)) == 4
    # And a manager at its limit refuses the next create, one below lets it through
    with pytest.raises(SessionLimitError):
        await SessionManager(store, max_sessions=4, cleanup_interval=None).create_session()
    await SessionManager(store, max_sessions=5, cleanup_interval=None).create_session()
