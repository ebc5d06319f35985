"""Events and durable sleep: ``ctx.wait_for_event``, ``runner.send_event``, ``ctx.sleep``.

A waiting session is ``waiting``, holds no lease, and goes on when its event comes
or its time is up, on the runner that waited, on the one the event was sent
through, or through ``resume``/``resume_all`` anywhere. Events sent before the wait
are kept. Restarts by SIGKILL in the middle of a wait and a sleep are in
test_workflow_crash.py; ``stepvault send`` is exercised there and below, including
to a session a runner in another process is running (the file store's inbox).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from workflow_support import InboxStore, Stores, eventually

from engine import (
    FileStore,
    InvalidArgumentError,
    Lease,
    Runner,
    SerializationError,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
    StepContext,
    StepTimeoutError,
    Store,
    Workflow,
)
from engine.events import EventInbox

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_ID = "3f1c9a52-7a4e-4c1e-9d0b-6a2b1c3d4e5f"
FAST = {"poll_interval": 0.02, "inline_wait": 0.05}
"""Runner options for tests: look for events often; suspend even short sleeps."""


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


class Gate:
    """Hold a step until opened."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_through(self) -> None:
        self.reached.set()
        await self.opened.wait()


def _approval(calls: Counter[str], gate: Gate | None = None) -> Workflow:
    """draft -> review (a tool call, then waits for "approval") -> publish."""
    wf = Workflow("approval")

    def price(text: str) -> int:
        calls["price"] += 1
        return len(text)

    @wf.step
    async def draft(ctx: StepContext, text: str) -> str:
        calls["draft"] += 1
        if gate is not None:
            await gate.pass_through()
        return text.upper()

    @wf.step
    async def review(ctx: StepContext, draft: str) -> dict[str, Any]:
        calls["review"] += 1
        cost = await ctx.tool("price", price, draft)
        decision = await ctx.wait_for_event("approval")
        return {"draft": draft, "cost": cost, **decision}

    @wf.step
    def publish(ctx: StepContext, reviewed: dict[str, Any]) -> str:
        calls["publish"] += 1
        verdict = "published" if reviewed["approved"] else "dropped"
        return f"{reviewed['draft']} {verdict} by {reviewed['by']} (cost {reviewed['cost']})"

    return wf


async def _status(store: Store, session_id: str) -> str | None:
    session = await store.load(session_id)
    return None if session is None else session.status


async def _waiting(store: Store, session_id: str) -> bool:
    return await _status(store, session_id) == "waiting"


async def _done(store: Store, session_id: str) -> bool:
    return await _status(store, session_id) == "completed"


async def test_a_session_waits_without_a_lease_and_goes_on_when_the_event_comes(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    wf = _approval(calls)
    async with Runner(stores.open(), [wf], **FAST) as runner:
        # Given a session waiting for its approval
        sid = await runner.start(wf, "memo")
        result = asyncio.ensure_future(runner.wait(sid))
        probe = stores.open()
        await eventually(lambda: _waiting(probe, sid), what="waiting")
        session = await stores.load(sid)
        assert session.wait is not None
        assert (session.wait.kind, session.wait.step, session.wait.event) == (
            "event",
            "review",
            "approval",
        )
        # Nobody holds it while it waits: any runner can take it once the runner has
        # let go (the waiting status is committed just before the lease is released)
        leases: list[Lease] = []

        async def _take() -> bool:
            lease = await probe.acquire(sid, "probe")
            if lease is not None:
                leases.append(lease)
            return lease is not None

        await eventually(_take, what="the lease free while waiting")
        await probe.release(leases[0])

        # When the approval is sent
        await runner.send_event(sid, "approval", {"approved": True, "by": "lee"})

        # Then the session finishes; the review ran again, but its tool call did not
        assert await result == "MEMO published by lee (cost 4)"
    assert calls == Counter({"draft": 1, "review": 2, "price": 1, "publish": 1})
    session = await stores.load(sid)
    taken = [r for r in session.tool_history if r.kind == "event"]
    assert [(r.name, r.step, r.output) for r in taken] == [
        ("approval", "review", {"approved": True, "by": "lee"})
    ]
    assert (session.inbox, session.wait, session.journal) == ([], None, {})


async def test_an_event_sent_before_the_wait_is_kept(stores: Stores) -> None:
    calls = Counter[str]()
    gate = Gate()
    wf = _approval(calls, gate)
    async with Runner(stores.open(), [wf], **FAST) as runner:
        # Given a session still busy in the step before the wait
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), 10)

        # When the event is sent, then the session reaches its wait
        await runner.send_event(sid, "approval", {"approved": False, "by": "kim"})
        gate.opened.set()

        # Then the step took it at once, without suspending
        assert await runner.wait(sid) == "MEMO dropped by kim (cost 4)"
    assert calls["review"] == 1


