"""Fork and restart: ``runner.fork(id, from_step=...)`` copies a session up to a step
into a new one (the original untouched); ``runner.restart(id, from_step=...)`` runs a
session again from a step in place, keeping its history. Both start from the state as
it was before that step first ran.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner
from workflow_support import QUICK_RETRY, Stores, eventually

from engine import (
    FileStore,
    InvalidArgumentError,
    Runner,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
    StepContext,
    StepFailedError,
    Workflow,
    WorkflowMismatchError,
)
from engine.cli import app

UNKNOWN_ID = "3f1c9a52-7a4e-4c1e-9d0b-6a2b1c3d4e5f"


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


def _pipeline(calls: Counter[str], knobs: dict[str, int]) -> Workflow:
    """load -> scale -> total; each step changes the state, so rewinding shows."""
    wf = Workflow("pipeline")

    @wf.step
    def load(ctx: StepContext, n: int) -> list[int]:
        calls["load"] += 1
        ctx.state["loaded"] = n
        ctx.state["log"] = ["load"]
        return list(range(n))

    @wf.step(retries=1, **QUICK_RETRY)
    def scale(ctx: StepContext, values: list[int]) -> list[int]:
        calls["scale"] += 1
        if knobs["factor"] < 0:
            raise ValueError("negative factor")
        ctx.state["log"] = [*ctx.state["log"], "scale"]
        ctx.state["factor"] = knobs["factor"]
        del ctx.state["loaded"]
        return [value * knobs["factor"] for value in values]

    @wf.step
    def total(ctx: StepContext, values: list[int]) -> int:
        calls["total"] += 1
        ctx.state["log"] = [*ctx.state["log"], "total"]
        return sum(values)

    return wf


async def _completed(stores: Stores, wf: Workflow, n: int = 4) -> str:
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, n)
        await runner.wait(sid)
    return sid


async def test_fork_reuses_earlier_outputs_and_runs_from_the_step_on_a_new_session(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    knobs = {"factor": 10}
    wf = _pipeline(calls, knobs)
    original = await _completed(stores, wf)
    before = await stores.load(original)
    assert before.outputs["total"] == 60

    # When it is forked from "scale", with a new factor
    knobs["factor"] = 100
    async with Runner(stores.open(), [wf]) as runner:
        fork = await runner.fork(original, from_step="scale")

        # Then the fork exists, not run yet, with the state from before "scale"
        assert isinstance(fork, str)
        assert fork != original
        copied = await stores.load(fork)
        assert (copied.status, copied.steps_done, copied.forked_from) == (
            "pending",
            ["load"],
            original,
        )
        assert copied.state == {"loaded": 4, "log": ["load"]}
        assert calls == Counter({"load": 1, "scale": 1, "total": 1})

        # And running it runs "scale" and what follows, only
        assert await runner.wait(fork) == 600
    assert calls == Counter({"load": 1, "scale": 2, "total": 2})
    done = await stores.load(fork)
    assert done.state == {"log": ["load", "scale", "total"], "factor": 100}
    assert done.input == before.input

    # And the original is untouched
    after = await stores.load(original)
    assert after.model_dump() == before.model_dump()


async def test_fork_from_the_first_step_starts_from_the_initial_state(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _pipeline(calls, {"factor": 2})
    original = await _completed(stores, wf, n=3)
    async with Runner(stores.open(), [wf]) as runner:
        fork = await runner.fork(original, from_step="load")
        assert (await stores.load(fork)).state == {}
        assert await runner.wait(fork) == 6
    assert calls == Counter({"load": 2, "scale": 2, "total": 2})


async def test_fork_refuses_steps_it_cannot_start_from(stores: Stores) -> None:
    knobs = {"factor": -1}
    wf = _pipeline(Counter(), knobs)
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(wf, 2)
        sid = failure.value.session_id

        with pytest.raises(InvalidArgumentError, match="has no step 'nope'"):
            await runner.fork(sid, from_step="nope")
        with pytest.raises(InvalidArgumentError, match="has not reached step 'total'"):
            await runner.fork(sid, from_step="total")
        with pytest.raises(SessionNotFoundError):
            await runner.fork(UNKNOWN_ID, from_step="load")
        # The step it failed in is fine: a fork retries it on its own
        fork = await runner.fork(sid, from_step="scale")
        knobs["factor"] = 1
        assert await runner.wait(fork) == 1

    async with Runner(stores.open()) as runner:
        with pytest.raises(WorkflowMismatchError, match="not registered"):
            await runner.fork(sid, from_step="load")

    store = stores.open()
    session = await stores.load(sid)
    session.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await store.save(session)
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(SessionExpiredError):
            await runner.fork(sid, from_step="load")


async def test_restart_runs_again_from_a_step_in_place_keeping_the_history(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    knobs = {"factor": 10}
    wf = _pipeline(calls, knobs)
    sid = await _completed(stores, wf)
    before = await stores.load(sid)

    # When it is restarted from "scale" with a new factor
    knobs["factor"] = 3
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.restart(sid, from_step="scale") == 18

    # Then the same session ran "scale" and "total" again, on the rewound state
    assert calls == Counter({"load": 1, "scale": 2, "total": 2})
    after = await stores.load(sid)
    assert after.steps_done == ["load", "scale", "total"]
    assert after.state == {"log": ["load", "scale", "total"], "factor": 3}
    history = [(r.name, r.attempt) for r in after.tool_history]
    assert history[: len(before.tool_history)] == [(r.name, r.attempt) for r in before.tool_history]
    assert history[len(before.tool_history) :] == [("scale", 2), ("total", 2)]


async def test_restart_gives_the_steps_fresh_retry_budgets(stores: Stores) -> None:
    calls = Counter[str]()
    knobs = {"factor": -1}
    wf = _pipeline(calls, knobs)
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError, match="after 2 attempt"):
            await runner.run(wf, 2)
        (row,) = await runner.store.list()

        knobs["factor"] = 5
        assert await runner.restart(row.id, from_step="load") == 5

    assert calls == Counter({"load": 2, "scale": 3, "total": 1})
    session = await stores.load(row.id)
    assert session.retry_base["scale"] == 2


async def test_restart_refuses_busy_cancelled_and_unreached_sessions(stores: Stores) -> None:
    gate = asyncio.Event()
    wf = Workflow("held")

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        return value

    @wf.step
    async def second(ctx: StepContext, value: int) -> int:
        await gate.wait()
        return value

    async with Runner(stores.open(), [wf]) as runner:
        running = await runner.start(wf, 1)
        await eventually(lambda: _reached(stores, running, "first"))
        with pytest.raises(SessionBusyError, match="running here"):
            await runner.restart(running, from_step="first")
        if stores.kind == "file":  # another process's view of a held session
            other = Runner(FileStore(stores.path, durability="none"), [wf])
            with pytest.raises(SessionBusyError):
                await other.restart(running, from_step="first")
            await other.close()
        await runner.cancel(running)
        with pytest.raises(SessionCancelledError, match="fork it instead"):
            await runner.restart(running, from_step="first")

        fresh = await runner.start(wf, 2)
        await eventually(lambda: _reached(stores, fresh, "first"))
        await runner.cancel(fresh)

    ended = await stores.load(fresh)
    assert ended.status == "cancelled"


async def _reached(stores: Stores, session_id: str, step: str) -> bool:
    return step in (await stores.load(session_id)).steps_done


FLOW = """
from engine import StepContext, Workflow

