"""Runners on one PostgreSQL database: a dead runner's sessions are taken over, a stale
runner is fenced off, and no checkpoint is ever committed twice.

Each runner is a real process (``lease_worker.py``) with a 2 s lease. A runner
killed with SIGKILL mid-step leaves its leases to run out; the survivors, which call
``resume_all`` again every third of the lease, take its sessions over and finish
them. A runner paused with SIGSTOP past its lease and then resumed finds its
sessions taken: every commit it tries raises ``LeaseLostError`` and writes nothing.
``STEPVAULT_TAKEOVER_SESSIONS`` sets how many sessions the three runners share
(100 by default)::

    STEPVAULT_TAKEOVER_SESSIONS=2000 .venv/bin/python -m pytest tests/test_takeover.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import lease_worker  # its workflow and step names, not to run it
import pytest

from engine import Runner, Session, SessionManager, Store
from engine.stores import PostgresStore

SESSIONS = int(os.environ.get("STEPVAULT_TAKEOVER_SESSIONS", "100"))
LEASE_TTL = 2.0
WORKER_PATH = Path(__file__).with_name("lease_worker.py")
DEADLINE = 120.0
"""Seconds any wait may take: a hang, not slowness."""


STEPS: list[str] = lease_worker.STEP_NAMES
HOLD_STEP: str = lease_worker.HOLD_STEP


def read_log(path: Path) -> list[list[str]]:
    """The worker's log lines, split into their fields."""
    return [line.split(" ", 3) for line in path.read_text().splitlines()] if path.exists() else []


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting after {DEADLINE} s for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[Store]:
    """A store on this test's own schema."""
    opened = PostgresStore(postgres_url)
    yield opened
    await opened.close()


async def add_sessions(store: Store, count: int) -> set[str]:
    """Store ``count`` unstarted sessions of the relay workflow."""
    manager = SessionManager(store, cleanup_interval=None)
    ids = set()
    for index in range(count):
        session = manager.new_session()
        session.workflow, session.input = lease_worker.workflow.name, index
        ids.add((await manager.insert_session(session)).id)
    return ids


StartWorker = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def start_worker(postgres_url: str) -> AsyncIterator[StartWorker]:
    """Start runner processes on this test's schema; any still alive is killed after it."""
    started: list[asyncio.subprocess.Process] = []

    async def start(log: Path, *options: str) -> asyncio.subprocess.Process:
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_PATH),
            postgres_url,
            str(log),
            "--lease-ttl",
            str(LEASE_TTL),
            *options,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.returncode is None:
            worker.kill()  # SIGKILL ends a stopped process too
        await worker.communicate()


async def load_all(store: Store, ids: set[str]) -> dict[str, Session]:
    loaded = {sid: await store.load(sid) for sid in ids}
    assert None not in loaded.values()
    return {sid: session for sid, session in loaded.items() if session is not None}


async def test_survivors_finish_every_session_of_a_runner_killed_mid_step(
    store: Store, start_worker: StartWorker, tmp_path: Path
) -> None:
    # Given 100 sessions and three runners started together; the first one's steps
    # s1 never finish (it is mid-step for as long as it lives)
    ids = await add_sessions(store, SESSIONS)
    go, never = tmp_path / "go", tmp_path / "never-created"
    logs = [tmp_path / f"runner-{index}.log" for index in range(3)]
    victim = await start_worker(logs[0], "--go", str(go), "--hold", str(never))
    survivors = [await start_worker(log, "--go", str(go)) for log in logs[1:]]
    await until(lambda: all(read_log(log) for log in logs), "every runner to connect")
    go.touch()

    # When the first runner is SIGKILLed while it is inside step s1 of some sessions
    def victim_mid_step() -> set[str]:
        return {
            line[1] for line in read_log(logs[0]) if line[0] == "start" and line[2] == HOLD_STEP
        }

    await until(lambda: bool(victim_mid_step()), "the victim to enter step s1")
    victim.kill()
    await victim.wait()
    held_by_victim = victim_mid_step()

    # Then the survivors finish every session and end cleanly
    results = await asyncio.wait_for(
        asyncio.gather(*(worker.communicate() for worker in survivors)), DEADLINE
    )
    for worker, (_, stderr) in zip(survivors, results, strict=True):
        assert worker.returncode == 0, stderr.decode()
    # (A survivor stalled past its lease by a busy machine may lose a session to the
    # other one: that is a takeover like any other, and is allowed here.)
    survivor_events = [line for log in logs[1:] for line in read_log(log)]
    assert [line for line in survivor_events if line[0] == "error"] == []
    sessions = await load_all(store, ids)
    assert all(s.status == "completed" and s.steps_done == STEPS for s in sessions.values())

    # And no checkpoint was committed twice: each step's commit is logged once at
    # most, by the process the stored state names
    events = [line for log in logs for line in read_log(log)]
    commits = Counter((line[1], line[2]) for line in events if line[0] == "commit")
    assert max(commits.values()) == 1
    for line in events:
        if line[0] == "commit":
            assert sessions[line[1]].state[f"ran_by:{line[2]}"] == int(line[3])

    # And the sessions the victim died inside were taken over, their step s1 run again
    survivor_pids = {worker.pid for worker in survivors}
    assert held_by_victim
    for sid in held_by_victim:
        assert sessions[sid].state[f"ran_by:{HOLD_STEP}"] in survivor_pids


async def test_a_runner_paused_past_its_lease_cannot_commit_when_it_resumes(
    store: Store, start_worker: StartWorker, tmp_path: Path
) -> None:
    # Given a runner holding ten sessions, each inside step s1
    ids = await add_sessions(store, 10)
    hold, log = tmp_path / "hold", tmp_path / "stale.log"
    stale = await start_worker(log, "--hold", str(hold))

    def inside_s1() -> set[str]:
        return {line[1] for line in read_log(log) if line[0] == "start" and line[2] == HOLD_STEP}

    await until(lambda: inside_s1() == ids, "the runner to enter step s1 of every session")

    # When it is paused (SIGSTOP) and another runner takes every session over and
    # finishes it once the paused runner's leases have run out
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        async with Runner(store, [lease_worker.workflow], lease_ttl=LEASE_TTL) as survivor:
            deadline = time.monotonic() + DEADLINE
            while any(s.status != "completed" for s in (await load_all(store, ids)).values()):
                assert time.monotonic() < deadline, "the survivor did not finish in time"
                await asyncio.gather(
                    *(survivor.wait(sid) for sid in await survivor.resume_all()),
                    return_exceptions=True,
                )
                await asyncio.sleep(LEASE_TTL / 3)
            finished = await load_all(store, ids)
    finally:
        # Then, resumed with its steps let go, the stale runner commits nothing
        hold.touch()
        os.kill(stale.pid, signal.SIGCONT)
    _, stderr = await asyncio.wait_for(stale.communicate(), DEADLINE)
    assert stale.returncode == 0, stderr.decode()
    events = read_log(log)
    assert {line[1] for line in events if line[0] == "lost"} == ids
    assert [line for line in events if line[0] == "commit" and line[2] != "s0"] == []
    assert [line for line in events if line[0] == "error"] == []
    assert await load_all(store, ids) == finished
    assert all(s.state[f"ran_by:{HOLD_STEP}"] == os.getpid() for s in finished.values())
