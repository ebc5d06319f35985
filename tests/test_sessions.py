"""SessionManager: the spec's session API over every store."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Checkpoint,
    EngineError,
    FileStore,
    Session,
    SessionBusyError,
    SessionExpiredError,
    SessionLimitError,
    SessionManager,
    SessionNotFoundError,
    StorageError,
    Store,
    ToolResult,
)
from engine.models import utcnow

MakeSession = Callable[..., Session]

SPEC_CONTEXT = {"user_id": "user123", "ai_provider": "google-ai", "permissions": ["read-data"]}
SPEC_METADATA = {
    "user_agent": "cli/1.0",
    "origin": "tests",
    "tags": ["analysis", "urgent"],
    "request_id": "r-1",
    "client": {"name": "stepvault-tests", "version": 2},
}


def manager_for(store: Store, **options: Any) -> SessionManager:
    """A manager without the background sweep unless a test asks for one."""
    return SessionManager(store, **{"cleanup_interval": None, **options})


async def eventually(condition: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {within} s")
        await asyncio.sleep(0.01)


async def set_times(store: Store, session_id: str, **times: Any) -> Session:
    """Rewrite a stored session's clock fields (e.g. expire it), as a past would have."""
    session = await store.load(session_id)
    assert session is not None
    for name, value in times.items():
        setattr(session, name, value)
    await store.save(session)
    return session


def entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def expire(store: Store, session_id: str) -> None:
    await set_times(store, session_id, expires_at=utcnow() - timedelta(seconds=1))


# -- create, get, update, remove --------------------------------------------------


async def test_a_created_session_comes_back_equal(store: Store) -> None:
    manager = manager_for(store)

    created = await manager.create_session(SPEC_CONTEXT, ttl=7200, metadata=SPEC_METADATA)
    again = await manager.get_session(created.id)

    assert again == created
    assert again is not None
    assert uuid.UUID(created.id).version == 4
    assert again.context.user_id == "user123"
    assert again.context.permissions == ["read-data"]
    assert again.metadata.user_agent == "cli/1.0"
    assert again.metadata.tags == ["analysis", "urgent"]
    assert again.metadata.model_extra == {
        "request_id": "r-1",
        "client": {"name": "stepvault-tests", "version": 2},
    }
    assert again.expires_at == again.created_at + timedelta(seconds=7200)
    assert again.status == "pending"


async def test_update_session_persists_state(store: Store) -> None:
    manager = manager_for(store)
    session = await manager.create_session(SPEC_CONTEXT)

    session.state["testData"] = {"value": 42}
    await manager.update_session(session)
    session.state["more"] = ["é"]
    await manager.update_session(session)

    again = await manager.get_session(session.id)
    assert again is not None
    assert again.state == {"testData": {"value": 42}, "more": ["é"]}
    assert again == session


async def test_update_of_a_stale_copy_is_refused_instead_of_erasing_newer_changes(
    store: Store,
) -> None:
    # Given two copies of one session, the first of them saved with a change
    manager = manager_for(store)
    created = await manager.create_session()
    first, second = await manager.get_session(created.id), await manager.get_session(created.id)
    assert first is not None
    assert second is not None
    first.state["by"] = "first"
    await manager.update_session(first)

    # When the second (read before that change) is saved
    second.state["by"] = "second"
    with pytest.raises(StorageError, match="changed since"):
        await manager.update_session(second)

    # Then the first change survives
    again = await manager.get_session(created.id)
    assert again is not None
    assert again.state == {"by": "first"}


async def test_update_while_a_runner_holds_the_session_is_busy(store: Store) -> None:
    manager = manager_for(store)
    session = await manager.create_session()
    lease = await store.acquire(session.id, "runner")
    assert lease is not None

    session.state["x"] = 1
    with pytest.raises(SessionBusyError):
        await manager.update_session(session)

    await store.release(lease)
    again = await manager.get_session(session.id)
    assert again is not None
    assert again.state == {}


async def test_update_of_an_expired_session_is_refused(store: Store) -> None:
    manager = manager_for(store)
    session = await manager.create_session()
    await expire(store, session.id)
    stale = await store.load(session.id)
    assert stale is not None

    stale.state["late"] = True
    with pytest.raises(SessionExpiredError):
        await manager.update_session(stale)

    stored = await store.load(session.id)
    assert stored is not None
    assert stored.state == {}


async def test_remove_session_reports_whether_it_existed(store: Store) -> None:
    manager = manager_for(store)
    session = await manager.create_session()

    assert await manager.remove_session(session.id) is True
    assert await manager.remove_session(session.id) is False
    assert await manager.get_session(session.id) is None


async def test_get_session_of_a_malformed_id_returns_none_without_touching_disk(
    tmp_path: Path, store_path: Path
) -> None:
    manager = manager_for(FileStore(store_path))

    for bad in ["../etc/passwd", "", "a" * 1000, str(uuid.uuid4()).upper(), str(uuid.uuid1())]:
        assert await manager.get_session(bad) is None

    assert entries(tmp_path) == []  # not even the store's folder was made
    await manager.close()


