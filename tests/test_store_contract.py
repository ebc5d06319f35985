"""The Store contract: every store (memory, file, SQLite, PostgreSQL) passes it unchanged.

A new store is done when it passes this module; the session manager's TTL, cleanup
and limit tests (test_sessions.py) run on every store too. Lease tests that need a
lease to run out while its holder lives apply to the stores whose leases expire by
time (SQLite, PostgreSQL): a file store's lock lasts exactly as long as its
holder's process, and a memory store's holder cannot vanish.

The inbox tests run on every store that takes events without the lease
(``engine.events.EventInbox``) and skip, saying so, on a store that does not.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Checkpoint,
    InvalidSessionIdError,
    Lease,
    LeaseLostError,
    SerializationError,
    Session,
    SessionBusyError,
    SessionExistsError,
    SessionInfo,
    SessionLimitError,
    SessionManager,
    SessionNotFoundError,
    StorageError,
    Store,
    ToolResult,
)
from engine.events import EventInbox
from engine.models import Event, utcnow
from engine.stores.base import PagedListing, UnfinishedListing, list_pages

MakeSession = Callable[..., Session]
MakeStore = Callable[..., Store]

DEADLINE = 15.0
"""Seconds a polled condition may take before the test fails: a hang, not slowness."""

HOLD_AND_DIE = """
import asyncio, os, signal, sys
from engine import open_store

