"""Retries: exponential backoff with jitter up to a maximum, and a retry budget that
survives a restart (the attempt count is durable, so a crash loop cannot retry forever).

The basics (retry_on, per-attempt timeouts, the attempts in the tool history) are in
test_runner.py; restarts by SIGKILL in the middle of a retry are in
test_workflow_crash.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from workflow_support import QUICK_RETRY, Stores, eventually

from engine import Runner, StepContext, StepEvent, StepFailedError, Workflow


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


async def test_backoff_doubles_with_jitter_and_stops_at_the_maximum(stores: Stores) -> None:
    heard: list[StepEvent] = []
    wf = Workflow("backoff")

    @wf.step(retries=4, backoff=0.002, max_backoff=0.005)
    async def flaky(ctx: StepContext, value: int) -> int:
        raise ConnectionError(f"attempt {ctx.attempt}")

    # When five sessions each use up their retries
    async with Runner(stores.open(), [wf], hooks=[heard.append]) as runner:
        sids = [await runner.start(wf, n) for n in range(5)]
        outcomes = await asyncio.gather(*map(runner.wait, sids), return_exceptions=True)
    assert all(isinstance(o, StepFailedError) and "after 5 attempt" in str(o) for o in outcomes)

    # Then each waited 2 ms plus up to 2 ms of jitter, then doubled, never above 5 ms
    for sid in sids:
        delays = [e.delay for e in heard if e.session_id == sid and e.kind == "retrying"]
        assert [e.attempt for e in heard if e.session_id == sid and e.kind == "retrying"] == [
            1,
            2,
            3,
            4,
        ]
        assert all(d is not None for d in delays)
        first, second, third, fourth = (float(d or 0) for d in delays)
        assert 0.002 <= first <= 0.004
        assert 0.004 <= second <= 0.005
        assert third == fourth == 0.005
    firsts = {e.delay for e in heard if e.kind == "retrying" and e.attempt == 1}
    assert len(firsts) > 1  # jitter: the sessions did not retry in lockstep

    # And the runner really waited that long between attempts
    session = await stores.load(sids[0])
    attempts = session.tool_history
    delays = [e.delay for e in heard if e.session_id == sids[0] and e.kind == "retrying"]
    for before, after, delay in zip(attempts, attempts[1:], delays, strict=False):
        assert (after.started_at - before.finished_at).total_seconds() >= float(delay or 0)


async def test_a_retry_budget_survives_a_restart(stores: Stores) -> None:
    seen: list[int] = []
    heard: list[StepEvent] = []

    def failing(backoff: float) -> Workflow:
        wf = Workflow("budget")

        @wf.step(retries=3, backoff=backoff, max_backoff=backoff)
        async def call(ctx: StepContext, value: int) -> int:
            seen.append(ctx.attempt)
            raise ConnectionError("still down")

        return wf

    # Given a runner stopped while it waits to retry, after one failed attempt
    slow = failing(backoff=60.0)
    async with Runner(stores.open(), [slow], hooks=[heard.append]) as runner:
        sid = await runner.start(slow, 1)
        await eventually(lambda: any(e.kind == "retrying" for e in heard))
    assert (await stores.load(sid)).attempts == {"call": 1}

    # When a new runner resumes it (and the step keeps failing)
    quick = failing(backoff=QUICK_RETRY["backoff"])
    async with Runner(stores.open(), [quick]) as runner:
        assert await runner.resume_all() == [sid]
        with pytest.raises(StepFailedError, match="after 4 attempt"):
            await runner.wait(sid)

    # Then only the three attempts left ran: four in all, numbered in order
    assert seen == [1, 2, 3, 4]
    session = await stores.load(sid)
    assert session.status == "failed"
    assert [r.attempt for r in session.tool_history] == [1, 2, 3, 4]


async def test_a_spent_budget_is_not_refilled_by_a_restart(stores: Stores) -> None:
    seen: list[int] = []
    wf = Workflow("spent")

    @wf.step(retries=1, **QUICK_RETRY)
    async def call(ctx: StepContext, value: int) -> int:
        seen.append(ctx.attempt)
        raise ConnectionError("down")

    # Given a session whose step used all its attempts, then was left running
    # (as if its runner died between the last failure and marking it failed)
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError):
            await runner.run(wf, 1)
    store = stores.open()
    (row,) = await store.list()
    session = await stores.load(row.id)
    session.status = "running"
    await store.save(session)

    # When another runner picks it up
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume_all() == [row.id]
        with pytest.raises(StepFailedError, match="used all 2 attempts"):
            await runner.wait(row.id)

    # Then no attempt ran again
    assert seen == [1, 2]


async def test_a_steps_own_timeout_error_is_not_taken_for_its_time_limit(
    stores: Stores,
) -> None:
    wf = Workflow("upstream-timeout")

    @wf.step
    async def call(ctx: StepContext, value: int) -> int:
        raise TimeoutError("upstream took too long")

    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError, match="upstream took too long"):
            await runner.run(wf, 1)
