"""Several runner processes on one SQLite file: every session completes exactly once.

Four ``lease_worker.py`` processes share one database file (durability ``fsync``)
holding 200 sessions of a four-step workflow. The session count comes from
``STEPVAULT_SQLITE_SESSIONS`` (200 by default); the long run is::

    STEPVAULT_SQLITE_SESSIONS=5000 .venv/bin/python -m pytest tests/test_sqlite_multiprocess.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lease_worker  # its workflow and step names, not to run it
import pytest

from engine import SessionManager
from engine.stores import SQLiteStore

SESSIONS = int(os.environ.get("STEPVAULT_SQLITE_SESSIONS", "200"))
PROCESSES = 4
WORKER_PATH = Path(__file__).with_name("lease_worker.py")
DEADLINE = 300.0
"""Seconds the workers may take in all: a hang, not slowness."""




async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds; fail after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {DEADLINE} s")
        await asyncio.sleep(0.01)


def read_log(path: Path) -> list[list[str]]:
    return [line.split(" ", 3) for line in path.read_text().splitlines()] if path.exists() else []


async def test_four_processes_complete_every_session_exactly_once(tmp_path: Path) -> None:
    # Given 200 sessions of the relay workflow in one database file
    database = tmp_path / "sessions.db"
    manager = SessionManager(SQLiteStore(database), cleanup_interval=None)
    ids = set()
    for index in range(SESSIONS):
        session = manager.new_session()
        session.workflow, session.input = lease_worker.workflow.name, index
        ids.add((await manager.insert_session(session)).id)
    await manager.close()

    # When four runner processes, started together, work through them
    go = tmp_path / "go"
    logs = [tmp_path / f"worker-{index}.log" for index in range(PROCESSES)]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_PATH),
            f"sqlite:///{database}",
            str(log),
            "--go",
            str(go),
            stderr=asyncio.subprocess.PIPE,
        )
        for log in logs
    ]
    outcomes = asyncio.gather(*(worker.communicate() for worker in workers))
    await until(lambda: all(read_log(log) for log in logs) or outcomes.done())
    go.touch()
    results = await asyncio.wait_for(outcomes, DEADLINE)

    # Then every worker ended cleanly, and none saw the database locked
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr.decode()
        assert b"database is locked" not in stderr
    events = [line for log in logs for line in read_log(log)]
    assert [line for line in events if line[0] in ("error", "lost")] == []

    # And each step of each session was committed once, by the process its state names
    commits = Counter((line[1], line[2]) for line in events if line[0] == "commit")
    assert set(commits) == {(sid, step) for sid in ids for step in lease_worker.STEP_NAMES}
    assert max(commits.values()) == 1
    committer = {(line[1], line[2]): int(line[3]) for line in events if line[0] == "commit"}
    assert len(set(committer.values())) > 1, "one process did all the work: nothing was shared"
    store = SQLiteStore(database)
    try:
        for sid in ids:
            session = await store.load(sid)
            assert session is not None
            assert session.status == "completed"
            assert session.steps_done == lease_worker.STEP_NAMES
            for step in lease_worker.STEP_NAMES:
                assert session.state[f"ran_by:{step}"] == committer[(sid, step)]
    finally:
        await store.close()
