"""The Runner: running, checkpointing, retrying, failing, resuming and cancelling workflows.

Every test runs against a MemoryStore and a FileStore (``durability="none"``: these
tests are about the runner's logic; durability has its own tests in test_crash.py
and the store suites). "A new Runner" means what a restarted process sees: the same
MemoryStore again, or a new FileStore on the same folder.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import BaseModel
from workflow_support import QUICK_RETRY, Stores
from workflow_support import eventually as _eventually

from engine import (
    EngineError,
    FileStore,
    InvalidSessionIdError,
    MemoryStore,
    Runner,
    SerializationError,
    Session,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
    StepContext,
    StepEvent,
    StepFailedError,
    StepTimeoutError,
    Store,
    Workflow,
    WorkflowMismatchError,
)


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    """A MemoryStore, or FileStores on one folder; everything opened is closed after."""
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


@pytest.fixture
def store(stores: Stores) -> Store:
    """One store of each kind."""
    return stores.open()


async def _load(store: Store, session_id: str) -> Session:
    session = await store.load(session_id)
    assert session is not None, f"session {session_id} is not stored"
    return session


class Gate:
    """Hold steps at a point until released, and count who reached it."""

    def __init__(self) -> None:
        self.closed = True
        self.waiting: set[str] = set()
        self.opened = asyncio.Event()

    async def pass_through(self, session_id: str) -> None:
        if self.closed:
            self.waiting.add(session_id)
            await self.opened.wait()

    def open(self) -> None:
        self.closed = False
        self.opened.set()


def _counted_chain(calls: Counter[str], broken: dict[str, bool] | None = None) -> Workflow:
    """Three int steps counting their executions; ``middle`` fails while ``broken["on"]``."""
    wf = Workflow("chain")

    @wf.step
    def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value + 1

    @wf.step
    async def middle(ctx: StepContext, value: int) -> int:
        calls["middle"] += 1
        if broken is not None and broken["on"]:
            raise RuntimeError("middle is broken")
        return value * 10

    @wf.step
    def last(ctx: StepContext, value: int) -> int:
        calls["last"] += 1
        return value + 5

    return wf


# -- data flow ------------------------------------------------------------------


async def test_outputs_flow_from_step_to_step_and_run_returns_the_last(store: Store) -> None:
    received: list[tuple[str, Any]] = []
    wf = Workflow("flow")

    @wf.step
    def split(ctx: StepContext, text: str) -> list[str]:
        received.append(("split", text))
        return text.split()

    @wf.step
    async def count(ctx: StepContext, words: list[str]) -> dict[str, int]:
        received.append(("count", words))
        return dict(Counter(words))

    @wf.step
    def top(ctx: StepContext, counts: dict[str, int]) -> str:
        received.append(("top", counts))
        return max(counts, key=lambda word: counts[word])

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, "b a b c b a")
        result = await runner.wait(sid)

    assert result == "b"
    assert received == [
        ("split", "b a b c b a"),
        ("count", ["b", "a", "b", "c", "b", "a"]),
        ("top", {"b": 3, "a": 2, "c": 1}),
    ]
    stored = await _load(store, sid)
    assert stored.status == "completed"
    assert stored.steps_done == ["split", "count", "top"]
    assert stored.outputs["top"] == "b"


async def test_sync_steps_run_in_a_worker_thread_and_async_steps_on_the_loop(
    store: Store,
) -> None:
    threads: dict[str, int] = {}
    wf = Workflow("threads")

    @wf.step
    def blocking(ctx: StepContext, value: int) -> int:
        threads["sync"] = threading.get_ident()
        return value

    @wf.step
    async def cooperative(ctx: StepContext, value: int) -> int:
        threads["async"] = threading.get_ident()
        return value

    async with Runner(store, [wf]) as runner:
        await runner.run(wf, 1)

    loop_thread = threading.get_ident()
    assert threads["async"] == loop_thread
    assert threads["sync"] != loop_thread


async def test_step_context_describes_the_running_step(store: Store) -> None:
    seen: dict[str, dict[str, Any]] = {}
    wf = Workflow("ctx")

    def record(ctx: StepContext) -> None:
        seen[ctx.step] = {
            "session_id": ctx.session_id,
            "workflow": ctx.workflow,
            "step": ctx.step,
            "attempt": ctx.attempt,
            "state": dict(ctx.state),
            "input": ctx.input,
            "outputs": dict(ctx.outputs),
            "tags": list(ctx.metadata.tags),
            "origin": ctx.metadata.origin,
            "user_id": ctx.context.user_id,
            "permissions": list(ctx.context.permissions),
            "idempotency_key": ctx.idempotency_key,
            "log_context": structlog.get_context(ctx.log),
        }

    @wf.step
    def first(ctx: StepContext, value: int) -> int:
        record(ctx)
        ctx.state["seen"] = True
        ctx.log.info("first.ran", value=value)
        return value + 1

    @wf.step
    async def second(ctx: StepContext, value: int) -> int:
        record(ctx)
        return value * 2

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(
            wf,
            20,
            metadata={"tags": ["urgent"], "origin": "tests"},
            context={"user_id": "user123", "permissions": ["read-data"]},
        )
        assert await runner.wait(sid) == 42

    first_ctx, second_ctx = seen["first"], seen["second"]
    for name, ctx in seen.items():
        assert ctx["session_id"] == sid
        assert ctx["workflow"] == "ctx"
        assert ctx["step"] == name
        assert ctx["attempt"] == 1
        assert ctx["tags"] == ["urgent"]
        assert ctx["origin"] == "tests"
        assert ctx["user_id"] == "user123"
        assert ctx["permissions"] == ["read-data"]
        assert ctx["log_context"]["session_id"] == sid
        assert ctx["log_context"]["step"] == name
        assert ctx["log_context"]["attempt"] == 1
    assert first_ctx["input"] == 20
    assert first_ctx["outputs"] == {}
    assert first_ctx["state"] == {}
    assert second_ctx["input"] == 21
    assert second_ctx["outputs"] == {"first": 21}
    assert second_ctx["state"] == {"seen": True}
    assert first_ctx["idempotency_key"] != second_ctx["idempotency_key"]
    assert sid in first_ctx["idempotency_key"]


async def test_idempotency_key_is_stable_across_a_resume(stores: Stores) -> None:
    keys: list[str] = []
    broken = {"on": True}
    wf = Workflow("keys")

    @wf.step
    def prepare(ctx: StepContext, value: int) -> int:
        return value

    @wf.step
    async def charge(ctx: StepContext, value: int) -> int:
        keys.append(ctx.idempotency_key)
        if broken["on"]:
            raise ConnectionError("payment service down")
        return value

    # Given a session whose step failed after reading its idempotency key
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 5)
        with pytest.raises(StepFailedError):
            await runner.wait(sid)
        other = await runner.start(wf, 5)
        with pytest.raises(StepFailedError):
            await runner.wait(other)

    # When a new runner resumes it after the outage
    broken["on"] = False
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume(sid) == 5

    # Then the step saw the same key both times, and another session saw another key
    assert len(keys) == 3
    assert keys[0] == keys[2]
    assert keys[1] != keys[0]


# -- state ----------------------------------------------------------------------


async def test_state_commits_with_its_step_and_failed_attempts_are_discarded(
    store: Store,
) -> None:
    seen_on_retry: list[dict[str, Any]] = []
    wf = Workflow("state")

    @wf.step
    def setup(ctx: StepContext, value: int) -> int:
        ctx.state["count"] = 1
        ctx.state["scratch"] = "temporary"
        ctx.state["nested"] = {"items": [1]}
        return value

    @wf.step(retries=1, **QUICK_RETRY)
    def flaky(ctx: StepContext, value: int) -> int:
        if ctx.attempt == 1:
            ctx.state["count"] = 99
            ctx.state["poison"] = True
            ctx.state["nested"]["items"].append(2)
            del ctx.state["scratch"]
            raise ConnectionError("first attempt fails")
        seen_on_retry.append(ctx.state.copy())
        ctx.state["flaky"] = "ok"
        del ctx.state["scratch"]
        return value

    @wf.step
    def doomed(ctx: StepContext, value: int) -> int:
        ctx.state["late"] = "never committed"
        ctx.state["count"] = -1
        raise ValueError("always fails")

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        with pytest.raises(StepFailedError):
            await runner.wait(sid)

    # The retry started from the committed state, not from the failed attempt's edits.
    assert seen_on_retry == [
        {"count": 1, "scratch": "temporary", "nested": {"items": [1]}},
    ]
    stored = await _load(store, sid)
    assert stored.state == {"count": 1, "nested": {"items": [1]}, "flaky": "ok"}
    assert stored.status == "failed"


# -- retries and timeouts ----------------------------------------------------------


async def test_flaky_step_succeeds_on_its_third_attempt(store: Store) -> None:
    attempts_seen: list[int] = []
    wf = Workflow("flaky")

    @wf.step
    def before(ctx: StepContext, value: int) -> int:
        return value + 1

    @wf.step(retries=3, **QUICK_RETRY)
    async def fetch(ctx: StepContext, value: int) -> int:
        attempts_seen.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"flake {ctx.attempt}")
        return value * 2

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        assert await runner.wait(sid) == 4

    assert attempts_seen == [1, 2, 3]
    stored = await _load(store, sid)
    assert stored.status == "completed"
    history = [(r.name, r.attempt, r.error) for r in stored.tool_history]
    assert history == [
        ("before", 1, None),
        ("fetch", 1, "ConnectionError: flake 1"),
        ("fetch", 2, "ConnectionError: flake 2"),
        ("fetch", 3, None),
    ]
    assert all(result.step == result.name for result in stored.tool_history)
    assert stored.outputs == {"before": 2, "fetch": 4}


async def test_exception_outside_retry_on_fails_at_once(store: Store) -> None:
    calls = Counter[str]()
    wf = Workflow("picky")

    @wf.step(retries=3, retry_on=ConnectionError, **QUICK_RETRY)
    def lookup(ctx: StepContext, value: int) -> int:
        calls["lookup"] += 1
        raise KeyError("missing")

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        with pytest.raises(StepFailedError) as failure:
            await runner.wait(sid)

    assert calls["lookup"] == 1
    assert failure.value.step == "lookup"
    assert failure.value.session_id == sid
    assert isinstance(failure.value.__cause__, KeyError)
    stored = await _load(store, sid)
    assert stored.status == "failed"
    assert [(r.attempt, r.error) for r in stored.tool_history] == [(1, "KeyError: 'missing'")]


async def test_matching_retry_on_is_retried(store: Store) -> None:
    calls = Counter[str]()
    wf = Workflow("picky-ok")

    @wf.step(retries=2, retry_on=(KeyError, ConnectionError), **QUICK_RETRY)
    def lookup(ctx: StepContext, value: int) -> int:
        calls["lookup"] += 1
        if ctx.attempt == 1:
            raise KeyError("not yet")
        return value

    async with Runner(store, [wf]) as runner:
        assert await runner.run(wf, 7) == 7

    assert calls["lookup"] == 2


async def test_each_attempt_gets_the_timeout_and_a_slow_one_is_retried(store: Store) -> None:
    stopped: list[int] = []
    wf = Workflow("slow-once")

    @wf.step(timeout=0.05, retries=1, **QUICK_RETRY)
    async def slow_once(ctx: StepContext, value: int) -> int:
        if ctx.attempt == 1:
            try:
                await asyncio.Event().wait()  # hangs until the timeout cancels it
            except asyncio.CancelledError:
                stopped.append(ctx.attempt)
                raise
        return value + 1

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        assert await runner.wait(sid) == 2

    assert stopped == [1]
    stored = await _load(store, sid)
    errors = [r.error for r in stored.tool_history]
    assert len(errors) == 2
    assert errors[0] is not None
    assert errors[0].startswith("StepTimeoutError")
    assert errors[1] is None


async def test_timeout_after_retries_raises_step_failed_from_a_step_timeout(
    store: Store,
) -> None:
    stopped: list[int] = []
    wf = Workflow("always-slow")

    @wf.step(timeout=timedelta(milliseconds=30), retries=2, **QUICK_RETRY)
    async def hang(ctx: StepContext, value: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(ctx.attempt)
            raise
        return value

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        with pytest.raises(StepFailedError) as failure:
            await runner.wait(sid)

    assert isinstance(failure.value.__cause__, StepTimeoutError)
    assert stopped == [1, 2, 3]
    stored = await _load(store, sid)
    assert stored.status == "failed"
    assert [r.attempt for r in stored.tool_history] == [1, 2, 3]
    assert all((r.error or "").startswith("StepTimeoutError") for r in stored.tool_history)


# -- failing and resuming ---------------------------------------------------------


async def test_failed_step_fails_the_session_and_resume_runs_only_what_remains(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    wf = _counted_chain(calls, broken)

    # Given a run whose middle step fails
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError) as from_run:
            await runner.run(wf, 1)
        sid = from_run.value.session_id
        assert from_run.value.step == "middle"
        # waiting on a failed session reports the failure; only resume retries
        with pytest.raises(StepFailedError) as from_wait:
            await runner.wait(sid)
        assert from_wait.value.step == "middle"

    failed = await _load(stores.open(), sid)
    assert failed.status == "failed"
    assert failed.steps_done == ["first"]
    assert failed.error is not None
    assert "middle" in failed.error
    assert calls == Counter({"first": 1, "middle": 1})

    # When the code is fixed and a new runner resumes the session
    broken["on"] = False
    async with Runner(stores.open(), [wf]) as runner:
        result = await runner.resume(sid)

    # Then only the failed step and the ones after it ran
    assert result == (1 + 1) * 10 + 5
    assert calls == Counter({"first": 1, "middle": 2, "last": 1})
    done = await _load(stores.open(), sid)
    assert done.status == "completed"
    assert done.steps_done == ["first", "middle", "last"]


async def test_resume_of_a_completed_session_runs_nothing(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _counted_chain(calls)
    # Given a completed session
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 2)
        assert await runner.wait(sid) == 35
        # When it is resumed by the runner that ran it, then its output comes back
        assert await runner.resume(sid) == 35

    # And a new runner gets it too
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume(sid) == 35

    # Without any step running again
    assert calls == Counter({"first": 1, "middle": 1, "last": 1})


class Report(BaseModel):
    """A pydantic step output that must come back as a model after a restart."""

    title: str
    pages: list[int]
    made_at: datetime


STAMP = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def _typed_workflow(seen: dict[str, Any], broken: dict[str, bool]) -> Workflow:
    wf = Workflow("typed")

    @wf.step
    def make_report(ctx: StepContext, title: str) -> Report:
        return Report(title=title, pages=[3, 1, 2], made_at=STAMP)

    @wf.step
    def page_numbers(ctx: StepContext, report: Report) -> list[int]:
        return sorted(report.pages)

    @wf.step
    async def index(ctx: StepContext, pages: list[int]) -> dict[str, int]:
        return {f"p{n}": n for n in pages}

    @wf.step
    def stamp(ctx: StepContext, index: dict[str, int]) -> datetime:
        return STAMP + timedelta(days=len(index))

    @wf.step
    def finish(ctx: StepContext, when: datetime) -> Report:
        if broken["on"]:
            raise RuntimeError("finish is broken")
        seen["when"] = when
        seen["outputs"] = dict(ctx.outputs)
        report = ctx.outputs["make_report"]
        return Report(title=report.title.upper(), pages=ctx.outputs["page_numbers"], made_at=when)

    return wf


async def test_typed_outputs_come_back_typed_after_a_resume_in_a_new_runner(
    tmp_path: Path,
) -> None:
    seen: dict[str, Any] = {}
    broken = {"on": True}
    wf = _typed_workflow(seen, broken)
    folder = tmp_path / "sessions"

    # Given a session that stopped at its last step
    async with Runner(FileStore(folder, durability="none"), [wf]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(wf, "annual")
    sid = failure.value.session_id

    # When a new runner, on a new store over the same folder, resumes it
    broken["on"] = False
    async with Runner(FileStore(folder, durability="none"), [wf]) as runner:
        result = await runner.resume(sid)

    # Then every earlier output was restored to its declared type
    expected_when = STAMP + timedelta(days=3)
    assert isinstance(seen["when"], datetime)
    assert seen["when"] == expected_when
    outputs = seen["outputs"]
    assert outputs["make_report"] == Report(title="annual", pages=[3, 1, 2], made_at=STAMP)
    assert isinstance(outputs["make_report"], Report)
    assert outputs["page_numbers"] == [1, 2, 3]
    assert outputs["index"] == {"p1": 1, "p2": 2, "p3": 3}
    assert outputs["stamp"] == expected_when
    expected = Report(title="ANNUAL", pages=[1, 2, 3], made_at=expected_when)
    assert result == expected
    assert isinstance(result, Report)

    # And a third runner gets the completed, typed output without running anything
    broken["on"] = True
    async with Runner(FileStore(folder, durability="none"), [wf]) as runner:
        again = await runner.resume(sid)
    assert again == expected
    assert isinstance(again, Report)


class _Unserializable:
    """Build a value JSON cannot hold, and free whatever it holds afterwards."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._sockets: list[socket.socket] = []

    def make(self) -> Any:
        if self.kind == "socket":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sockets.append(sock)
            return sock
        return object()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.mark.parametrize(
    ("kind", "where"),
    [("object", "output"), ("socket", "output"), ("object", "state")],
)
async def test_unserializable_value_raises_serialization_error_and_keeps_the_checkpoint(
    stores: Stores, kind: str, where: str
) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    before: list[Session] = []
    bad = _Unserializable(kind)
    store = stores.open()
    wf = Workflow("unserializable")

    @wf.step
    def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value + 1

    @wf.step
    async def second(ctx: StepContext, value: int) -> Any:
        calls["second"] += 1
        if broken["on"]:
            before.append(await _load(store, ctx.session_id))  # the last checkpoint
            if where == "state":
                ctx.state["handle"] = bad.make()
                return value
            return bad.make()
        return value * 3

    try:
        # Given a step returning (or storing in state) something JSON cannot hold
        async with Runner(store, [wf]) as runner:
            sid = await runner.start(wf, 1)

            # When the session runs, then the error names the step and is not a step failure
            with pytest.raises(SerializationError, match="'second'") as raised:
                await runner.wait(sid)
            assert not isinstance(raised.value, StepFailedError)

        # Then the session stays exactly at its last checkpoint
        stuck = await _load(stores.open(), sid)
        (checkpoint,) = before
        assert stuck.revision == checkpoint.revision
        assert stuck.steps_done == checkpoint.steps_done == ["first"]
        assert stuck.status == checkpoint.status
        assert stuck.state == checkpoint.state
        assert [r.name for r in stuck.tool_history] == ["first"]

        # And after the fix a new runner resumes it from there
        broken["on"] = False
        async with Runner(stores.open(), [wf]) as runner:
            assert await runner.resume(sid) == 6
        assert calls == Counter({"first": 1, "second": 2})
    finally:
        bad.close()