async def test_an_event_sent_while_no_runner_runs_the_session_is_kept(stores: Stores) -> None:
    calls = Counter[str]()
    gate = Gate()
    wf = _approval(calls, gate)
    # Given a session stopped (its runner closed) before its wait
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), 10)

    # When the event is sent through a runner that does not know the workflow
    async with Runner(stores.open(), **FAST) as sender:
        await sender.send_event(sid, "approval", {"approved": True, "by": "ana"})
    assert [e.name for e in (await stores.load(sid)).inbox] == ["approval"]

    # Then a runner that resumes it later finds it
    gate.opened.set()
    async with Runner(stores.open(), [wf], **FAST) as runner:
        assert await runner.resume_all() == [sid]
        assert await runner.wait(sid) == "MEMO published by ana (cost 4)"
    assert calls["review"] == 1


async def test_a_runner_that_knows_the_workflow_resumes_the_session_it_sends_to(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    wf = _approval(calls)
    # Given a session left waiting by a runner that has stopped
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, "memo")
        await eventually(lambda: _waiting(stores.open(), sid), what="waiting")

    # When another runner sends the event
    async with Runner(stores.open(), [wf], **FAST) as runner:
        await runner.send_event(sid, "approval", {"approved": True, "by": "lee"})

        # Then that runner runs it on, unasked
        await eventually(lambda: _done(stores.open(), sid), what="completed")
        assert await runner.wait(sid) == "MEMO published by lee (cost 4)"
    assert calls["price"] == 1


async def test_resume_all_leaves_a_waiting_session_until_its_event_is_there(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    wf = _approval(calls)
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, "memo")
        await eventually(lambda: _waiting(stores.open(), sid), what="waiting")

    async with Runner(stores.open(), [wf], **FAST) as runner:
        assert await runner.resume_all() == []
    async with Runner(stores.open(), **FAST) as sender:
        await sender.send_event(sid, "approval", {"approved": True, "by": "lee"})
    async with Runner(stores.open(), [wf], **FAST) as runner:
        assert await runner.resume_all() == [sid]
        assert await runner.wait(sid) == "MEMO published by lee (cost 4)"


async def test_events_are_taken_oldest_first_by_name(stores: Stores) -> None:
    gate = Gate()
    wf = Workflow("inbox")

    @wf.step
    async def hold(ctx: StepContext, value: int) -> int:
        await gate.pass_through()
        return value

    @wf.step
    async def read(ctx: StepContext, value: int) -> list[Any]:
        names = ["vote", "close", "vote"]
        return [await ctx.wait_for_event(name) for name in names]

    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, 1)
        await asyncio.wait_for(gate.reached.wait(), 10)
        for name, payload in [("vote", "yes"), ("vote", "no"), ("close", None)]:
            await runner.send_event(sid, name, payload)
        gate.opened.set()
        assert await runner.wait(sid) == ["yes", None, "no"]


async def test_a_wait_times_out_durably_from_when_it_was_first_reached(stores: Stores) -> None:
    calls = Counter[str]()
    wf = Workflow("deadline")

    @wf.step
    async def ask(ctx: StepContext, value: int) -> str:
        calls["ask"] += 1
        try:
            return str(await ctx.wait_for_event("answer", timeout=0.3))
        except StepTimeoutError as exc:
            return f"no answer: {exc}"

    # Given a session that waited, then its runner stopped
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, 1)
        await eventually(lambda: _waiting(stores.open(), sid), what="waiting")
    wait = (await stores.load(sid)).wait
    assert wait is not None
    assert wait.until is not None
    deadline = wait.until

    # When a runner looks after the deadline, the session is ready and times out
    await eventually(lambda: datetime.now(UTC) > deadline, what="the deadline")
    async with Runner(stores.open(), [wf], **FAST) as runner:
        assert await runner.resume_all() == [sid]
        answer = await runner.wait(sid)

    # Then the deadline was the first one, not one restarted with the step
    assert answer.startswith("no answer")
    assert deadline.isoformat() in answer
    assert calls["ask"] == 2


async def test_a_runner_waiting_on_a_deadline_wakes_by_itself(stores: Stores) -> None:
    wf = Workflow("deadline-here")

    @wf.step
    async def ask(ctx: StepContext, value: int) -> str:
        try:
            return str(await ctx.wait_for_event("answer", timeout=0.2))
        except TimeoutError:
            return "timed out"

    async with Runner(stores.open(), [wf], poll_interval=30, inline_wait=0.05) as runner:
        assert await runner.run(wf, 1) == "timed out"