async def test_get_session_of_an_unknown_id_returns_none(store: Store) -> None:
    assert await manager_for(store).get_session(str(uuid.uuid4())) is None


# -- TTL --------------------------------------------------------------------------


async def test_a_sliding_ttl_extends_from_the_last_activity(store: Store) -> None:
    # Given a session last active 30 minutes ago, with a one hour sliding TTL
    manager = manager_for(store, default_ttl=3600)
    session = await manager.create_session()
    earlier = utcnow() - timedelta(minutes=30)
    session = await set_times(
        store, session.id, last_activity=earlier, expires_at=earlier + timedelta(hours=1)
    )

    # When it is updated
    before = utcnow()
    await manager.update_session(session)

    # Then it expires an hour after this update
    again = await manager.get_session(session.id)
    assert again is not None
    assert again.last_activity >= before
    assert again.expires_at == again.last_activity + timedelta(hours=1)
    assert again.expires_at > earlier + timedelta(hours=1)


async def test_a_fixed_ttl_does_not_extend(store: Store) -> None:
    manager = manager_for(store, default_ttl=3600, ttl_policy="fixed")
    session = await manager.create_session()
    created_expiry = session.expires_at

    session = await set_times(store, session.id, last_activity=utcnow() - timedelta(minutes=30))
    await manager.update_session(session)

    again = await manager.get_session(session.id)
    assert again is not None
    assert again.ttl_policy == "fixed"
    assert again.last_activity > again.created_at
    assert again.expires_at == created_expiry == again.created_at + timedelta(hours=1)


async def test_an_expired_session_is_hidden_until_cleanup_removes_it(store: Store) -> None:
    # Given a session with a tiny TTL, and one with a long TTL
    manager = manager_for(store)
    short = await manager.create_session(ttl=0.05)
    long = await manager.create_session(ttl=3600)

    # When the short one's TTL runs out
    async def short_is_gone() -> bool:
        return await manager.get_session(short.id) is None

    await eventually(short_is_gone)

    # Then it is invisible to get_session and get_active_sessions, but still stored
    assert [s.id for s in await manager.get_active_sessions()] == [long.id]
    assert {s.id for s in await manager.get_all_sessions()} == {short.id, long.id}

    # And cleanup removes it, and only it
    result = await manager.perform_cleanup()
    assert result.cleaned_sessions == 1
    assert result.skipped == {}
    assert result.duration >= 0
    assert [s.id for s in await manager.get_all_sessions()] == [long.id]
    assert (await manager.perform_cleanup()).cleaned_sessions == 0


async def test_cleanup_counts_and_removes_only_expired_sessions(store: Store) -> None:
    manager = manager_for(store)
    sessions = [await manager.create_session() for _ in range(5)]
    for session in sessions[:3]:
        await expire(store, session.id)

    result = await manager.perform_cleanup()

    assert result.cleaned_sessions == 3
    remaining = {row.id for row in await store.list()}
    assert remaining == {session.id for session in sessions[3:]}


@pytest.mark.parametrize("ttl", [0, -1, timedelta(0), timedelta(seconds=-5)])
async def test_a_ttl_of_zero_or_less_is_refused(store: Store, ttl: float | timedelta) -> None:
    manager = manager_for(store)

    with pytest.raises(EngineError, match="positive"):
        await manager.create_session(ttl=ttl)
    with pytest.raises(EngineError, match="positive"):
        manager_for(store, default_ttl=ttl)

    assert await store.list() == []


async def test_max_sessions_is_enforced_and_expired_sessions_do_not_count(store: Store) -> None:
    # Given a limit of two, reached
    manager = manager_for(store, max_sessions=2)
    first = await manager.create_session()
    await manager.create_session()

    # When a third is created, it is refused
    with pytest.raises(SessionLimitError):
        await manager.create_session()
    assert len(await store.list()) == 2

    # Then once one has expired (even before cleanup) there is room again
    await expire(store, first.id)
    third = await manager.create_session()
    assert await manager.get_session(third.id) is not None
    assert len(await store.list()) == 3


# -- metrics ------------------------------------------------------------------------


def tool(name: str) -> ToolResult:
    now = utcnow()
    return ToolResult(name=name, started_at=now, finished_at=now, duration=0.01)


