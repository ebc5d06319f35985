"""Cancellation: ``runner.cancel`` stops the running step cooperatively (asyncio
cancellation for async steps, ``ctx.cancelled`` for sync ones), records it, and a
cancelled session is never resumed, by ``resume_all`` or anyone.

Closing a runner is not cancelling: its sessions stay resumable (test_runner.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from workflow_support import Stores, eventually

from engine import (
    Runner,
    SessionBusyError,
    SessionCancelledError,
    StepContext,
    Workflow,
)


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


async def test_cancel_stops_an_async_step_records_it_and_nobody_resumes_it(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    started, cleaned_up = asyncio.Event(), asyncio.Event()
    wf = Workflow("long-job")

    @wf.step
    async def prepare(ctx: StepContext, value: int) -> int:
        calls["prepare"] += 1
        return value

    @wf.step
    async def crunch(ctx: StepContext, value: int) -> int:
        calls["crunch"] += 1
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()  # the step's own cleanup runs: cancellation is cooperative
        return value

    # Given a session in the middle of a step, with someone waiting for its result
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 1)
        waiter = asyncio.ensure_future(runner.wait(sid))
        await asyncio.wait_for(started.wait(), 10)

        # When it is cancelled
        await runner.cancel(sid)

        # Then the step was stopped and cleaned up, and the waiter hears why
        assert cleaned_up.is_set()
        with pytest.raises(SessionCancelledError):
            await waiter

    # And the cancellation is recorded, with the attempt it stopped
    session = await stores.load(sid)
    assert (session.status, session.error, session.steps_done) == (
        "cancelled",
        "cancelled",
        ["prepare"],
    )
    stopped = session.tool_history[-1]
    assert (stopped.kind, stopped.name, stopped.attempt, stopped.error) == (
        "step",
        "crunch",
        1,
        "cancelled",
    )

    # And no runner picks it up again
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume_all() == []
        with pytest.raises(SessionCancelledError):
            await runner.resume(sid)
        with pytest.raises(SessionCancelledError):
            await runner.wait(sid)
    assert calls == Counter({"prepare": 1, "crunch": 1})


async def test_a_sync_step_sees_ctx_cancelled_and_can_stop_early(stores: Stores) -> None:
    started = threading.Event()
    saw: list[bool] = []
    wf = Workflow("sync-job")

    @wf.step
    def crunch(ctx: StepContext, value: int) -> int:
        started.set()
        while not ctx.cancelled:
            threading.Event().wait(0.001)  # one slice of real work
        saw.append(ctx.cancelled)
        return value

    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 1)
        await eventually(started.is_set)

        await runner.cancel(sid)

        await eventually(lambda: bool(saw), what="the thread to stop")
    assert saw == [True]
    session = await stores.load(sid)
    assert (session.status, session.outputs) == ("cancelled", {})


async def test_a_sync_step_that_times_out_is_told_to_stop(stores: Stores) -> None:
    saw: list[int] = []
    wf = Workflow("sync-slow")

    @wf.step(timeout=0.05, retries=1, backoff=0.001, max_backoff=0.001)
    def crunch(ctx: StepContext, value: int) -> int:
        while ctx.attempt == 1 and not ctx.cancelled:
            threading.Event().wait(0.001)
        saw.append(ctx.attempt)
        return value * 2

    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.run(wf, 4) == 8
        await eventually(lambda: len(saw) == 2, what="the first attempt's thread to stop")


async def test_cancel_reaches_a_waiting_session_and_its_waiter(stores: Stores) -> None:
    wf = Workflow("waits")

    @wf.step
    async def ask(ctx: StepContext, value: int) -> str:
        return str(await ctx.wait_for_event("answer"))

    async with Runner(stores.open(), [wf], poll_interval=0.02) as runner:
        sid = await runner.start(wf, 1)
        waiter = asyncio.ensure_future(runner.wait(sid))
        await eventually(lambda: _status(stores, sid, "waiting"), what="waiting")

        # When another runner (it holds no lease on a waiting session) cancels it
        async with Runner(stores.open(), [wf]) as other:
            await other.cancel(sid)

        # Then the runner that was waiting on it hears it
        with pytest.raises(SessionCancelledError):
            await asyncio.wait_for(waiter, 10)
    assert (await stores.load(sid)).status == "cancelled"


async def test_cancel_refuses_a_session_another_runner_runs(stores: Stores) -> None:
    started = asyncio.Event()
    wf = Workflow("elsewhere")

    @wf.step
    async def work(ctx: StepContext, value: int) -> int:
        started.set()
        await asyncio.Event().wait()
        return value

    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 1)
        await asyncio.wait_for(started.wait(), 10)
        other = Runner(stores.open())  # not closed: closing would close a shared store
        with pytest.raises(SessionBusyError):
            await other.cancel(sid)
        assert (await stores.load(sid)).status == "running"


async def test_cancelling_a_completed_session_changes_nothing(stores: Stores) -> None:
    wf = Workflow("done")

    @wf.step
    def only(ctx: StepContext, value: int) -> int:
        return value

    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 5)
        await runner.wait(sid)
        before = await stores.load(sid)
        await runner.cancel(sid)
        assert await runner.resume(sid) == 5
    after = await stores.load(sid)
    assert (after.status, after.revision) == ("completed", before.revision)


async def _status(stores: Stores, session_id: str, wanted: str) -> bool:
    return (await stores.load(session_id)).status == wanted
