"""Failure policy: ``fail`` (the default) marks the session failed; ``park`` keeps it
waiting for an operator, who resumes it, skips the step with an output, or cancels it.
Nothing ever retries forever by default.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner
from workflow_support import QUICK_RETRY, Stores

from engine import (
    InvalidArgumentError,
    Runner,
    SessionCancelledError,
    StepContext,
    StepFailedError,
    Workflow,
    WorkflowDefinitionError,
)
from engine.cli import app


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


class Quote(BaseModel):
    supplier: str
    price: int


def _ordering(calls: Counter[str], broken: dict[str, bool], **options: object) -> Workflow:
    """``fetch_quote`` fails while ``broken["on"]``; ``options`` go to the workflow."""
    wf = Workflow("ordering", **options)  # type: ignore[arg-type]

    @wf.step
    def pick(ctx: StepContext, item: str) -> str:
        calls["pick"] += 1
        return item

    @wf.step(retries=1, **QUICK_RETRY)
    async def fetch_quote(ctx: StepContext, item: str) -> Quote:
        calls["fetch_quote"] += 1
        if broken["on"]:
            raise ConnectionError("supplier API down")
        return Quote(supplier="acme", price=len(item))

    @wf.step
    def order(ctx: StepContext, quote: Quote) -> str:
        calls["order"] += 1
        return f"ordered from {quote.supplier} at {quote.price}"

    return wf


async def test_by_default_a_step_fails_the_session_after_its_retries(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _ordering(calls, {"on": True})

    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        with pytest.raises(StepFailedError, match="after 2 attempt") as failure:
            await runner.wait(sid)

    assert failure.value.step == "fetch_quote"
    session = await stores.load(sid)
    assert session.status == "failed"
    assert session.error == "step 'fetch_quote': ConnectionError: supplier API down"
    assert session.wait is None
    assert calls == Counter({"pick": 1, "fetch_quote": 2})


async def test_a_parked_session_waits_for_an_operator_and_no_runner_picks_it_up(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    wf = _ordering(calls, broken, on_failure="park")

    # Given a session whose step failed under the park policy
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        with pytest.raises(StepFailedError, match="parked"):
            await runner.wait(sid)

    # Then it waits for an operator, with the error recorded
    session = await stores.load(sid)
    assert session.status == "waiting"
    assert session.wait is not None
    assert (session.wait.kind, session.wait.step) == ("operator", "fetch_quote")
    assert session.error == "step 'fetch_quote': ConnectionError: supplier API down"

    # And no runner resumes it on its own; waiting on it says it is parked
    broken["on"] = False
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume_all() == []
        with pytest.raises(StepFailedError, match="is parked"):
            await runner.wait(sid)
    assert calls == Counter({"pick": 1, "fetch_quote": 2})

    # When the operator resumes it, the step gets a fresh budget and the rest runs
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume(sid) == "ordered from acme at 5"
    assert calls == Counter({"pick": 1, "fetch_quote": 3, "order": 1})
    session = await stores.load(sid)
    assert (session.status, session.wait, session.error) == ("completed", None, None)
    assert [r.attempt for r in session.tool_history if r.name == "fetch_quote"] == [1, 2, 3]


async def test_skip_records_the_operators_output_and_runs_the_rest(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _ordering(calls, {"on": True}, on_failure="park")
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        with pytest.raises(StepFailedError):
            await runner.wait(sid)

    # When the operator supplies the quote by hand, in a new runner
    async with Runner(stores.open(), [wf]) as runner:
        result = await runner.skip(sid, {"supplier": "phone order", "price": 12})

    # Then the next step got it, typed, and the skip is in the history
    assert result == "ordered from phone order at 12"
    assert calls == Counter({"pick": 1, "fetch_quote": 2, "order": 1})
    session = await stores.load(sid)
    assert session.status == "completed"
    assert session.outputs["fetch_quote"] == {"supplier": "phone order", "price": 12}
    skipped = [r for r in session.tool_history if r.kind == "skip"]
    assert [(r.name, r.output) for r in skipped] == [
        ("fetch_quote", {"supplier": "phone order", "price": 12})
    ]


async def test_skip_refuses_an_output_that_does_not_fit_and_changes_nothing(
    stores: Stores,
) -> None:
    wf = _ordering(Counter(), {"on": True})
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        with pytest.raises(StepFailedError):
            await runner.wait(sid)
        before = await stores.load(sid)

        with pytest.raises(InvalidArgumentError, match="does not fit"):
            await runner.skip(sid, {"supplier": "nobody"})

    after = await stores.load(sid)
    assert (after.status, after.revision, after.steps_done) == (
        "failed",
        before.revision,
        ["pick"],
    )


async def test_skip_refuses_a_session_that_neither_failed_nor_is_parked(stores: Stores) -> None:
    wf = _ordering(Counter(), {"on": False})
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        await runner.wait(sid)
        with pytest.raises(InvalidArgumentError, match="is completed"):
            await runner.skip(sid, {"supplier": "x", "price": 1})


async def test_a_parked_session_can_be_cancelled(stores: Stores) -> None:
    wf = _ordering(Counter(), {"on": True}, on_failure="park")
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "bolts")
        with pytest.raises(StepFailedError):
            await runner.wait(sid)

        await runner.cancel(sid)

        with pytest.raises(SessionCancelledError):
            await runner.resume(sid)
    session = await stores.load(sid)
    assert (session.status, session.error) == ("cancelled", "cancelled")


async def test_a_step_policy_overrides_the_workflows(stores: Stores) -> None:
    wf = Workflow("mixed", on_failure="park")

    @wf.step(on_failure="fail")
    def strict(ctx: StepContext, value: int) -> int:
        raise ValueError("bad input")

    other = Workflow("mixed-2")

    @other.step(on_failure="park")
    def lenient(ctx: StepContext, value: int) -> int:
        raise ValueError("bad input")

    async with Runner(stores.open(), [wf, other]) as runner:
        first = await runner.start(wf, 1)
        second = await runner.start(other, 1)
        for sid in (first, second):
            with pytest.raises(StepFailedError):
                await runner.wait(sid)

    assert (await stores.load(first)).status == "failed"
    assert (await stores.load(second)).status == "waiting"


@pytest.mark.parametrize("policy", ["retry", "", None, 3])
def test_an_unknown_failure_policy_is_refused_at_declaration(policy: object) -> None:
    with pytest.raises(WorkflowDefinitionError, match="on_failure"):
        Workflow("bad", on_failure=policy)  # type: ignore[arg-type]
    wf = Workflow("bad-step")
    if policy is not None:
        with pytest.raises(WorkflowDefinitionError, match="on_failure"):
            wf.step(on_failure=policy)  # type: ignore[call-overload]


PARKING_WORKFLOW = """
from engine import StepContext, Workflow

