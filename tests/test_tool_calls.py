"""``ctx.tool``: every call recorded as a ToolResult, and replayed (not called again) on a re-run.

Runs against a MemoryStore and a FileStore; "a new Runner" is what a restarted
process sees. Re-runs after a real SIGKILL are in test_workflow_crash.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from workflow_support import QUICK_RETRY, Stores, eventually

from engine import (
    InvalidArgumentError,
    Runner,
    SerializationError,
    StepContext,
    StepFailedError,
    Workflow,
)
from engine.models import utcnow


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


class Hit(BaseModel):
    title: str
    score: float


async def test_each_call_is_a_tool_result_with_digest_output_duration_and_error(
    stores: Stores,
) -> None:
    wf = Workflow("tools")

    def search(query: str, limit: int = 2) -> list[str]:
        return [f"{query} {n}" for n in range(limit)]

    async def fetch(url: str) -> str:
        raise ConnectionError(f"{url} unreachable")

    @wf.step
    async def research(ctx: StepContext, topic: str) -> list[str]:
        found = await ctx.tool("search", search, topic, limit=3)
        with contextlib.suppress(ConnectionError):  # a tool's failure is the step's to handle
            await ctx.tool("fetch", fetch, "https://example.invalid")
        return found

    before = utcnow()
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, "otters")
        assert await runner.wait(sid) == ["otters 0", "otters 1", "otters 2"]

    session = await stores.load(sid)
    search_call, fetch_call, attempt = session.tool_history
    assert (search_call.kind, search_call.name, search_call.step) == ("tool", "search", "research")
    assert search_call.output == ["otters 0", "otters 1", "otters 2"]
    assert search_call.error is None
    assert search_call.input_digest is not None
    assert search_call.duration >= 0
    assert before <= search_call.started_at <= search_call.finished_at
    assert (fetch_call.kind, fetch_call.name) == ("tool", "fetch")
    assert fetch_call.error == "ConnectionError: https://example.invalid unreachable"
    assert (attempt.kind, attempt.name, attempt.error) == ("step", "research", None)
    assert session.journal == {}  # the journal of a completed step is gone


async def test_a_retried_step_replays_finished_calls_and_repeats_failed_ones(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    wf = Workflow("retry-tools")

    def charge(amount: int) -> str:
        calls["charge"] += 1
        return f"receipt-{amount}"

    def notify(receipt: str) -> None:
        calls["notify"] += 1
        if calls["notify"] < 3:
            raise ConnectionError("mail server down")

    @wf.step(retries=3, **QUICK_RETRY)
    async def checkout(ctx: StepContext, amount: int) -> str:
        receipt = await ctx.tool("charge", charge, amount)
        await ctx.tool("notify", notify, receipt)
        return receipt

    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.run(wf, 42) == "receipt-42"

    # The card was charged once, though the step ran three times.
    assert calls == Counter({"charge": 1, "notify": 3})


async def test_a_restarted_step_gets_recorded_results_without_calling_again(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    held = asyncio.Event()
    wf = Workflow("restart-tools")

    async def lookup(key: str) -> Hit:
        calls[key] += 1
        return Hit(title=key.upper(), score=0.5)

    @wf.step
    async def gather(ctx: StepContext, keys: list[str]) -> list[Hit]:
        hits = [await ctx.tool("lookup", lookup, key) for key in keys]
        if calls["b"] == 1 and not held.is_set():  # the first run stops here
            held.set()
            await asyncio.Event().wait()
        return hits

    # Given a runner that stops while the step is in flight, after its calls
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, ["a", "b"])
        await eventually(held.is_set)

    # When a new runner runs the step again
    async with Runner(stores.open(), [wf]) as runner:
        hits = await runner.wait(sid)

    # Then it got the recorded results, typed, and called nothing twice
    assert hits == [Hit(title="A", score=0.5), Hit(title="B", score=0.5)]
    assert calls == Counter({"a": 1, "b": 1})
    session = await stores.load(sid)
    assert [r.name for r in session.tool_history if r.kind == "tool"] == ["lookup", "lookup"]


async def test_identical_calls_are_told_apart_by_their_position(stores: Stores) -> None:
    calls: list[int] = []
    wf = Workflow("dice")

    def roll(sides: int) -> int:
        calls.append(sides)
        return len(calls)

    @wf.step(retries=1, **QUICK_RETRY)
    async def play(ctx: StepContext, sides: int) -> list[int]:
        rolls = [await ctx.tool("roll", roll, sides) for _ in range(3)]
        if ctx.attempt == 1:
            raise RuntimeError("table knocked over")
        return rolls

    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.run(wf, 6) == [1, 2, 3]

    assert calls == [6, 6, 6]  # three calls, each made once, replayed in order


async def test_concurrent_calls_are_each_recorded_and_replayed(stores: Stores) -> None:
    calls = Counter[str]()
    wf = Workflow("fan-out")

    async def price(item: str) -> int:
        calls[item] += 1
        await asyncio.sleep(0)
        return len(item)

    @wf.step(retries=1, **QUICK_RETRY)
    async def quote(ctx: StepContext, items: list[str]) -> int:
        prices = await asyncio.gather(*(ctx.tool("price", price, item) for item in items))
        if ctx.attempt == 1:
            raise RuntimeError("lost the quote")
        return sum(prices)

    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.run(wf, ["tea", "milk", "bread"]) == 12

    assert calls == Counter({"tea": 1, "milk": 1, "bread": 1})


async def test_arguments_that_are_not_json_raise_serialization_error(stores: Stores) -> None:
    calls = Counter[str]()
    wf = Workflow("bad-args")

    def use(handle: object) -> str:
        calls["use"] += 1
        return "used"

    @wf.step(retries=3, **QUICK_RETRY)
    async def step(ctx: StepContext, value: int) -> str:
        return await ctx.tool("use", use, object())

    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(SerializationError, match="'use'"):
            await runner.run(wf, 1)

    assert calls == Counter()  # refused before the call, and not retried
    session = (await stores.open().list())[0]
    assert session.status == "running"  # kept at its last checkpoint


async def test_a_result_that_is_not_json_raises_serialization_error(stores: Stores) -> None:
    wf = Workflow("bad-result")

    @wf.step
    async def step(ctx: StepContext, value: int) -> str:
        await ctx.tool("connect", object)
        return "never"

    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(SerializationError, match="'connect'"):
            await runner.run(wf, 1)


async def test_a_tool_name_must_be_a_non_empty_string(stores: Stores) -> None:
    wf = Workflow("bad-name")

    @wf.step
    async def step(ctx: StepContext, value: int) -> int:
        return await ctx.tool("", abs, value)

    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError, match="non-empty string"):
            await runner.run(wf, -1)


async def test_tool_outside_a_runner_says_so() -> None:
    wf = Workflow("direct")

    @wf.step
    async def step(ctx: StepContext, value: int) -> int:
        return await ctx.tool("abs", abs, value)

    ctx = StepContext(
        session_id="s",
        workflow="direct",
        step="step",
        attempt=1,
        state={},
        input=-1,
        outputs={},
        metadata=None,  # type: ignore[arg-type]
        context=None,  # type: ignore[arg-type]
        log=None,  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgumentError, match="inside a step a Runner runs"):
        await step(ctx, -1)
