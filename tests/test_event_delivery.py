"""Events reach a session another runner holds, on stores that take them without the lease.

``runner.send_event`` on a store that is an ``engine.events.EventInbox`` stores the
event at once, whoever holds the session, sent through the runner holding it,
through a second runner in this process, or (SQLite, PostgreSQL) from other
processes; the step that waits for it goes on. A store that takes events only under the
lease is skipped here, saying so (test_events.py covers it). The schema upgrade
that brought the inbox is checked at the end, on a database of the previous
version.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest
from workflow_support import eventually

from engine import Runner, StepContext, Store, Workflow
from engine.events import EventInbox
from engine.stores import PostgresStore, SQLiteStore

MakeStore = Callable[..., Store]
FAST: dict[str, Any] = {"poll_interval": 0.02, "inline_wait": 0.05, "cleanup_interval": None}
"""Runner options for tests: look for events often, suspend even short waits, no sweeps."""
DEADLINE = 30.0
"""Seconds a process or a polled condition may take: a hang, not slowness."""

SEND = """
import asyncio, json, sys
from engine import Runner, open_store

async def main():
    url, session_id, name, payloads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    async with Runner(open_store(url), cleanup_interval=None) as runner:
        for payload in payloads:
            await runner.send_event(session_id, name, json.loads(payload))
    print("sent", len(payloads), flush=True)

asyncio.run(main())
"""
"""A sender process: sends each payload in turn to one session, then exits."""


class Gate:
    """Hold a step (and so its session's lease) until opened."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def pass_through(self) -> None:
        self.reached.set()
        await self.opened.wait()


def _review(gate: Gate, calls: Counter[str]) -> Workflow:
    """draft -> review (a tool call, the gate, then waits for "approval")."""
    wf = Workflow("review")

    @wf.step
    def draft(ctx: StepContext, text: str) -> str:
        calls["draft"] += 1
        return text.upper()

    def price(text: str) -> int:
        calls["price"] += 1
        return len(text)

    @wf.step
    async def review(ctx: StepContext, text: str) -> str:
        cost = await ctx.tool("price", price, text)
        await gate.pass_through()
        decision = await ctx.wait_for_event("approval")
        return f"{text} approved by {decision['by']} (cost {cost})"

    return wf


def _collect(count: int, gate: Gate) -> Workflow:
    """One step that takes ``count`` events named "item", in inbox order."""
    wf = Workflow("collect")

    @wf.step
    async def gather(ctx: StepContext, value: int) -> list[Any]:
        await gate.pass_through()
        return [await ctx.wait_for_event("item") for _ in range(count)]

    return wf


def _inbox_store(store: Store) -> None:
    if not isinstance(store, EventInbox):
        pytest.skip(
            f"{type(store).__name__} has no post_event: another runner's event waits "
            "for the lease (SessionBusyError, see test_events.py)"
        )


def _shared(store: Store, make_store: MakeStore, store_url: str | None) -> Store:
    """Another view of the same sessions (another connection); memory has only one."""
    return store if store_url is None else make_store()


async def _send_from_processes(
    store_url: str, session_id: str, name: str, batches: list[list[Any]]
) -> None:
    """Run one sender process per batch, all at once; fail unless each sent its batch."""
    senders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SEND,
            store_url,
            session_id,
            name,
            *(json.dumps(payload) for payload in batch),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for batch in batches
    ]
    for sender, batch in zip(senders, batches, strict=True):
        out, err = await asyncio.wait_for(sender.communicate(), DEADLINE)
        assert (sender.returncode, out.decode().strip()) == (0, f"sent {len(batch)}"), err.decode()


@pytest.mark.parametrize("through", ["another runner", "the holder"])
async def test_an_event_sent_while_a_runner_holds_the_session_reaches_its_step(
    store: Store, make_store: MakeStore, store_url: str | None, through: str
) -> None:
    _inbox_store(store)
    gate, calls = Gate(), Counter[str]()
    wf = _review(gate, calls)
    async with Runner(store, [wf], **FAST) as runner:
        # Given a runner in the middle of the step that will wait, holding the session
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), DEADLINE)
        view = _shared(store, make_store, store_url)
        assert await view.acquire(sid, "probe") is None

        # When the event is sent (through a second runner on its own connection, or
        # through the holder itself), it is stored at once: no SessionBusyError
        sender = runner if through == "the holder" else Runner(view, **FAST)
        await sender.send_event(sid, "approval", {"approved": True, "by": "eve"})
        stored = await view.load(sid)
        assert stored is not None
        assert [(e.name, e.payload["by"]) for e in stored.inbox] == [("approval", "eve")]

        # Then the step goes on with it once it reaches its wait
        gate.opened.set()
        assert await asyncio.wait_for(runner.wait(sid), DEADLINE) == (
            "MEMO approved by eve (cost 4)"
        )

    # And the session took it: its inbox is empty, nothing ran twice
    done = await _shared(store, make_store, store_url).load(sid)
    assert done is not None
    assert (done.status, done.inbox) == ("completed", [])
    taken = [r for r in done.tool_history if r.kind == "event"]
    assert [(r.name, r.output) for r in taken] == [("approval", {"approved": True, "by": "eve"})]
    assert (calls["draft"], calls["price"]) == (1, 1)