wf = Workflow("letters")


@wf.step
def split(ctx: StepContext, word: str) -> list[str]:
    return list(word)


@wf.step
def shout(ctx: StepContext, letters: list[str]) -> str:
    return "".join(letters).upper() + "!" * ctx.attempt
"""


def test_the_command_line_forks_and_restarts_from_a_step(tmp_path: Path) -> None:
    flow = tmp_path / "letters.py"
    flow.write_text(FLOW)
    store = str(tmp_path / "sessions")
    cli = CliRunner()
    ran = cli.invoke(app, ["run", str(flow), "--input", '"hey"', "--store", store, "--json"])
    assert ran.exit_code == 0, ran.output
    sid = json.loads(ran.stdout)["session_id"]

    # A fork prints its id and does not run until resumed
    forked = cli.invoke(app, ["fork", sid, "--from-step", "shout", "--store", store])
    assert forked.exit_code == 0, forked.output
    fork_id = forked.stdout.strip()
    assert f"stepvault resume {fork_id}" in forked.stderr
    resumed = cli.invoke(app, ["resume", fork_id, "--store", store, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["output"] == "HEY!"

    # A restart in place runs the step again (its second attempt, by the history)
    again = cli.invoke(app, ["resume", sid, "--from-step", "shout", "--store", store, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["output"] == "HEY!!"

    refused = cli.invoke(app, ["resume", "--all", "--from-step", "shout", "--store", store])
    assert refused.exit_code == 2
    missing = cli.invoke(app, ["fork", sid, "--from-step", "whisper", "--store", store])
    assert missing.exit_code == 1
    assert "has no step 'whisper'" in missing.stderr