class LeaseOnly:
    """A real store without ``post_event``: it takes events only under the session's lease.

    Every store in the package is an ``EventInbox``; this stands for one that is not.
    """

    def __init__(self, inner: Store) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "post_event":
            raise AttributeError(name)
        return getattr(self._inner, name)


async def test_sending_to_a_session_busy_elsewhere_is_refused_and_changes_nothing(
    stores: Stores,
) -> None:
    gate = Gate()
    wf = _approval(Counter(), gate)
    store = LeaseOnly(stores.open())
    assert not isinstance(store, EventInbox)
    async with Runner(store, [wf], **FAST) as runner:  # type: ignore[arg-type]
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), 10)
        before = await stores.load(sid)

        # When another runner (another process, for the file store) sends an event
        other = Runner(LeaseOnly(stores.open()), **FAST)  # type: ignore[arg-type]  # not closed
        with pytest.raises(SessionBusyError, match="takes events only with"):
            await other.send_event(sid, "approval", {"approved": True, "by": "x"})

        after = await stores.load(sid)
        assert (after.revision, after.inbox) == (before.revision, [])
        gate.opened.set()
        await runner.send_event(sid, "approval", {"approved": True, "by": "lee"})
        assert await runner.wait(sid) == "MEMO published by lee (cost 4)"


async def test_a_store_with_an_inbox_takes_events_while_another_runner_holds_it() -> None:
    store = InboxStore()
    assert isinstance(store, EventInbox)
    calls = Counter[str]()
    gate = Gate()
    wf = _approval(calls, gate)
    async with Runner(store, [wf], **FAST) as runner:
        # Given a session another runner holds, busy before its wait
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), 10)

        # When an event is sent through a second runner
        other = Runner(store, **FAST)
        await other.send_event(sid, "approval", {"approved": True, "by": "eve"})
        assert [e.seq for e in store.posted[sid]] == [1]

        # Then the step gets it, and the store forgets it once the session has it
        gate.opened.set()
        assert await runner.wait(sid) == "MEMO published by eve (cost 4)"
    session = await store.load(sid)
    assert session is not None
    assert (store.posted[sid], session.inbox, session.inbox_seq) == ([], [], 1)
    assert calls["price"] == 1


async def test_send_event_refuses_what_no_step_can_take(stores: Stores) -> None:
    wf = Workflow("quick")

    @wf.step
    def only(ctx: StepContext, value: int) -> int:
        return value

    async with Runner(stores.open(), [wf], **FAST) as runner:
        done = await runner.start(wf, 1)
        await runner.wait(done)
        cancelled = await runner.start(wf, 2)
        await runner.wait(cancelled)
        store = stores.open()
        with pytest.raises(SessionNotFoundError):
            await runner.send_event(UNKNOWN_ID, "approval")
        with pytest.raises(InvalidArgumentError, match="is completed"):
            await runner.send_event(done, "approval")
        with pytest.raises(InvalidArgumentError, match="non-empty string"):
            await runner.send_event(done, "")
        session = await stores.load(cancelled)
        session.status = "cancelled"
        await store.save(session)
        with pytest.raises(SessionCancelledError):
            await runner.send_event(cancelled, "approval")
        session = await stores.load(cancelled)
        session.status = "waiting"
        session.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        await store.save(session)
        with pytest.raises(SessionExpiredError):
            await runner.send_event(cancelled, "approval")


async def test_a_payload_that_is_not_json_is_refused(stores: Stores) -> None:
    wf = _approval(Counter())
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, "memo")
        with pytest.raises(SerializationError, match="'approval'"):
            await runner.send_event(sid, "approval", {"when": object()})
        await runner.cancel(sid)


# -- durable sleep ---------------------------------------------------------------------


def _napping(calls: Counter[str], seconds: float) -> Workflow:
    wf = Workflow("nap")

    def stamp() -> str:
        calls["stamp"] += 1
        return "stamped"

    @wf.step
    async def nap(ctx: StepContext, value: int) -> str:
        calls["nap"] += 1
        first = await ctx.tool("stamp", stamp)
        await ctx.sleep(seconds)
        return f"{first}, then woke"

    return wf