async def test_an_event_sent_from_another_process_reaches_the_held_session(
    store: Store, store_url: str | None
) -> None:
    _inbox_store(store)
    if store_url is None:
        pytest.skip("a memory store cannot be shared with another process")
    gate, calls = Gate(), Counter[str]()
    wf = _review(gate, calls)
    async with Runner(store, [wf], **FAST) as runner:
        # Given a runner holding the session in the middle of its step
        sid = await runner.start(wf, "memo")
        await asyncio.wait_for(gate.reached.wait(), DEADLINE)

        # When another process sends the event and exits
        await _send_from_processes(store_url, sid, "approval", [[{"by": "ops"}]])

        # Then the step gets it
        gate.opened.set()
        answer = await asyncio.wait_for(runner.wait(sid), DEADLINE)
    assert answer == "MEMO approved by ops (cost 4)"
    assert calls["price"] == 1


async def test_events_from_several_processes_all_arrive_once_in_each_senders_order(
    store: Store, make_store: MakeStore, store_url: str | None
) -> None:
    _inbox_store(store)
    if store_url is None:
        pytest.skip("a memory store cannot be shared with another process")
    processes, per_process = 3, 5
    total = processes * per_process
    gate = Gate()
    wf = _collect(total, gate)
    view = make_store()
    async with Runner(store, [wf], **FAST) as runner:
        # Given a runner holding a session whose step will take 15 events
        sid = await runner.start(wf, 0)
        await asyncio.wait_for(gate.reached.wait(), DEADLINE)

        # When three processes send five events each, and the step starts taking
        # them (letting go of the session and taking it again) once a few are in
        async def open_when_some_arrived() -> None:
            async def some() -> bool:
                session = await view.load(sid)
                return session is not None and len(session.inbox) >= 3

            await eventually(some, within=DEADLINE, what="the first events")
            gate.opened.set()

        batches = [[{"from": p, "n": n} for n in range(per_process)] for p in range(processes)]
        await asyncio.gather(
            _send_from_processes(store_url, sid, "item", batches), open_when_some_arrived()
        )
        got = await asyncio.wait_for(runner.wait(sid), DEADLINE)

    # Then every event arrived exactly once, each sender's in the order it sent them
    assert len(got) == total
    by_sender: dict[int, list[int]] = {}
    for payload in got:
        by_sender.setdefault(payload["from"], []).append(payload["n"])
    assert by_sender == {p: list(range(per_process)) for p in range(processes)}
    done = await view.load(sid)
    assert done is not None
    assert (done.status, done.inbox, done.inbox_seq) == ("completed", [], total)


# -- a database of the previous schema version --------------------------------------


async def _downgrade_to_version_1(kind: str, store_url: str) -> None:
    """Undo migrations 2 and up (they only added tables): what a stepvault before them left."""
    if kind == "sqlite":
        with closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as db, db:
            for table in ("events", "inboxes", "session_keys", "quarantine"):
                db.execute(f"DROP TABLE stepvault_{table}")
            db.execute("DELETE FROM stepvault_schema WHERE version >= 2")
        return
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415  # Postgres tests only

    server, _, schema = store_url.rpartition("?schema=")
    conn = await asyncpg.connect(server, timeout=5)
    try:
        await conn.execute(f"SET search_path TO {schema}")
        await conn.execute("DROP TABLE events, inboxes, session_keys, quarantine")
        await conn.execute("DELETE FROM schema_version WHERE version >= 2")
    finally:
        await conn.close()


async def test_a_session_stored_before_the_inbox_existed_takes_events_after_the_upgrade(
    store_kind: str, make_store: MakeStore, store_url: str | None
) -> None:
    if store_kind not in ("sqlite", "postgres"):
        pytest.skip("only the SQL stores keep a schema")
    assert store_url is not None
    # Given a session in a database at schema version 1, waiting for an event
    gate = Gate()
    gate.opened.set()
    wf = _review(gate, Counter())
    async with Runner(make_store(), [wf], **FAST) as runner:
        sid = await runner.start(wf, "memo")
        await eventually(lambda: _status(runner, sid, "waiting"), within=DEADLINE, what="the wait")
    await _downgrade_to_version_1(store_kind, store_url)

    # When this version opens it, migrates it and is sent the event
    upgraded = make_store()
    assert isinstance(upgraded, SQLiteStore | PostgresStore)
    await upgraded.migrate()
    async with Runner(upgraded, [wf], **FAST) as runner:
        await runner.send_event(sid, "approval", {"by": "later"})

        # Then the session goes on with it
        assert await asyncio.wait_for(runner.wait(sid), DEADLINE) == (
            "MEMO approved by later (cost 4)"
        )


async def _status(runner: Runner, session_id: str, status: str) -> bool:
    session = await runner.store.load(session_id)
    return session is not None and session.status == status