async def test_unserializable_input_is_rejected_before_anything_is_stored(
    store: Store,
) -> None:
    calls = Counter[str]()
    wf = _counted_chain(calls)

    async with Runner(store, [wf]) as runner:
        with pytest.raises(SerializationError, match="input"):
            await runner.run(wf, object())
        with pytest.raises(SerializationError):
            await runner.start(wf, {"when": STAMP, "handle": object()})

        assert await store.list() == []
    assert calls == Counter()


async def test_non_finite_float_output_survives_a_restart_or_is_refused(
    tmp_path: Path,
) -> None:
    """A NaN must not be stored as null and then break the resume (JSON has no NaN)."""
    broken = {"on": True}
    wf = Workflow("nan")

    @wf.step
    def ratio(ctx: StepContext, value: float) -> float:
        return math.nan

    @wf.step
    def use(ctx: StepContext, value: float) -> float:
        if broken["on"]:
            raise RuntimeError("not yet")
        return value

    folder = tmp_path / "sessions"
    async with Runner(FileStore(folder, durability="none"), [wf]) as runner:
        sid = await runner.start(wf, 1.0)
        try:
            await runner.wait(sid)
        except SerializationError:
            return  # refusing the value up front is a correct answer too
        except StepFailedError:
            pass

    broken["on"] = False
    async with Runner(FileStore(folder, durability="none"), [wf]) as runner:
        result = await runner.resume(sid)
    assert math.isnan(result)