async def main():
    lease = await open_store(sys.argv[1]).acquire(sys.argv[2], "doomed", ttl=float(sys.argv[3]))
    print("held" if lease else "refused", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # die holding it: no release, no close

asyncio.run(main())
"""


def checkpoint_for(session: Session, **changes: Any) -> Checkpoint:
    """The checkpoint that follows ``session``'s revision."""
    now = utcnow()
    values: dict[str, Any] = {
        "revision": session.revision + 1,
        "status": "running",
        "last_activity": now,
        "expires_at": now + timedelta(hours=1),
    }
    values.update(changes)
    return Checkpoint(**values)


def tool_result(name: str, output: Any = None, error: str | None = None) -> ToolResult:
    now = utcnow()
    return ToolResult(
        name=name, output=output, error=error, started_at=now, finished_at=now, duration=0.0
    )


async def commit(store: Store, lease: Lease, session: Session, **changes: Any) -> Checkpoint:
    """Commit the next checkpoint and apply it to ``session`` as a runner would."""
    checkpoint = checkpoint_for(session, **changes)
    await store.commit(lease, checkpoint)
    session.apply(checkpoint)
    return checkpoint


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


async def lease_for(
    store: Store, session_id: str, owner: str = "runner-a", *, ttl: float = 30.0
) -> Lease:
    lease = await store.acquire(session_id, owner, ttl=ttl)
    assert lease is not None
    return lease


async def take_over(store: Store, session_id: str, owner: str) -> Lease:
    """Poll ``acquire`` until the current holder's lease lets go; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while (lease := await store.acquire(session_id, owner)) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{owner} could not take session {session_id} over in {DEADLINE} s")
        await asyncio.sleep(0.02)
    return lease


def only_where_leases_expire(leases_expire: bool) -> None:
    if not leases_expire:
        pytest.skip("this store's leases last as long as their holder: none runs out")


def second_view(store: Store, make_store: MakeStore, store_url: str | None) -> Store:
    """Another store over the same sessions (another process's view), else this one."""
    return store if store_url is None else make_store()


# -- create and load ------------------------------------------------------------


async def test_create_then_load_returns_every_field(
    store: Store, make_session: MakeSession
) -> None:
    now = utcnow()
    session = make_session(
        context={
            "user_id": "ユーザー-1",
            "ai_provider": "google-ai",
            "permissions": ["r", "w"],
            "tenant": {"id": 7, "name": "Zoë"},
        },
        state={
            "testData": {"value": 42, "nested": [1, 2.5, None, True, {"deep": ["é", "🚀"]}]},
            "big": "x" * (1 << 20),
            "ключ": "значение",
            "nul": "a\u0000b",
        },
        tool_history=[
            tool_result("fetch", output={"pages": ["a", "b"]}),
            tool_result("fetch", error="TimeoutError: slow"),
        ],
        metadata={
            "user_agent": "cli/1.0",
            "origin": "tests",
            "tags": ["analysis", "日本"],
            "priority": 3,
            "owner": {"team": "data"},
        },
        created_at=now - timedelta(minutes=5),
        last_activity=now,
        expires_at=now + timedelta(hours=2),
        ttl=7200.0,
        ttl_policy="fixed",
        status="waiting",
        workflow="report",
        workflow_version="2",
        workflow_fingerprint="abc123",
        workflow_source="def fetch(): ...",
        input={"query": "q"},
        steps_done=["fetch"],
        outputs={"fetch": ["a", "b"]},
        attempts={"fetch": 2},
        error=None,
    )

    await store.create(session)
    loaded = await store.load(session.id)

    assert loaded == session
    assert loaded is not session
    assert loaded.model_dump() == session.model_dump()


async def test_stored_session_is_isolated_from_the_callers_objects(
    store: Store, make_session: MakeSession
) -> None:
    # Given a stored session
    session = make_session(state={"items": [1]})
    await store.create(session)

    # When the caller mutates what it passed in and what it loaded
    session.state["items"].append(2)
    loaded = await store.load(session.id)
    assert loaded is not None
    loaded.state["items"].append(3)

    # Then the stored session is unchanged
    again = await store.load(session.id)
    assert again is not None
    assert again.state == {"items": [1]}


async def test_create_of_an_existing_id_raises_and_keeps_the_original(
    store: Store, make_session: MakeSession
) -> None:
    original = make_session(state={"v": 1})
    await store.create(original)

    with pytest.raises(SessionExistsError, match=original.id):
        await store.create(make_session(id=original.id, state={"v": 2}))

    assert await store.load(original.id) == original


async def test_load_of_an_unknown_id_returns_none(store: Store) -> None:
    assert await store.load(str(uuid.uuid4())) is None


async def test_non_finite_floats_round_trip_instead_of_becoming_null(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session(state={"ratio": math.nan, "bounds": [-math.inf, math.inf]})
    await store.create(session)
    lease = await lease_for(store, session.id)
    await commit(store, lease, session, step="divide", output={"r": math.nan, "top": math.inf})

    loaded = await store.load(session.id)

    assert loaded is not None
    assert math.isnan(loaded.state["ratio"])
    assert loaded.state["bounds"] == [-math.inf, math.inf]
    assert math.isnan(loaded.outputs["divide"]["r"])
    assert loaded.outputs["divide"]["top"] == math.inf


async def test_create_refuses_state_that_is_not_json(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session(state={"blob": b"\xff\xfe", "lone": "\ud800"})

    with pytest.raises(SerializationError):
        await store.create(session)

    assert await store.load(session.id) is None
    assert await store.list() == []


# -- session ids ----------------------------------------------------------------

BAD_IDS = [
    pytest.param("../x", id="dot-dot"),
    pytest.param("", id="empty"),
    pytest.param("a" * 1000, id="very-long"),
    pytest.param(str(uuid.uuid4()).upper(), id="uppercase-uuid4"),
    pytest.param(str(uuid.uuid1()), id="uuid1"),
    pytest.param(f"{{{uuid.uuid4().hex}}}", id="braces-no-hyphens"),
    pytest.param(uuid.uuid4().hex, id="no-hyphens"),
    pytest.param("../../" + str(uuid.uuid4())[6:], id="dot-dot-36-chars"),
    pytest.param(123, id="int"),
    pytest.param(None, id="none"),
    pytest.param(uuid.uuid4(), id="uuid-object"),
]


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_every_method_rejects_an_invalid_id_before_touching_storage(
    store: Store, make_session: MakeSession, tmp_path: Path, bad_id: object
) -> None:
    # Given a session object and a lease that carry the bad id (bypassing validation)
    good = make_session()
    session = Session.model_construct(**{**dict(good), "id": bad_id})
    lease = Lease(bad_id, "runner-a")  # type: ignore[arg-type]
    checkpoint = checkpoint_for(good)

    # When every id-taking method is called with it
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.create(session),
        lambda: store.load(bad_id),  # type: ignore[arg-type]
        lambda: store.save(session),
        lambda: store.commit(lease, checkpoint),
        lambda: store.delete(bad_id),  # type: ignore[arg-type]
        lambda: store.acquire(bad_id, "runner-a"),  # type: ignore[arg-type]
        lambda: store.release(lease),
    ]
    for call in calls:
        with pytest.raises(InvalidSessionIdError):
            await call()

    # Then nothing was created anywhere (not even the store's folder)
    assert tree(tmp_path) == []
    assert await store.list() == []


# -- leases and commits ---------------------------------------------------------


async def test_commit_applies_a_checkpoint_atomically(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session(state={"keep": 1, "drop": 2})
    await store.create(session)
    lease = await lease_for(store, session.id)

    await commit(
        store,
        lease,
        session,
        step="fetch",
        output={"pages": ["a"]},
        state_set={"added": [1, 2]},
        state_unset=["drop"],
        tool_results=[tool_result("fetch", output={"pages": ["a"]})],
        attempts={"fetch": 1},
    )

    loaded = await store.load(session.id)
    assert loaded == session
    assert loaded.revision == 1
    assert loaded.steps_done == ["fetch"]
    assert loaded.state == {"keep": 1, "added": [1, 2]}
    assert [r.name for r in loaded.tool_history] == ["fetch"]


async def test_commit_requires_the_lease(store: Store, make_session: MakeSession) -> None:
    session = make_session()
    await store.create(session)

    # Without ever acquiring
    with pytest.raises(LeaseLostError):
        await store.commit(Lease(session.id, "runner-a"), checkpoint_for(session))

    # After releasing
    lease = await lease_for(store, session.id)
    await store.release(lease)
    with pytest.raises(LeaseLostError):
        await store.commit(lease, checkpoint_for(session))

    assert await store.load(session.id) == session


async def test_a_lease_someone_else_holds_cannot_commit(
    store: Store, make_session: MakeSession
) -> None:
    # Given runner-b holds the lease
    session = make_session()
    await store.create(session)
    held = await lease_for(store, session.id, "runner-b")

    # When runner-a commits with a lease it made up, or with one it released earlier
    with pytest.raises(LeaseLostError):
        await store.commit(Lease(session.id, "runner-a"), checkpoint_for(session))

    # Then nothing was written
    assert await store.load(session.id) == session
    await store.release(held)


async def test_a_stale_lease_cannot_commit_after_the_session_changed_hands(
    store: Store, make_session: MakeSession
) -> None:
    # Given runner-a acquired and released, then runner-b acquired
    session = make_session()
    await store.create(session)
    stale = await lease_for(store, session.id, "runner-a")
    await store.release(stale)
    current = await lease_for(store, session.id, "runner-b")

    # When runner-a commits with its old lease
    with pytest.raises(LeaseLostError):
        await store.commit(stale, checkpoint_for(session))

    # Then the session is untouched and runner-b still commits
    assert await store.load(session.id) == session
    await commit(store, current, session, step="one")
    assert await store.load(session.id) == session


async def test_acquire_twice_returns_none_the_second_time(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session()
    await store.create(session)
    first = await lease_for(store, session.id, "runner-a")

    assert await store.acquire(session.id, "runner-b") is None
    assert await store.acquire(session.id, "runner-a") is None

    await store.release(first)
    assert await store.acquire(session.id, "runner-b") is not None


async def test_release_twice_is_harmless(store: Store, make_session: MakeSession) -> None:
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)

    await store.release(lease)
    await store.release(lease)

    assert await store.acquire(session.id, "runner-b") is not None


async def test_acquire_of_an_unknown_session_raises(store: Store) -> None:
    with pytest.raises(SessionNotFoundError):
        await store.acquire(str(uuid.uuid4()), "runner-a")


@pytest.mark.parametrize("bad_revision", [0, 1, 3])
async def test_commit_revision_must_follow_the_stored_one(
    store: Store, make_session: MakeSession, bad_revision: int
) -> None:
    # Given a session at revision 1
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)
    await commit(store, lease, session, step="one", output=1)

    # When a checkpoint that does not follow revision 1 is committed
    with pytest.raises(StorageError, match="revision"):
        await store.commit(lease, checkpoint_for(session, revision=bad_revision, step="two"))

    # Then the session is unchanged and the right revision still commits
    assert await store.load(session.id) == session
    await commit(store, lease, session, step="two", output=2)
    assert await store.load(session.id) == session


async def test_commit_refuses_an_output_that_is_not_json(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)

    with pytest.raises(SerializationError):
        await store.commit(lease, checkpoint_for(session, step="one", output=object()))

    assert await store.load(session.id) == session
    await commit(store, lease, session, step="one", output="fine")
    assert await store.load(session.id) == session


async def test_commit_to_a_deleted_session_fails(store: Store, make_session: MakeSession) -> None:
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)
    assert await store.delete(session.id)

    with pytest.raises((LeaseLostError, SessionNotFoundError)):
        await store.commit(lease, checkpoint_for(session))

    assert await store.load(session.id) is None


# -- save, delete, list ---------------------------------------------------------


async def test_save_replaces_the_session_whole_and_bumps_the_revision(
    store: Store, make_session: MakeSession
) -> None:
    # Given a session with a committed step
    session = make_session(state={"a": 1, "b": 2})
    await store.create(session)
    lease = await lease_for(store, session.id)
    await commit(store, lease, session, step="one", output=1)
    await store.release(lease)

    # When a changed copy is saved
    changed = await store.load(session.id)
    assert changed is not None
    changed.state = {"c": 3}
    changed.metadata.tags = ["saved"]
    changed.status = "completed"
    await store.save(changed)

    # Then the stored session is exactly the saved one, one revision later
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.revision == 2
    assert changed.revision == 2
    assert loaded == changed


async def test_save_of_a_copy_read_before_the_latest_commit_is_refused(
    store: Store, make_session: MakeSession
) -> None:
    # Given a copy read before a runner committed a step
    session = make_session()
    await store.create(session)
    stale = await store.load(session.id)
    assert stale is not None
    lease = await lease_for(store, session.id)
    await commit(store, lease, session, step="one", output=1)
    await store.release(lease)

    # When the stale copy is saved whole
    stale.state["x"] = 1
    with pytest.raises(StorageError, match="changed since"):
        await store.save(stale)

    # Then the committed step is still there, and the refused copy kept its revision
    assert await store.load(session.id) == session
    assert stale.revision == 0


async def test_save_of_an_unknown_session_raises(store: Store, make_session: MakeSession) -> None:
    session = make_session()

    with pytest.raises(SessionNotFoundError):
        await store.save(session)

    assert await store.load(session.id) is None


async def test_save_while_a_lease_is_held_raises_busy(
    store: Store, make_session: MakeSession
) -> None:
    # Given a runner holds the session (through this very store)
    session = make_session(state={"v": 1})
    await store.create(session)
    lease = await lease_for(store, session.id)

    # When someone saves a changed copy
    changed = session.model_copy(deep=True)
    changed.state["v"] = 2
    with pytest.raises(SessionBusyError):
        await store.save(changed)

    # Then the runner's commits still follow and nothing was overwritten
    await commit(store, lease, session, step="one")
    assert await store.load(session.id) == session


async def test_save_refuses_state_that_is_not_json(store: Store, make_session: MakeSession) -> None:
    session = make_session(state={"v": 1})
    await store.create(session)

    broken = session.model_copy(deep=True)
    broken.state["v"] = b"\xff"
    with pytest.raises(SerializationError):
        await store.save(broken)

    assert await store.load(session.id) == session


async def test_delete_returns_whether_the_session_existed(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session()
    await store.create(session)

    assert await store.delete(session.id) is True
    assert await store.delete(session.id) is False
    assert await store.load(session.id) is None
    assert await store.list() == []
    with pytest.raises(SessionNotFoundError):
        await store.acquire(session.id, "runner-a")


async def test_a_deleted_id_can_be_created_and_leased_again(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session()
    await store.create(session)
    await lease_for(store, session.id, "runner-a")
    assert await store.delete(session.id)

    again = make_session(id=session.id, state={"second": True})
    await store.create(again)

    assert await store.acquire(session.id, "runner-b") is not None
    assert await store.load(session.id) == again


async def test_list_returns_one_row_per_session(store: Store, make_session: MakeSession) -> None:
    # Given three sessions, one of them with two committed steps
    sessions = [
        make_session(workflow="report", status="pending"),
        make_session(workflow=None, status="completed"),
        make_session(workflow="etl", status="failed", error="boom"),
    ]
    for session in sessions:
        await store.create(session)
    lease = await lease_for(store, sessions[0].id)
    await commit(store, lease, sessions[0], step="one")
    await commit(store, lease, sessions[0], step="two", status="waiting")

    # When listing
    rows = await store.list()

    # Then each row summarises its session
    assert sorted(rows, key=lambda row: row.id) == sorted(
        (SessionInfo.of(session) for session in sessions), key=lambda row: row.id
    )
    by_id = {row.id: row for row in rows}
    assert by_id[sessions[0].id].steps_done == 2
    assert by_id[sessions[0].id].status == "waiting"
    assert all(row.problem is None for row in rows)


async def test_unfinished_pages_skip_finished_sessions_and_miss_no_unfinished_one(
    store: Store, make_session: MakeSession
) -> None:
    if not isinstance(store, UnfinishedListing):
        pytest.skip(f"{type(store).__name__} cannot tell finished sessions without reading them")
    # Given sessions taken to every kind of status, one finished and then resumed
    expected: set[str] = set()
    finished: set[str] = set()
    for statuses in [
        ["completed"],
        ["failed"],
        ["cancelled"],
        ["running"],
        ["waiting"],
        [],
        ["failed", "running"],
        ["completed", "running", "completed"],
    ]:
        session = make_session(workflow="report")
        await store.create(session)
        if statuses:
            lease = await lease_for(store, session.id)
            for status in statuses:
                await commit(store, lease, session, status=status)
            await store.release(lease)
        final = statuses[-1] if statuses else "pending"
        (expected if final in ("pending", "running", "waiting") else finished).add(session.id)

    # When walking the unfinished pages, two rows at a time
    rows = [row async for page in list_pages(store, limit=2, unfinished=True) for row in page]

    # Then every unfinished session is there, in id order, and no finished one
    assert [row.id for row in rows] == sorted(expected)
    assert all(row.status in ("pending", "running", "waiting") for row in rows)
    assert not finished & {row.id for row in rows}


class _ShortPages:
    """A store whose pages come back short (sessions deleted while it read them)."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    async def list(self) -> list[SessionInfo]:
        return [SessionInfo(id=i) for i in self.ids]

    async def list_page(self, after: str | None = None, limit: int = 1000) -> list[SessionInfo]:
        rows = [SessionInfo(id=i) for i in self.ids if after is None or i > after][:limit]
        return rows[:-1] if len(rows) == limit else rows  # always one short


async def test_a_short_page_does_not_end_the_walk() -> None:
    ids = sorted(str(uuid.uuid4()) for _ in range(10))
    store = _ShortPages(ids)
    walked = [row.id async for page in list_pages(store, limit=3) for row in page]  # type: ignore[arg-type]  # a stub, not a Store
    assert walked == ids


async def test_pages_list_every_session_once_in_id_order(
    store: Store, make_session: MakeSession
) -> None:
    if not isinstance(store, PagedListing):
        pytest.skip(f"{type(store).__name__} lists its sessions in one piece only")
    # Given seven sessions, one with a committed step
    sessions = [make_session(workflow="report") for _ in range(7)]
    for session in sessions:
        await store.create(session)
    lease = await lease_for(store, sessions[3].id)
    await commit(store, lease, sessions[3], step="one", status="waiting")

    # When paging three at a time
    pages = [page async for page in list_pages(store, limit=3)]

    # Then the pages hold every row once, in id order, as list() has them
    assert [len(page) for page in pages] == [3, 3, 1]
    rows = [row for page in pages for row in page]
    assert [row.id for row in rows] == sorted(session.id for session in sessions)
    assert rows == sorted(await store.list(), key=lambda row: row.id)
    assert await store.list_page(rows[-1].id) == []
    assert await store.list_page(rows[1].id, 2) == rows[2:4]


def test_a_closed_store_works_again_under_a_new_event_loop(
    store: Store, make_session: MakeSession
) -> None:
    # Given a session stored under one event loop (one asyncio.run, as a command
    # runs), the store closed at its end
    session = make_session()

    async def first() -> None:
        await store.create(session)
        await store.close()

    asyncio.run(first())

    # When the same store object is used under another
    async def later() -> Session | None:
        lease = await lease_for(store, session.id)
        await commit(store, lease, session, step="one")
        await store.release(lease)
        try:
            return await store.load(session.id)
        finally:
            await store.close()

    # Then it reconnects and finds what it stored
    assert asyncio.run(later()) == session


async def test_close_is_idempotent(store: Store, make_session: MakeSession) -> None:
    session = make_session()
    await store.create(session)
    await lease_for(store, session.id)

    await store.close()
    await store.close()


# -- size and history -----------------------------------------------------------


async def test_a_ten_thousand_step_session_keeps_every_step(
    make_store: Callable[..., Store], make_session: MakeSession
) -> None:
    # Given a session (durability "none": this test is about history, not syncing)
    store = make_store(durability="none")
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)

    # When 10,000 small checkpoints are committed
    steps = 10_000
    for index in range(steps):
        checkpoint = checkpoint_for(
            session,
            step=f"step-{index}",
            output={"i": index},
            state_set={"last": index},
            tool_results=[tool_result(f"step-{index}", output=index)],
        )
        await store.commit(lease, checkpoint)
        session.revision = checkpoint.revision

    # Then loading returns all of them, in order
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.revision == steps
    assert loaded.steps_done == [f"step-{index}" for index in range(steps)]
    assert loaded.outputs == {f"step-{index}": {"i": index} for index in range(steps)}
    assert [result.output for result in loaded.tool_history] == list(range(steps))
    assert loaded.state == {"last": steps - 1}


async def test_a_ten_megabyte_output_round_trips(store: Store, make_session: MakeSession) -> None:
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)
    big = {"blob": os.urandom(5 << 20).hex(), "list": list(range(1000))}

    await commit(store, lease, session, step="big", output=big)
    await commit(store, lease, session, step="after", output="small")

    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.outputs["big"] == big
    assert loaded == session


# -- several views of one store ------------------------------------------------------

CREATE_ONE = """
import asyncio, sys
from engine import SessionManager, open_store

async def main():
    manager = SessionManager(open_store(sys.argv[1]), cleanup_interval=None)
    print((await manager.create_session()).id, flush=True)
    await manager.close()

asyncio.run(main())
"""


async def test_views_in_one_process_and_writers_in_others_all_see_every_write(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    if store_url is None:
        pytest.skip("a memory store cannot be shared with another process")
    # Given two views of the store open in this process, the second opened after
    # the first was in use (as a runner and a dashboard in one service)
    first = make_session()
    await store.create(first)
    other_view = make_store()
    assert await other_view.load(first.id) == first
    ids = {first.id}

    # When other processes write and exit, while this process goes on writing
    for _ in range(3):
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CREATE_ONE, store_url, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(writer.communicate(), DEADLINE)
        assert writer.returncode == 0
        ids.add(out.decode().strip())
        mine = make_session()
        await store.create(mine)
        ids.add(mine.id)

    # Then every view, and a fresh one, sees every session
    for view in (store, other_view, make_store()):
        assert {row.id for row in await view.list()} == ids


# -- leases between runners -------------------------------------------------------


async def test_renew_keeps_a_held_lease_and_refuses_a_released_one(
    store: Store, make_session: MakeSession
) -> None:
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)

    await store.renew(lease, ttl=30)
    await commit(store, lease, session, step="one")
    await store.release(lease)

    with pytest.raises(LeaseLostError):
        await store.renew(lease, ttl=30)
    assert await store.load(session.id) == session


async def test_only_one_of_many_concurrent_acquires_wins(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given a session and eight runners, each with its own view of the store
    session = make_session()
    await store.create(session)
    views = [second_view(store, make_store, store_url) for _ in range(8)]

    # When they all try to take it at once
    leases = await asyncio.gather(
        *(view.acquire(session.id, f"runner-{index}") for index, view in enumerate(views))
    )

    # Then exactly one holds it, and only that one can commit
    winners = [lease for lease in leases if lease is not None]
    assert len(winners) == 1
    await commit(views[leases.index(winners[0])], winners[0], session, step="one")
    assert await store.load(session.id) == session


async def test_a_holder_that_dies_is_taken_over_and_counted(
    store: Store, store_url: str | None, make_session: MakeSession
) -> None:
    if store_url is None:
        pytest.skip("a memory store cannot be shared with another process")
    # Given a runner process that took the lease and was killed holding it
    session = make_session()
    await store.create(session)
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_AND_DIE,
        store_url,
        session.id,
        "0.5",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(doomed.communicate(), DEADLINE)
    assert (out.decode().strip(), doomed.returncode) == ("held", -signal.SIGKILL)

    # When another runner asks for it (a file lock frees at once; a lease runs out)
    lease = await take_over(store, session.id, "survivor")

    # Then it holds the session, the takeover is counted, and it commits
    assert lease.takeovers == 1
    await commit(store, lease, session, step="one")
    assert await store.load(session.id) == session

    # And a clean release resets the count: the next holder took nothing over
    await store.release(lease)
    again = await lease_for(store, session.id, "next")
    assert again.takeovers == 0


async def test_a_lease_that_runs_out_is_taken_over_and_the_old_holder_is_fenced(
    make_store: MakeStore, make_session: MakeSession, leases_expire: bool
) -> None:
    only_where_leases_expire(leases_expire)
    # Given runner A, whose short lease ran out while it was still alive (paused)
    store_a, store_b = make_store(), make_store()
    session = make_session()
    await store_a.create(session)
    stale = await lease_for(store_a, session.id, "runner-a", ttl=0.2)

    # When runner B takes the session over
    current = await take_over(store_b, session.id, "runner-b")

    # Then B's lease is newer and counts the takeover
    assert current.takeovers == 1
    assert current.token > stale.token

    # And A can neither commit nor renew, and its release does not free B's lease
    with pytest.raises(LeaseLostError):
        await store_a.commit(stale, checkpoint_for(session, step="from-a", output="stale"))
    with pytest.raises(LeaseLostError):
        await store_a.renew(stale, ttl=30)
    await store_a.release(stale)
    assert await store_a.acquire(session.id, "runner-c") is None
    assert await store_b.load(session.id) == session

    # While B commits on top of what A left
    await commit(store_b, current, session, step="from-b", output="fresh")
    loaded = await store_a.load(session.id)
    assert loaded == session
    assert loaded.outputs == {"from-b": "fresh"}


async def test_a_renewed_lease_outlives_its_first_ttl(
    make_store: MakeStore, make_session: MakeSession, leases_expire: bool
) -> None:
    only_where_leases_expire(leases_expire)
    # Given a lease taken for 0.3 s, then renewed for a minute
    store_a, store_b = make_store(), make_store()
    session = make_session()
    await store_a.create(session)
    lease = await lease_for(store_a, session.id, "runner-a", ttl=0.3)
    await store_a.renew(lease, ttl=60)

    # When the first TTL has long passed (the time is what is under test)
    await asyncio.sleep(0.6)

    # Then nobody can take the session, and its holder still commits
    assert await store_b.acquire(session.id, "runner-b") is None
    await commit(store_a, lease, session, step="one")
    assert await store_b.load(session.id) == session


async def test_save_voids_a_lease_that_ran_out(
    make_store: MakeStore, make_session: MakeSession, leases_expire: bool
) -> None:
    only_where_leases_expire(leases_expire)
    # Given a session whose runner's lease ran out without a release
    store_a, store_b = make_store(), make_store()
    session = make_session(state={"v": 1})
    await store_a.create(session)
    stale = await lease_for(store_a, session.id, "runner-a", ttl=0.2)
    await take_over(store_b, session.id, "probe")  # proves it ran out
    await store_b.close()  # releases the probe's lease again

    # When the session is saved whole
    copy = await store_a.load(session.id)
    assert copy is not None
    copy.state["v"] = 2
    await store_a.save(copy)

    # Then the old holder cannot commit on top of the saved session
    with pytest.raises(LeaseLostError):
        await store_a.commit(stale, checkpoint_for(copy, step="late"))
    assert await store_a.load(session.id) == copy


async def test_close_releases_the_stores_leases(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given a store holding a session's lease
    holder = second_view(store, make_store, store_url)
    session = make_session()
    await store.create(session)
    await lease_for(holder, session.id, "runner-a")

    # When it closes
    await holder.close()

    # Then another runner takes the session at once, and nothing counts as a takeover
    lease = await lease_for(store, session.id, "runner-b")
    assert lease.takeovers == 0


# -- concurrent commits -------------------------------------------------------------


async def test_concurrent_commits_to_many_sessions_all_land(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given 16 sessions, each leased by one of two runners sharing the store
    views = [store, second_view(store, make_store, store_url)]
    sessions = [make_session() for _ in range(16)]
    for session in sessions:
        await store.create(session)
    leases = [
        await lease_for(views[index % 2], session.id, f"runner-{index % 2}")
        for index, session in enumerate(sessions)
    ]

    # When every runner commits ten steps to each of its sessions, all at once
    async def run(index: int) -> None:
        for step in range(10):
            await commit(
                views[index % 2],
                leases[index],
                sessions[index],
                step=f"s{step}",
                output={"session": index, "step": step},
                state_set={"last": step},
            )

    await asyncio.gather(*(run(index) for index in range(len(sessions))))

    # Then every session holds exactly its own ten steps, in order
    for session in sessions:
        loaded = await store.load(session.id)
        assert loaded == session
        assert loaded.steps_done == [f"s{step}" for step in range(10)]


async def test_two_commits_racing_for_one_revision_leave_exactly_one(
    store: Store, make_session: MakeSession
) -> None:
    # Given one lease and two checkpoints that both claim revision 1
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)
    first = checkpoint_for(session, step="one", output="first")
    second = checkpoint_for(session, step="one", output="second")

    # When both are committed at once
    outcomes = await asyncio.gather(
        store.commit(lease, first), store.commit(lease, second), return_exceptions=True
    )

    # Then one landed and the other was refused whole
    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(refused) == 1
    assert isinstance(refused[0], StorageError)
    winner = first if outcomes[0] is None else second
    session.apply(winner)
    assert await store.load(session.id) == session


# -- listing, expiry and limits over committed sessions -------------------------------


async def test_list_follows_status_and_expiry_through_commits_and_cleanup(
    store: Store, make_session: MakeSession
) -> None:
    # Given three sessions under a manager allowing three live ones
    manager = SessionManager(store, cleanup_interval=None, max_sessions=3)
    waiting, done, lapsed = [await manager.create_session() for _ in range(3)]

    # When checkpoints move one to waiting, one to completed, and one's expiry into the past
    now = utcnow()
    for session, status, expires_at in [
        (waiting, "waiting", now + timedelta(hours=2)),
        (done, "completed", now + timedelta(hours=3)),
        (lapsed, "running", now - timedelta(seconds=1)),
    ]:
        lease = await lease_for(store, session.id)
        await commit(store, lease, session, status=status, expires_at=expires_at, step="s")
        await store.release(lease)

    # Then listings show each one's status and expiry
    rows = {row.id: row for row in await store.list()}
    assert {sid: (row.status, row.expires_at) for sid, row in rows.items()} == {
        waiting.id: ("waiting", waiting.expires_at),
        done.id: ("completed", done.expires_at),
        lapsed.id: ("running", lapsed.expires_at),
    }
    assert [sid for sid, row in rows.items() if row.is_expired(utcnow())] == [lapsed.id]

    # And the manager treats the lapsed one as gone: hidden, not counted, cleaned up
    assert await manager.get_session(lapsed.id) is None
    extra = await manager.create_session()
    with pytest.raises(SessionLimitError):
        await manager.create_session()
    assert (await manager.perform_cleanup()).cleaned_sessions == 1
    assert {row.id for row in await store.list()} == {waiting.id, done.id, extra.id}


# -- unicode ------------------------------------------------------------------------


async def test_unicode_names_and_values_round_trip_through_commits_and_listings(
    store: Store, make_session: MakeSession
) -> None:
    # Given a session of a workflow named in several scripts
    name = "rapport-日本語-Ελληνικά-عربي-🚀-e\u0301"
    session = make_session(workflow=name, state={"clé": "välue", "🔑": ["🚀", "\u200d"]})
    await store.create(session)
    lease = await lease_for(store, session.id)

    # When steps with unicode names, outputs and state are committed
    await commit(
        store,
        lease,
        session,
        step="étape-一",
        output={"texte": "naïve café", "emoji": "👩‍💻", "rtl": "שָׁלוֹם", "nul": "a\u0000b"},
        state_set={"ключ": "значение"},
        tool_results=[tool_result("outil-🔧", output="✓")],
    )

    # Then everything reads back exactly, listings included
    assert await store.load(session.id) == session
    (row,) = await store.list()
    assert row.workflow == name
    assert row.steps_done == 1


# -- events posted without the lease (EventInbox) ------------------------------------


def inbox_of(store: Store) -> EventInbox:
    """The store as an ``EventInbox``; skip a store that takes events only under the lease."""
    if not isinstance(store, EventInbox):
        pytest.skip(
            f"{type(store).__name__} has no post_event: it takes events only through a "
            "checkpoint committed under the session's lease"
        )
    return store


def an_event(name: str = "approval", payload: Any = None, event_id: str | None = None) -> Event:
    return Event(id=event_id or str(uuid.uuid4()), name=name, payload=payload, sent_at=utcnow())


def numbered(session: Session | None) -> list[tuple[int | None, str]]:
    """The session's inbox as (number, event id) pairs, in order."""
    assert session is not None
    return [(event.seq, event.id) for event in session.inbox]


async def test_an_event_is_posted_while_another_runner_holds_the_lease(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given a session that runner-a holds through its own view of the store
    inbox = inbox_of(store)
    holder = second_view(store, make_store, store_url)
    session = make_session(state={"v": 1})
    await store.create(session)
    lease = await lease_for(holder, session.id, "runner-a")

    # When an event is posted through another view, without the lease
    event = an_event(payload={"approved": True, "by": "eve"})
    number = await inbox.post_event(session.id, event)

    # Then it is number 1 and every view loads it in the inbox, the rest unchanged
    assert number == 1
    for view in (store, holder):
        loaded = await view.load(session.id)
        assert loaded is not None
        assert loaded.inbox == [event.model_copy(update={"seq": 1})]
        assert loaded.model_copy(update={"inbox": []}) == session

    # And the lease is untouched: still held, and its holder still commits
    assert await store.acquire(session.id, "runner-b") is None
    await commit(holder, lease, session, step="one", output=1)
    loaded = await store.load(session.id)
    assert loaded is not None
    assert (loaded.steps_done, numbered(loaded)) == (["one"], [(1, event.id)])


async def test_posted_events_are_numbered_per_session_and_load_in_order(
    store: Store, make_session: MakeSession
) -> None:
    # Given two sessions
    inbox = inbox_of(store)
    first, second = make_session(), make_session()
    await store.create(first)
    await store.create(second)

    # When three events go to the first and one to the second
    events = [an_event(f"e{index}", payload=index) for index in range(3)]
    numbers = [await inbox.post_event(first.id, event) for event in events]
    other = an_event("other")
    other_number = await inbox.post_event(second.id, other)

    # Then each session numbers its own from 1, and loads them in that order
    assert (numbers, other_number) == ([1, 2, 3], 1)
    assert numbered(await store.load(first.id)) == [
        (n, e.id) for n, e in zip(numbers, events, strict=True)
    ]
    assert numbered(await store.load(second.id)) == [(1, other.id)]


async def test_posting_an_id_again_returns_its_number_and_keeps_one_copy(
    store: Store, make_session: MakeSession
) -> None:
    # Given two posted events
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    first, second = an_event("a", payload=1), an_event("b", payload=2)
    assert [await inbox.post_event(session.id, e) for e in (first, second)] == [1, 2]

    # When the first is posted again (a sender retrying), even with another payload
    again = await inbox.post_event(session.id, first.model_copy(update={"payload": "retry"}))

    # Then it keeps its number and its first payload, and no number was used up
    assert again == 1
    loaded = await store.load(session.id)
    assert loaded is not None
    assert [(e.seq, e.payload) for e in loaded.inbox] == [(1, 1), (2, 2)]
    assert await inbox.post_event(session.id, an_event("c")) == 3


async def test_concurrent_posts_get_distinct_numbers_and_no_reader_sees_a_gap(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given a held session and four senders, each with its own view of the store
    inbox_of(store)
    session = make_session()
    await store.create(session)
    await lease_for(store, session.id, "runner-a")
    senders = [second_view(store, make_store, store_url) for _ in range(4)]
    per_sender = 10
    done = asyncio.Event()
    seen: list[list[int | None]] = []

    async def send(view: Store, index: int) -> list[int]:
        posting = inbox_of(view)
        return [
            await posting.post_event(session.id, an_event("item", {"from": index, "n": n}))
            for n in range(per_sender)
        ]

    async def read() -> None:
        while not done.is_set():
            loaded = await store.load(session.id)
            assert loaded is not None
            seen.append([event.seq for event in loaded.inbox])
            await asyncio.sleep(0)

    # When they all post at once while a reader keeps loading the session
    reader = asyncio.create_task(read())
    try:
        numbers = await asyncio.gather(*(send(view, i) for i, view in enumerate(senders)))
    finally:
        done.set()
        await reader

    # Then the numbers are 1..40, each sender's in the order it sent them
    total = len(senders) * per_sender
    assert sorted(n for sent in numbers for n in sent) == list(range(1, total + 1))
    assert all(sent == sorted(sent) for sent in numbers)
    # And every load saw a prefix: never an event without all those numbered before it
    assert seen
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in seen)
    loaded = await store.load(session.id)
    assert loaded is not None
    assert [e.seq for e in loaded.inbox] == list(range(1, total + 1))
    by_sender: dict[int, list[int]] = {}
    for event in loaded.inbox:
        by_sender.setdefault(event.payload["from"], []).append(event.payload["n"])
    assert by_sender == {index: list(range(per_sender)) for index in range(len(senders))}


async def test_concurrent_posts_of_one_id_store_it_once_under_one_number(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    inbox_of(store)
    session = make_session()
    await store.create(session)
    views = [second_view(store, make_store, store_url) for _ in range(5)]
    event = an_event()

    numbers = await asyncio.gather(
        *(inbox_of(view).post_event(session.id, event) for view in views)
    )

    assert numbers == [1] * 5
    assert numbered(await store.load(session.id)) == [(1, event.id)]
    assert await inbox_of(store).post_event(session.id, an_event()) == 2


async def test_a_commit_that_absorbs_events_lets_the_store_forget_them(
    store: Store, make_session: MakeSession
) -> None:
    # Given three posted events and a runner that loaded them
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    first, second, third = an_event("a"), an_event("b"), an_event("c")
    for event in (first, second, third):
        await inbox.post_event(session.id, event)
    lease = await lease_for(store, session.id)
    running = await store.load(session.id)
    assert running is not None
    loaded_first = running.inbox[0]

    # When it commits that a step took the second: the first, numbered below it,
    # becomes part of the session itself (as engine.journal does)
    await commit(
        store,
        lease,
        running,
        events_added=[loaded_first],
        events_consumed=[second.id],
        inbox_seq=2,
    )

    # Then the session holds the first once, the third is still posted past inbox_seq
    loaded = await store.load(session.id)
    assert loaded == running
    assert (loaded.inbox_seq, numbered(loaded)) == (2, [(1, first.id), (3, third.id)])

    # And the store forgot the absorbed ones, numbers included: the taken event's id
    # posted again is a new event numbered after all, while the third is still known
    assert await inbox.post_event(session.id, third) == 3
    assert await inbox.post_event(session.id, second) == 4
    loaded = await store.load(session.id)
    assert numbered(loaded) == [(1, first.id), (3, third.id), (4, second.id)]


async def test_an_absorbed_event_posted_again_is_delivered_once(
    store: Store, make_session: MakeSession
) -> None:
    # Given two posted events, the second taken and the first absorbed into the session
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    first, second = an_event("a"), an_event("b")
    for event in (first, second):
        await inbox.post_event(session.id, event)
    lease = await lease_for(store, session.id)
    running = await store.load(session.id)
    assert running is not None
    await commit(
        store,
        lease,
        running,
        events_added=[running.inbox[0]],
        events_consumed=[second.id],
        inbox_seq=2,
    )

    # When its sender retries the first (same id) before a step takes it, then a step does
    await inbox.post_event(session.id, first)
    running = await store.load(session.id)
    assert running is not None
    assert [event.id for event in running.inbox] == [first.id]
    await commit(store, lease, running, events_consumed=[first.id])

    # Then it was one event, taken once: nothing is left to deliver again
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.inbox == []


async def test_numbers_are_never_reused_once_absorbed_events_are_dropped(
    store: Store, make_store: MakeStore, store_url: str | None, make_session: MakeSession
) -> None:
    # Given two posted events that a step took, the second absorbing both
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    taken = [an_event("a"), an_event("b")]
    for event in taken:
        await inbox.post_event(session.id, event)
    lease = await lease_for(store, session.id)
    await commit(store, lease, session, events_consumed=[e.id for e in taken], inbox_seq=2)
    await store.release(lease)

    # When another event is posted, through a fresh view of the store
    later = an_event("c")
    number = await inbox_of(second_view(store, make_store, store_url)).post_event(session.id, later)

    # Then it is number 3, and it is all the inbox holds
    assert number == 3
    loaded = await store.load(session.id)
    assert loaded is not None
    assert (loaded.inbox_seq, numbered(loaded)) == (2, [(3, later.id)])


async def test_save_keeps_the_events_posted_past_the_saved_inbox_seq(
    store: Store, make_session: MakeSession
) -> None:
    # Given a copy loaded with one posted event, and a second posted after the load
    inbox = inbox_of(store)
    session = make_session(state={"v": 1})
    await store.create(session)
    first, second = an_event("a"), an_event("b")
    await inbox.post_event(session.id, first)
    copy = await store.load(session.id)
    assert copy is not None
    await inbox.post_event(session.id, second)

    # When the copy is saved whole with a change
    copy.state["v"] = 2
    await store.save(copy)

    # Then both events are in the inbox, each once
    loaded = await store.load(session.id)
    assert loaded is not None
    assert (loaded.state, numbered(loaded)) == ({"v": 2}, [(1, first.id), (2, second.id)])

    # And a copy saved as having absorbed the first (an operator dropping it) keeps the second
    loaded.inbox = [event for event in loaded.inbox if event.id != first.id]
    loaded.inbox_seq = 1
    await store.save(loaded)
    assert numbered(await store.load(session.id)) == [(2, second.id)]


async def test_delete_drops_the_posted_events(store: Store, make_session: MakeSession) -> None:
    # Given a session with a posted event
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    await inbox.post_event(session.id, an_event("old"))

    # When it is deleted
    assert await store.delete(session.id)

    # Then nothing can be posted to it, and a session created again under its id
    # starts with an empty inbox and gets only what is posted to it
    with pytest.raises(SessionNotFoundError):
        await inbox.post_event(session.id, an_event())
    await store.create(make_session(id=session.id))
    assert numbered(await store.load(session.id)) == []
    fresh = an_event("new")
    number = await inbox.post_event(session.id, fresh)
    assert numbered(await store.load(session.id)) == [(number, fresh.id)]


async def test_posting_to_an_unknown_session_raises_and_stores_nothing(store: Store) -> None:
    inbox = inbox_of(store)
    unknown = str(uuid.uuid4())

    with pytest.raises(SessionNotFoundError, match=unknown):
        await inbox.post_event(unknown, an_event())

    assert await store.load(unknown) is None
    assert await store.list() == []


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_post_event_rejects_an_invalid_id_before_touching_storage(
    store: Store, tmp_path: Path, bad_id: object
) -> None:
    inbox = inbox_of(store)

    with pytest.raises(InvalidSessionIdError):
        await inbox.post_event(bad_id, an_event())  # type: ignore[arg-type]

    assert tree(tmp_path) == []
    assert await store.list() == []


async def test_a_payload_that_is_not_json_is_refused_and_uses_no_number(
    store: Store, make_session: MakeSession
) -> None:
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)

    with pytest.raises(SerializationError):
        await inbox.post_event(session.id, an_event(payload={"when": object()}))

    assert numbered(await store.load(session.id)) == []
    assert await inbox.post_event(session.id, an_event()) == 1


async def test_posted_events_outlive_compaction_and_appear_once(
    make_store: MakeStore, make_session: MakeSession
) -> None:
    # Given a store that folds steps into the snapshot as soon as it can
    store = make_store(compact_bytes=1)
    inbox = inbox_of(store)
    session = make_session()
    await store.create(session)
    event = an_event()
    await inbox.post_event(session.id, event)
    lease = await lease_for(store, session.id)

    # When steps bigger than the snapshot are committed
    await commit(store, lease, session, step="big", output="x" * 10_000)
    await commit(store, lease, session, step="bigger", output="y" * 20_000)

    # Then the event is still posted, once, with its number
    loaded = await store.load(session.id)
    assert loaded is not None
    assert loaded.steps_done == ["big", "bigger"]
    assert numbered(loaded) == [(1, event.id)]