async def test_collect_metrics(store: Store, make_session: MakeSession) -> None:
    # Given two live sessions that lasted 60 s and 120 s, and an expired one of 30 s
    now = utcnow()
    durations = {60: now + timedelta(hours=1), 120: now + timedelta(hours=1), 30: now}
    sessions = []
    for seconds, expires_at in durations.items():
        session = make_session(
            created_at=now - timedelta(seconds=seconds + 10),
            last_activity=now - timedelta(seconds=10),
            expires_at=expires_at,
            status="completed" if seconds == 120 else "running",
        )
        await store.create(session)
        sessions.append(session)

    # And tool history committed under a lease (activity time kept, so durations hold)
    lease = await store.acquire(sessions[0].id, "runner")
    assert lease is not None
    await store.commit(
        lease,
        Checkpoint(
            revision=1,
            status="running",
            last_activity=sessions[0].last_activity,
            expires_at=sessions[0].expires_at,
            tool_results=[tool("search"), tool("search"), tool("summarize")],
        ),
    )
    await store.release(lease)
    lease = await store.acquire(sessions[2].id, "runner")
    assert lease is not None
    await store.commit(
        lease,
        Checkpoint(
            revision=1,
            status="running",
            last_activity=sessions[2].last_activity,
            expires_at=sessions[2].expires_at,
            tool_results=[tool("search")],
        ),
    )
    await store.release(lease)

    # When metrics are collected
    metrics = await manager_for(store).collect_metrics()

    # Then they describe every stored session
    assert metrics.total_sessions == 3
    assert metrics.active_sessions == 2
    assert metrics.average_session_duration == pytest.approx(70.0, abs=1e-3)
    assert metrics.tool_usage_stats == {"search": 3, "summarize": 1}
    assert metrics.status_counts == {"running": 2, "completed": 1}
    assert metrics.unreadable_sessions == 0


async def test_metrics_of_an_empty_store(store: Store) -> None:
    metrics = await manager_for(store).collect_metrics()

    assert (metrics.total_sessions, metrics.active_sessions) == (0, 0)
    assert metrics.average_session_duration == 0.0
    assert metrics.tool_usage_stats == {}


# -- use_session ----------------------------------------------------------------------


async def test_use_session_refreshes_activity_and_saves_on_exit(store: Store) -> None:
    # Given a session last active ten minutes ago
    manager = manager_for(store)
    session = await manager.create_session()
    earlier = utcnow() - timedelta(minutes=10)
    await set_times(store, session.id, last_activity=earlier)

    # When a block uses it
    async with manager.use_session(session.id) as used:
        assert used.last_activity > earlier
        used.state["step"] = 2

    # Then the change and the new activity are stored
    again = await manager.get_session(session.id)
    assert again is not None
    assert again.state == {"step": 2}
    assert again.last_activity > earlier
    assert again.expires_at == again.last_activity + timedelta(seconds=again.ttl)


async def test_use_session_does_not_save_when_the_block_raises(store: Store) -> None:
    manager = manager_for(store)
    session = await manager.create_session(state={"step": 1})
    before = await store.load(session.id)

    async def change_then_fail() -> None:
        async with manager.use_session(session.id) as used:
            used.state["step"] = 99
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await change_then_fail()

    assert await store.load(session.id) == before


async def test_use_session_of_an_unknown_expired_or_malformed_id_raises(store: Store) -> None:
    manager = manager_for(store)
    expired = await manager.create_session()
    await expire(store, expired.id)

    for session_id in [str(uuid.uuid4()), expired.id, "../etc/passwd", ""]:
        with pytest.raises(SessionNotFoundError):
            async with manager.use_session(session_id):
                pytest.fail("the block must not run")


# -- background cleanup and shutdown ------------------------------------------------------


def cleanup_running() -> bool:
    return any(
        task.get_name() == "stepvault-cleanup" and not task.done() for task in asyncio.all_tasks()
    )


async def test_the_background_sweep_removes_expired_sessions_on_its_own(store: Store) -> None:
    # Given a manager sweeping every 20 ms
    async with SessionManager(store, cleanup_interval=0.02) as manager:
        keep = await manager.create_session(ttl=3600)
        doomed = await manager.create_session(ttl=3600)

        # When a session expires
        await expire(store, doomed.id)

        # Then the sweep removes it without being asked, and leaves the other
        async def removed() -> bool:
            return await store.load(doomed.id) is None

        await eventually(removed)
        assert await store.load(keep.id) is not None


async def test_stop_cleanup_stops_the_sweep_for_good(store: Store) -> None:
    manager = SessionManager(store, cleanup_interval=0.02)
    await manager.create_session()
    assert cleanup_running()

    manager.stop_cleanup()

    async def stopped() -> bool:
        return not cleanup_running()

    await eventually(stopped)
    await manager.create_session()  # the manager keeps working, without restarting it
    assert not cleanup_running()
    await manager.close()


async def test_close_is_idempotent_stops_the_sweep_and_closes_the_store(
    store: Store, make_store: Callable[..., Store]
) -> None:
    # Given a manager with a running sweep, and a lease its store holds
    manager = SessionManager(store, cleanup_interval=0.02)
    session = await manager.create_session()
    assert cleanup_running()
    assert await store.acquire(session.id, "runner") is not None

    # When it closes, twice
    await manager.close()
    await manager.close()

    # Then the sweep is gone and the store released what it held
    assert not cleanup_running()
    other = make_store() if isinstance(store, FileStore) else store
    assert await other.acquire(session.id, "someone-else") is not None