# -- starting with a session id -------------------------------------------------------


async def test_start_with_an_existing_session_id_does_not_rerun_completed_steps(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    gate = Gate()
    wf = Workflow("keyed")

    @wf.step
    def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value + 1

    @wf.step
    async def second(ctx: StepContext, value: int) -> int:
        calls["second"] += 1
        await gate.pass_through(ctx.session_id)
        return value * 10

    @wf.step
    def third(ctx: StepContext, value: int) -> int:
        calls["third"] += 1
        return value + 5

    sid = str(uuid.uuid4())

    # Given a session started under a caller's id, interrupted in its second step
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.start(wf, 1, session_id=sid) == sid
        await _eventually(lambda: sid in gate.waiting)

    # When the caller starts "again" with the same id (and another input)
    gate.open()
    async with Runner(stores.open(), [wf]) as runner:
        again = await runner.start(wf, 999, session_id=sid)
        result = await runner.wait(again)
        # and once more after it completed
        assert await runner.start(wf, 5, session_id=sid) == sid
        assert await runner.wait(sid) == result

    # Then it is the same session, continued: completed steps did not run again
    assert again == sid
    assert result == 25
    assert calls == Counter({"first": 1, "second": 2, "third": 1})
    assert [row.id for row in await stores.open().list()] == [sid]


async def test_concurrent_starts_with_one_session_id_share_one_run(store: Store) -> None:
    calls = Counter[str]()
    wf = _counted_chain(calls)
    sid = str(uuid.uuid4())

    async with Runner(store, [wf]) as runner:
        results = await asyncio.gather(
            runner.run(wf, 1, session_id=sid),
            runner.run(wf, 1, session_id=sid),
            return_exceptions=True,
        )

    assert list(results) == [25, 25]
    assert calls == Counter({"first": 1, "middle": 1, "last": 1})


@pytest.mark.parametrize(
    "bad_id",
    [
        "not-a-uuid",
        "../../etc/passwd",
        "",
        str(uuid.uuid4()).upper(),
        str(uuid.uuid1()),
        str(uuid.uuid4()) + "/..",
    ],
)
async def test_start_with_an_invalid_session_id_is_refused(store: Store, bad_id: str) -> None:
    calls = Counter[str]()
    wf = _counted_chain(calls)

    async with Runner(store, [wf]) as runner:
        with pytest.raises(InvalidSessionIdError):
            await runner.start(wf, 1, session_id=bad_id)
        with pytest.raises(InvalidSessionIdError):
            await runner.resume(bad_id)
        assert await store.list() == []
    assert calls == Counter()


async def test_resume_of_an_unknown_session_raises_not_found(store: Store) -> None:
    wf = _counted_chain(Counter())
    async with Runner(store, [wf]) as runner:
        with pytest.raises(SessionNotFoundError):
            await runner.resume(str(uuid.uuid4()))


async def test_resume_of_an_expired_session_raises_expired(stores: Stores) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    wf = _counted_chain(calls, broken)

    # Given a failed session whose TTL then ran out
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(wf, 1, ttl=3600)
    sid = failure.value.session_id
    store = stores.open()
    session = await _load(store, sid)
    session.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await store.save(session)

    # When it is resumed after the fix
    broken["on"] = False
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(SessionExpiredError):
            await runner.resume(sid)

    # Then nothing ran
    assert calls == Counter({"first": 1, "middle": 1})


async def test_resume_after_a_completed_step_was_renamed_raises_mismatch(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    old = _counted_chain(calls, broken)
    # Given a session that completed "first", then failed
    async with Runner(stores.open(), [old]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(old, 1)
    sid = failure.value.session_id

    # When the next version of the workflow renames the completed step
    renamed = Workflow("chain", version="2")

    @renamed.step
    def start(ctx: StepContext, value: int) -> int:  # was "first", already completed
        calls["start"] += 1
        return value + 1

    @renamed.step
    def middle(ctx: StepContext, value: int) -> int:
        calls["middle"] += 1
        return value * 10

    # Then resuming refuses, naming the step, and nothing runs or changes
    broken["on"] = False
    async with Runner(stores.open(), [renamed]) as runner:
        with pytest.raises(WorkflowMismatchError, match="'first'"):
            await runner.resume(sid)

    assert calls == Counter({"first": 1, "middle": 1})
    assert (await _load(stores.open(), sid)).steps_done == ["first"]


async def test_resume_after_steps_were_appended_continues(stores: Stores) -> None:
    calls = Counter[str]()
    broken = {"on": True}
    old = _counted_chain(calls, broken)
    # Given a session that failed in its second step
    async with Runner(stores.open(), [old]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(old, 1)
    sid = failure.value.session_id

    # When the fixed workflow also gains a step at the end
    broken["on"] = False
    grown = _counted_chain(calls, broken)

    @grown.step
    def extra(ctx: StepContext, value: int) -> int:
        calls["extra"] += 1
        return -value

    # Then the session fits it still, and resumes into the new step
    async with Runner(stores.open(), [grown]) as runner:
        assert await runner.resume(sid) == -25
    assert calls == Counter({"first": 1, "middle": 2, "last": 1, "extra": 1})


# -- resume_all -------------------------------------------------------------------------


def _gated(name: str, gate: Gate, ran: list[tuple[str, str]]) -> Workflow:
    """Two steps; ``second`` stops at ``gate`` while it is closed."""
    wf = Workflow(name)

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        ran.append((ctx.session_id, "first"))
        return value + 1

    @wf.step
    async def second(ctx: StepContext, value: int) -> int:
        ran.append((ctx.session_id, "second"))
        if value < 0:
            raise ValueError("negative")
        await gate.pass_through(ctx.session_id)
        return value * 2

    return wf


async def test_resume_all_resumes_exactly_the_live_unfinished_sessions(stores: Stores) -> None:
    gate, ran = Gate(), list[tuple[str, str]]()
    main, other = _gated("main", gate, ran), _gated("other", gate, ran)

    # Given sessions in every situation, left behind by a runner that stopped
    async with Runner(stores.open(), [main, other]) as runner:
        gate.closed = False
        completed = await runner.start(main, 1)
        await runner.wait(completed)
        failed = await runner.start(main, -5)
        with pytest.raises(StepFailedError):
            await runner.wait(failed)
        gate.closed = True
        live = [await runner.start(main, n) for n in (10, 20, 30)]
        expired = await runner.start(main, 40)
        foreign = await runner.start(other, 50)
        await _eventually(lambda: len(gate.waiting) == 5)
    store = stores.open()
    session = await _load(store, expired)
    session.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    await store.save(session)
    ran.clear()

    # When a runner that knows only "main" resumes everything
    gate.open()
    async with Runner(stores.open(), [main]) as runner:
        resumed = await runner.resume_all()
        results = [await runner.wait(sid) for sid in live]

    # Then exactly the live, unexpired, unfinished "main" sessions ran, from their cursor
    assert sorted(resumed) == sorted(live)
    assert results == [22, 42, 62]
    assert sorted(ran) == sorted((sid, "second") for sid in live)
    statuses = {sid: (await _load(store, sid)).status for sid in [*live, completed, failed]}
    assert statuses == {
        **dict.fromkeys(live, "completed"),
        completed: "completed",
        failed: "failed",
    }
    assert (await _load(store, expired)).status == "running"
    assert (await _load(store, foreign)).status == "running"


async def test_resume_all_runs_at_most_max_concurrency_sessions_at_once(
    stores: Stores,
) -> None:
    gate, ran = Gate(), list[tuple[str, str]]()
    active, peak = 0, 0
    wf = Workflow("busy")

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        await gate.pass_through(ctx.session_id)
        return value

    @wf.step
    async def work(ctx: StepContext, value: int) -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        ran.append((ctx.session_id, "work"))
        await asyncio.sleep(0.02)  # hold the slot long enough for others to overlap
        active -= 1
        return value

    # Given six interrupted sessions
    async with Runner(stores.open(), [wf]) as runner:
        sids = [await runner.start(wf, n) for n in range(6)]
        await _eventually(lambda: len(gate.waiting) == 6)

    # When a runner limited to two at once resumes them all
    gate.open()
    async with Runner(stores.open(), [wf], max_concurrency=2) as runner:
        assert sorted(await runner.resume_all()) == sorted(sids)
        results = await asyncio.gather(*(runner.wait(sid) for sid in sids))

    # Then all finished, never more than two at a time, and two did overlap
    assert results == list(range(6))
    assert len(ran) == 6
    assert peak == 2


def _two_gates(name: str, interrupted: Gate, held: Gate, factor: int = 1) -> Workflow:
    """Two steps, the first held by ``interrupted``, the second by ``held``: value x factor."""
    wf = Workflow(name)

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        await interrupted.pass_through(ctx.session_id)
        return value

    @wf.step
    async def second(ctx: StepContext, value: int) -> int:
        await held.pass_through(ctx.session_id)
        return value * factor

    return wf


async def _interrupted(stores: Stores, wf: Workflow, interrupted: Gate, count: int) -> list[str]:
    """Start ``count`` sessions (inputs 0, 1, ...) and stop their runner mid-first-step."""
    async with Runner(stores.open(), [wf]) as runner:
        sids = [await runner.start(wf, n) for n in range(count)]
        await _eventually(lambda: len(interrupted.waiting) == count)
    interrupted.open()
    return sids


async def test_resume_all_keeps_what_cannot_run_yet_as_a_backlog(stores: Stores) -> None:
    interrupted, held = Gate(), Gate()
    wf = _two_gates("backlogged", interrupted, held, factor=10)

    # Given six interrupted sessions
    sids = await _interrupted(stores, wf, interrupted, 6)

    # When a runner limited to two at once resumes them all
    async with Runner(stores.open(), [wf], max_concurrency=2) as runner:
        assert sorted(await runner.resume_all()) == sorted(sids)

        # Then two run and four wait their turn as ids, not as tasks
        await _eventually(lambda: len(held.waiting) == 2)
        assert (runner.active, runner.backlog) == (2, 4)

        # And once the two go on, the backlog runs, to the last session
        held.open()
        assert sorted(await asyncio.gather(*(runner.wait(s) for s in sids))) == [
            n * 10 for n in range(6)
        ]
        assert runner.backlog == 0
        await _eventually(lambda: runner.active == 0)


async def test_a_session_cancelled_in_the_backlog_never_starts(stores: Stores) -> None:
    interrupted, held = Gate(), Gate()
    wf = _two_gates("queued", interrupted, held)

    # Given two interrupted sessions, resumed by a runner that runs one at a time
    sids = await _interrupted(stores, wf, interrupted, 2)
    async with Runner(stores.open(), [wf], max_concurrency=1) as runner:
        await runner.resume_all()
        await _eventually(lambda: len(held.waiting) == 1)
        running = next(iter(held.waiting))
        queued = next(sid for sid in sids if sid != running)

        # When the one still in the backlog is cancelled, then the other goes on
        await runner.cancel(queued)
        assert runner.backlog == 0
        held.open()
        assert await runner.wait(running) == sids.index(running)

        # Then the cancelled one never ran: it stays cancelled
        with pytest.raises(SessionCancelledError):
            await runner.wait(queued)
        assert (await _load(runner.store, queued)).status == "cancelled"
        assert held.waiting == {running}


class _SlowSecondPage(MemoryStore):
    """A memory store whose second page of a listing comes when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.second_page = asyncio.Event()
        self.walking = asyncio.Event()

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = 1000
    ) -> list[Any]:
        if after is not None:
            self.walking.set()
            await self.second_page.wait()
        return await super().list_unfinished_page(after, 1)  # a page per session


async def test_a_closed_runner_starts_nothing_a_walk_in_flight_finds_later() -> None:
    started: list[str] = []
    wf = Workflow("late")

    @wf.step
    async def only(ctx: StepContext, value: int) -> int:
        started.append(ctx.session_id)
        return value

    # Given two unfinished sessions that nobody runs, and a runner walking the store
    store = _SlowSecondPage()
    runner = Runner(store, [wf])
    sids = []
    for _ in range(2):
        session = runner.sessions.new_session(ttl=3600)
        session.workflow = wf.name
        session.workflow_version = wf.version
        session.workflow_fingerprint = wf.fingerprint
        session.input = 1
        await store.create(session)
        sids.append(session.id)
    sids.sort()
    walk = asyncio.ensure_future(runner.resume_all())
    await asyncio.wait_for(store.walking.wait(), 10)
    await _eventually(lambda: runner.active == 0 and len(started) == 1)

    # When the runner closes while its walk waits for the second page
    await runner.close()
    store.second_page.set()
    await asyncio.wait_for(walk, 10)

    # Then the session on that page is not started, and a closed runner says so
    assert runner.active == 0
    assert len(started) == 1
    with pytest.raises(EngineError, match="closed"):
        await runner.wait(sids[1])


async def test_a_session_suspended_on_an_event_gives_its_slot_to_the_backlog(
    stores: Stores,
) -> None:
    interrupted = Gate()
    wf = Workflow("approvals")

    @wf.step
    async def prepare(ctx: StepContext, value: int) -> int:
        await interrupted.pass_through(ctx.session_id)
        return value

    @wf.step
    async def approve(ctx: StepContext, value: int) -> str:
        approver = await ctx.wait_for_event("approved")
        return f"{value} by {approver}"

    # Given three interrupted sessions
    async with Runner(stores.open(), [wf]) as runner:
        sids = [await runner.start(wf, n) for n in range(3)]
        await _eventually(lambda: len(interrupted.waiting) == 3)
    interrupted.open()

    # When a runner that runs one at a time resumes them, and each comes to wait
    async with Runner(stores.open(), [wf], max_concurrency=1) as runner:
        await runner.resume_all()

        async def all_waiting() -> bool:
            loaded = [await runner.store.load(s) for s in sids]
            return all(s is not None and s.status == "waiting" for s in loaded)

        # Then a waiting session holds no slot: every one got to its wait
        await _eventually(all_waiting)
        assert runner.backlog == 0
        for sid in sids:
            await runner.send_event(sid, "approved", "ops")
        assert await asyncio.gather(*(runner.wait(s) for s in sids)) == [
            f"{n} by ops" for n in range(3)
        ]


# -- cancelling and closing ----------------------------------------------------------


async def test_cancel_stops_a_running_session_for_good(stores: Stores) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()
    calls = Counter[str]()
    wf = Workflow("cancel")

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value

    @wf.step
    async def wait_forever(ctx: StepContext, value: int) -> int:
        calls["wait_forever"] += 1
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise
        return value

    # Given a session in the middle of a step
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 1)
        await asyncio.wait_for(started.wait(), timeout=10)

        # When it is cancelled
        await runner.cancel(sid)

        # Then the step was stopped, the session is cancelled, and resume refuses it
        assert stopped.is_set()
        assert (await _load(stores.open(), sid)).status == "cancelled"
        with pytest.raises(SessionCancelledError):
            await runner.resume(sid)

    # And no later runner picks it up again
    async with Runner(stores.open(), [wf]) as runner:
        assert sid not in await runner.resume_all()
        with pytest.raises(SessionCancelledError):
            await runner.resume(sid)
    assert calls == Counter({"first": 1, "wait_forever": 1})
    assert (await _load(stores.open(), sid)).steps_done == ["first"]


async def test_waiting_on_a_session_that_gets_cancelled_raises_cancelled(
    store: Store,
) -> None:
    started = asyncio.Event()
    wf = Workflow("cancel-wait")

    @wf.step
    async def wait_forever(ctx: StepContext, value: int) -> int:
        started.set()
        await asyncio.Event().wait()
        return value

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 1)
        waiter = asyncio.create_task(runner.wait(sid))
        await asyncio.wait_for(started.wait(), timeout=10)

        await runner.cancel(sid)

        # The waiter was not cancelled itself: it must hear why its session ended.
        outcome = (await asyncio.gather(waiter, return_exceptions=True))[0]
        assert isinstance(outcome, SessionCancelledError), repr(outcome)


async def test_leaving_the_runner_cancels_steps_in_flight_and_they_resume_later(
    stores: Stores,
) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()
    calls = Counter[str]()
    hold = {"on": True}
    wf = Workflow("shutdown")

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value + 1

    @wf.step
    async def slow(ctx: StepContext, value: int) -> int:
        calls["slow"] += 1
        if hold["on"]:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.set()
                raise
        return value * 2

    @wf.step
    def last(ctx: StepContext, value: int) -> int:
        calls["last"] += 1
        return value + 3

    # Given a runner left while a step is in flight
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 1)
        await asyncio.wait_for(started.wait(), timeout=10)
    assert stopped.is_set()

    # Then the session waits at its last checkpoint
    stored = await _load(stores.open(), sid)
    assert stored.steps_done == ["first"]
    assert stored.status == "running"

    # And a new runner resumes it from there
    hold["on"] = False
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.resume_all() == [sid]
        assert await runner.wait(sid) == 7
    assert calls == Counter({"first": 1, "slow": 2, "last": 1})


async def test_two_runners_on_one_folder_never_run_a_session_at_once(tmp_path: Path) -> None:
    started = asyncio.Event()
    gate = Gate()
    calls = Counter[str]()
    wf = Workflow("exclusive")

    @wf.step
    async def first(ctx: StepContext, value: int) -> int:
        calls["first"] += 1
        return value + 1

    @wf.step
    async def held(ctx: StepContext, value: int) -> int:
        calls["held"] += 1
        started.set()
        await gate.pass_through(ctx.session_id)
        return value * 2

    folder = tmp_path / "sessions"
    async with (
        Runner(FileStore(folder, durability="none"), [wf]) as one,
        Runner(FileStore(folder, durability="none"), [wf]) as two,
    ):
        # Given runner one in the middle of the session
        sid = await one.start(wf, 1)
        await asyncio.wait_for(started.wait(), timeout=10)

        # When runner two tries to run it too
        with pytest.raises(SessionBusyError):
            await two.resume(sid)
        with pytest.raises(SessionBusyError):
            await two.wait(sid)

        # Then only runner one ran it, and two can read the result once one is done
        gate.open()
        assert await one.wait(sid) == 4
        assert await two.resume(sid) == 4
    assert calls == Counter({"first": 1, "held": 1})


# -- TTL and hooks --------------------------------------------------------------------


async def test_ttl_slides_forward_on_every_checkpoint(store: Store) -> None:
    seen: list[Session] = []
    wf = Workflow("sliding")

    async def look(ctx: StepContext, value: int) -> int:
        seen.append(await _load(store, ctx.session_id))
        return value + 1

    for name in ("one", "two", "three"):
        wf.step(name=name)(look)

    async with Runner(store, [wf]) as runner:
        sid = await runner.start(wf, 0, ttl=timedelta(hours=1))
        assert await runner.wait(sid) == 3
    seen.append(await _load(store, sid))

    expiries = [session.expires_at for session in seen]
    assert expiries == sorted(expiries)
    assert len(set(expiries)) == len(expiries), "some checkpoint did not extend the TTL"
    for session in seen:
        assert session.expires_at - session.last_activity == timedelta(hours=1)


async def test_fixed_ttl_does_not_slide(store: Store) -> None:
    wf = _counted_chain(Counter())
    async with Runner(store, [wf], ttl_policy="fixed") as runner:
        sid = await runner.start(wf, 0, ttl=600)
        await runner.wait(sid)
    stored = await _load(store, sid)
    assert stored.expires_at == stored.created_at + timedelta(seconds=600)
    assert stored.last_activity > stored.created_at


async def test_hooks_hear_every_step_event_in_order_and_a_broken_hook_is_harmless(
    store: Store,
) -> None:
    heard: list[StepEvent] = []

    def broken_hook(event: StepEvent) -> None:
        raise RuntimeError("progress bar crashed")

    def listen(event: StepEvent) -> None:
        heard.append(event)

    wf = Workflow("hooks")

    @wf.step
    def first(ctx: StepContext, value: int) -> int:
        return value + 1

    @wf.step(retries=1, **QUICK_RETRY)
    async def flaky(ctx: StepContext, value: int) -> int:
        if ctx.attempt == 1:
            raise ConnectionError("flake")
        return value * 2

    async with Runner(store, [wf], hooks=[broken_hook, listen]) as runner:
        sid = await runner.start(wf, 1)
        assert await runner.wait(sid) == 4

    assert [(e.kind, e.step, e.attempt, e.index) for e in heard] == [
        ("started", "first", 1, 0),
        ("committed", "first", 1, 0),
        ("started", "flaky", 1, 1),
        ("failed", "flaky", 1, 1),
        ("retrying", "flaky", 1, 1),
        ("started", "flaky", 2, 1),
        ("committed", "flaky", 2, 1),
    ]
    assert all(e.session_id == sid and e.workflow == "hooks" and e.total == 2 for e in heard)
    assert heard[3].error == "ConnectionError: flake"
    assert heard[4].delay is not None
    assert 0 <= heard[4].delay <= QUICK_RETRY["max_backoff"]
    assert all(e.duration is not None for e in heard if e.kind in ("committed", "failed"))
    assert (await _load(store, sid)).status == "completed"


class _SlowAcknowledgement(MemoryStore):
    """A memory store that, once told to, stores a checkpoint and then waits to say so."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.stored = asyncio.Event()
        self.answer = asyncio.Event()

    async def commit(self, lease: Any, checkpoint: Any) -> None:
        await super().commit(lease, checkpoint)
        if self.hold:
            self.stored.set()
            await self.answer.wait()  # a cancellation here comes after the write


async def test_a_commit_cancelled_after_its_write_leaves_the_writer_in_step() -> None:
    from engine.journal import SessionWriter  # noqa: PLC0415  # the runner's own writer

    # Given a writer whose store has stored a checkpoint but not yet said so
    store = _SlowAcknowledgement()
    async with Runner(store, []) as runner:
        session = await runner.sessions.create_session()
    lease = await store.acquire(session.id, "runner-a")
    assert lease is not None
    writer = SessionWriter(store, lease, await _load(store, session.id))
    store.hold = True
    first = asyncio.ensure_future(writer.commit(status="running", attempts={"first": 1}))
    await asyncio.wait_for(store.stored.wait(), 10)

    # When its caller is cancelled there (a step timeout, a cancel)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await writer.drain()

    # Then the next commit builds on what the store holds, and the writer's session is it
    store.hold = False
    await writer.commit(status="running", attempts={"second": 1})
    stored = await _load(store, session.id)
    assert stored.revision == session.revision + 2
    assert stored.attempts == {"first": 1, "second": 1}
    assert writer.session == stored
    await store.release(lease)


@pytest.mark.parametrize("kind", ["file", "sqlite"])
async def test_a_session_committing_on_the_loops_thread_still_lets_other_tasks_run(
    tmp_path: Path, kind: str
) -> None:
    from engine.stores.sqlite import SQLiteStore  # noqa: PLC0415

    # Given a store that commits a lone session on the loop's thread, steps that never
    # await anything (each holds the thread for a millisecond), and another task
    store: Store = (
        FileStore(tmp_path / "sessions", durability="none")
        if kind == "file"
        else SQLiteStore(tmp_path / "sessions.db", durability="none")
    )
    ticks = 0
    seen: list[int] = []  # the other task's turns so far, as each step starts
    workflow = Workflow("busy")
    for index in range(20):

        @workflow.step(name=f"busy{index}")
        async def busy(ctx: StepContext, value: Any) -> int:
            seen.append(ticks)
            time.sleep(0.001)  # noqa: ASYNC251  # blocks the loop, as CPU-bound code does
            return 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    # When the session runs
    async with Runner(store, [workflow], cleanup_interval=None) as runner:
        other = asyncio.ensure_future(ticker())
        await runner.run(workflow, None)
        other.cancel()
    await store.close()

    # Then the other task got the loop between its steps again and again (after
    # 2 ms at most), not only once the session was done
    assert seen[-1] - seen[0] >= 5