async def test_a_long_sleep_suspends_the_session_and_wakes_it_at_its_end(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _napping(calls, 0.3)
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, 1)
        await eventually(lambda: _waiting(stores.open(), sid), what="waiting")
        wait = (await stores.load(sid)).wait
        assert wait is not None
        assert wait.kind == "sleep"
        assert wait.until is not None

        assert await runner.wait(sid) == "stamped, then woke"

    assert datetime.now(UTC) >= wait.until
    assert calls == Counter({"nap": 2, "stamp": 1})


async def test_a_sleep_ends_when_first_set_even_across_a_restart(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _napping(calls, 0.4)
    # Given a session asleep whose runner stopped
    async with Runner(stores.open(), [wf], **FAST) as runner:
        sid = await runner.start(wf, 1)
        await eventually(lambda: _waiting(stores.open(), sid), what="waiting")
    wait = (await stores.load(sid)).wait
    assert wait is not None
    assert wait.until is not None

    async with Runner(stores.open(), [wf], **FAST) as runner:
        # Then it is not ready before its end
        assert await runner.resume_all() == []
        # And a runner asked for it wakes it at the end first set
        assert await runner.wait(sid) == "stamped, then woke"
        woke = datetime.now(UTC)
    assert woke >= wait.until
    assert calls == Counter({"nap": 2, "stamp": 1})


async def test_a_short_sleep_is_slept_in_place(stores: Stores) -> None:
    calls = Counter[str]()
    wf = _napping(calls, 0.01)
    async with Runner(stores.open(), [wf]) as runner:
        assert await runner.run(wf, 1) == "stamped, then woke"
    assert calls == Counter({"nap": 1, "stamp": 1})


async def test_wait_and_sleep_outside_a_runner_say_so() -> None:
    wf = Workflow("direct")

    @wf.step
    async def step(ctx: StepContext, value: int) -> Any:
        return await ctx.wait_for_event("x")

    ctx = StepContext(
        session_id="s",
        workflow="direct",
        step="step",
        attempt=1,
        state={},
        input=1,
        outputs={},
        metadata=None,  # type: ignore[arg-type]
        context=None,  # type: ignore[arg-type]
        log=None,  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidArgumentError, match="inside a step a Runner runs"):
        await step(ctx, 1)
    with pytest.raises(InvalidArgumentError, match="inside a step a Runner runs"):
        await ctx.sleep(1)


# -- the example and the command line ---------------------------------------------------


APPROVAL = ROOT / "workflows" / "approval.py"
EXPENSE = '{"id": "E-7", "employee": "ana", "amount": 180, "category": "travel"}'


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPVAULT_", "SESSION_"))}
    env["STEPVAULT_SETTLE_SECONDS"] = "0.05"
    env["STEPVAULT_BANK_FAILURES"] = "1"
    return env


def _stored(folder: Path) -> list[Any]:
    async def read() -> list[Any]:
        store = FileStore(folder)
        try:
            return [await store.load(row.id) for row in await store.list()]
        finally:
            await store.close()

    return asyncio.run(read())


def test_the_approval_example_runs_as_a_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(APPROVAL)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "E-1: paid 180 (TX-" in done.stdout
    (session,) = _stored(tmp_path / "sessions")
    tools = [(r.kind, r.name, r.error is None) for r in session.tool_history if r.kind != "step"]
    assert tools == [
        ("tool", "policy_lookup", True),
        ("event", "approval", True),
        ("tool", "bank_transfer", False),  # the bank's first failure, retried
        ("tool", "bank_transfer", True),
    ]


def test_the_approval_example_waits_for_stepvault_send(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    cli = [sys.executable, "-m", "engine.cli"]
    # Given `stepvault run` waiting for the approval
    run = subprocess.Popen(
        [*cli, "run", str(APPROVAL), "--input", EXPENSE, "--store", str(store), "--json"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(s.status == "waiting" for s in _stored(store) if s is not None):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the session never waited"
            time.sleep(0.05)
        (session,) = _stored(store)

        # When a person approves it with `stepvault send`
        approve = ["--payload", '{"approved": true, "by": "lee"}', "--store", str(store)]
        sent = subprocess.run(
            [*cli, "send", session.id, "approval", *approve],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent event 'approval'" in sent.stderr

        # Then the waiting command finishes with the payment
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 0, err
    payment = json.loads(out)["output"]
    assert (payment["status"], payment["decided_by"], payment["settled"]) == ("paid", "lee", True)


# -- another process runs the session (the file store's inbox) -----------------------------

WORKER = Path(__file__).with_name("inbox_worker.py")
PROCESS_DEADLINE = 60.0
"""Seconds a runner process may take to reach a point: a hang, not slowness."""


class RunnerProcess:
    """``inbox_worker.py`` running one session on a FileStore, its output in a log file."""

    def __init__(self, folder: Path, session_id: str) -> None:
        self.folder = folder
        self.session_id = session_id
        self.process: subprocess.Popen[bytes] | None = None
        self.started: list[subprocess.Popen[bytes]] = []
        self.log = folder / "runner.log"

    @property
    def store(self) -> Path:
        return self.folder / "sessions"

    def spawn(self, mode: str) -> None:
        self.log = self.folder / f"runner-{mode}.log"
        with self.log.open("wb") as out:
            args = [str(WORKER), str(self.store), mode, self.session_id]
            self.process = subprocess.Popen(
                [sys.executable, *args], stdin=subprocess.PIPE, stdout=out, stderr=out
            )
        self.started.append(self.process)

    def go_on(self) -> None:
        """Let the step past the point it holds the session at."""
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def output(self) -> str:
        return self.log.read_text()

    async def until_printed(self, word: str) -> str:
        """Poll the log until a line starts with ``word``; fail if the process ends first."""
        assert self.process is not None
        deadline = time.monotonic() + PROCESS_DEADLINE
        while True:
            lines = [line for line in self.output().splitlines() if line.startswith(word)]
            if lines:
                return lines[0]
            code = self.process.poll()
            assert code is None or lines, f"the runner exited {code}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {word!r} in {PROCESS_DEADLINE}s"
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=PROCESS_DEADLINE) == -signal.SIGKILL

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdin is not None:
                process.stdin.close()


@pytest.fixture
def runner_process(tmp_path: Path) -> Iterator[RunnerProcess]:
    started = RunnerProcess(tmp_path, str(uuid.uuid4()))
    yield started
    started.stop()


async def _held_elsewhere(store_dir: Path, session_id: str) -> bool:
    store = FileStore(store_dir)
    try:
        lease = await store.acquire(session_id, "probe")
        if lease is not None:
            await store.release(lease)
        return lease is None
    finally:
        await store.close()


async def _load_once(store_dir: Path, session_id: str) -> Any:
    store = FileStore(store_dir)
    try:
        return await store.load(session_id)
    finally:
        await store.close()


async def test_stepvault_send_reaches_a_step_another_process_is_running(
    runner_process: RunnerProcess,
) -> None:
    # Given a runner process in the middle of the step that will wait, holding the session
    runner_process.spawn("start")
    await runner_process.until_printed("reached")
    sid, store = runner_process.session_id, runner_process.store
    assert await _held_elsewhere(store, sid)

    # When `stepvault send` sends the event from a third process
    sent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli",
        "send",
        sid,
        "approval",
        "--payload",
        '{"by": "ops"}',
        "--store",
        str(store),
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(sent.communicate(), PROCESS_DEADLINE)
    assert sent.returncode == 0, err.decode()
    assert "sent event 'approval'" in err.decode()

    # Then it is stored at once, numbered 1, while the runner still runs the step
    stored = await _load_once(store, sid)
    assert stored.status == "running"
    assert [(e.seq, e.name, e.payload) for e in stored.inbox] == [(1, "approval", {"by": "ops"})]
    assert await _held_elsewhere(store, sid)

    # And the step takes it once it reaches its wait: the workflow finishes
    runner_process.go_on()
    assert await runner_process.until_printed("done") == "done memo-approved-by-ops"
    done = await _load_once(store, sid)
    assert (done.status, done.inbox, done.inbox_seq) == ("completed", [], 1)
    taken = [(r.name, r.output) for r in done.tool_history if r.kind == "event"]
    assert taken == [("approval", {"by": "ops"})]


async def test_an_event_posted_before_its_runner_is_killed_is_taken_after_a_restart(
    runner_process: RunnerProcess,
) -> None:
    # Given a runner process holding the session in the step before its wait
    runner_process.spawn("start")
    await runner_process.until_printed("reached")
    sid, store = runner_process.session_id, runner_process.store

    # When this process sends the event through a runner of its own (no SessionBusyError),
    # and the runner process is then killed before its step took it
    async with Runner(FileStore(store), cleanup_interval=None) as sender:
        await sender.send_event(sid, "approval", {"by": "eve"})
    runner_process.kill()
    assert [e.payload for e in (await _load_once(store, sid)).inbox] == [{"by": "eve"}]

    # Then a new runner process resumes the session, and its step takes the event
    runner_process.spawn("wait")
    runner_process.go_on()
    assert await runner_process.until_printed("done") == "done memo-approved-by-eve"
    done = await _load_once(store, sid)
    assert (done.status, done.inbox, done.inbox_seq) == ("completed", [], 1)