wf = Workflow("parking", on_failure="park")


@wf.step
def total(ctx: StepContext, prices: list[int]) -> int:
    raise ConnectionError("tax service down")


@wf.step
def invoice(ctx: StepContext, amount: int) -> str:
    return f"invoice for {amount}"
"""


def test_the_command_line_skips_or_cancels_a_parked_session(tmp_path: Path) -> None:
    # Given two parked sessions of a workflow file
    flow = tmp_path / "parking.py"
    flow.write_text(PARKING_WORKFLOW)
    store = str(tmp_path / "sessions")
    cli = CliRunner()
    sids = []
    for _ in range(2):
        ran = cli.invoke(app, ["run", str(flow), "--input", "[1, 2]", "--store", store, "--json"])
        assert ran.exit_code == 1
        sids.append(json.loads(ran.stdout)["session_id"])

    # When the operator skips the step of one and cancels the other
    skipped = cli.invoke(app, ["skip", sids[0], "--output", "30", "--store", store])
    cancelled = cli.invoke(app, ["cancel", sids[1], "--store", store])

    # Then the first completed with the given output, and the second is cancelled
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout) == "invoice for 30"
    assert cancelled.exit_code == 0, cancelled.output
    resumed = cli.invoke(app, ["resume", sids[1], "--store", store])
    assert resumed.exit_code == 1
    assert "cancelled" in resumed.output
    bad = cli.invoke(app, ["skip", sids[1], "--output", "{", "--store", store])
    assert bad.exit_code == 2
    assert "--output" in bad.output
