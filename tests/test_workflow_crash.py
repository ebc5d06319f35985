"""kill -9 in the middle of a retry, a wait, a sleep and a tool call: the next process
goes on from what was committed, and nothing already recorded happens twice.

Each test runs ``workflow_crash_worker.py`` as real processes on a FileStore with
fsync durability, SIGKILLs one at a chosen point (seen through the store and the
worker's side file, never guessed with a sleep), and lets another finish.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine import FileStore, Session

WORKER = Path(__file__).with_name("workflow_crash_worker.py")
DEADLINE = 60.0
"""Seconds any point may take to be reached: a hang, not slowness."""


@dataclass
class Scenario:
    """One session of one worker scenario, its store, side file and worker processes."""

    name: str
    folder: Path
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def store_dir(self) -> Path:
        return self.folder / "sessions"

    @property
    def sidefile(self) -> Path:
        return self.folder / "side.log"

    def lines(self) -> list[list[str]]:
        try:
            return [line.split() for line in self.sidefile.read_text().splitlines()]
        except FileNotFoundError:
            return []

    def count(self, *words: str) -> int:
        return sum(1 for line in self.lines() if line[: len(words)] == list(words))

    def spawn(self, mode: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"worker-{len(self.workers)}.log").open("wb")
        args = [sys.executable, str(WORKER), self.name, str(self.store_dir), str(self.sidefile)]
        worker = subprocess.Popen(
            [*args, mode, self.session_id], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        self.workers.append(worker)
        return worker

    def load(self) -> Session | None:
        async def read() -> Session | None:
            store = FileStore(self.store_dir)
            try:
                return await store.load(self.session_id)
            finally:
                await store.close()

        if not self.store_dir.exists():
            return None
        return asyncio.run(read())

    def until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not check():
            for worker in self.workers:
                code = worker.poll()
                assert code in (None, -signal.SIGKILL), f"a worker exited {code}: {self.logs()}"
            assert time.monotonic() < deadline, f"{what} not reached: {self.logs()}"
            time.sleep(0.005)

    def kill(self, worker: subprocess.Popen[bytes]) -> None:
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=DEADLINE) == -signal.SIGKILL

    def finish(self, worker: subprocess.Popen[bytes]) -> None:
        assert worker.wait(timeout=DEADLINE) == 0, self.logs()

    def logs(self) -> str:
        return "\n".join(path.read_text() for path in sorted(self.folder.glob("worker-*.log")))

    def session(self) -> Session:
        session = self.load()
        assert session is not None
        return session

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _scenario(name: str, tmp_path: Path) -> Scenario:
    return Scenario(name, tmp_path)


def test_a_kill_while_waiting_to_retry_keeps_the_attempt_count(tmp_path: Path) -> None:
    run = _scenario("retry", tmp_path)
    try:
        # Given a worker killed while it waits (30 s) to retry, after a failed attempt
        first = run.spawn("start")
        run.until("a failed attempt committed", lambda: _attempts(run) == 1)
        run.kill(first)

        # When another worker takes the session over
        run.finish(run.spawn("wait"))
    finally:
        run.close()

    # Then it made the second attempt at once, not a first one: the count survived
    attempts = [(line[1], line[2]) for line in run.lines() if line[0] == "attempt"]
    assert [number for number, _ in attempts] == ["1", "2"]
    assert attempts[0][1] != attempts[1][1]  # in two processes
    assert run.count("done", run.session_id, "12") == 1
    session = run.session()
    assert [(r.attempt, r.error) for r in session.tool_history] == [
        (1, "ConnectionError: flake 1"),
        (2, None),
    ]


def _attempts(run: Scenario) -> int:
    session = run.load()
    return 0 if session is None else session.attempts.get("flaky", 0)


def test_a_kill_while_waiting_for_an_event_loses_neither_the_wait_nor_the_event(
    tmp_path: Path,
) -> None:
    run = _scenario("wait", tmp_path)
    try:
        # Given a worker killed while its session waits for an approval
        first = run.spawn("start")
        run.until("the session waits", lambda: _status(run) == "waiting")
        run.kill(first)

        # When the approval is sent with `stepvault send` while no worker runs,
        # and a new worker resumes whatever can go on
        send = ["send", run.session_id, "approval", "--payload", '{"by": "lee"}']
        sent = subprocess.run(
            [sys.executable, "-m", "engine.cli", *send, "--store", str(run.store_dir)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert sent.returncode == 0, sent.stderr
        run.finish(run.spawn("resume_all"))
    finally:
        run.close()

    # Then the session finished with the event, and its tool call ran once
    assert run.count("done", run.session_id, "OK-approved-by-lee") == 1
    assert run.count("call", "lookup") == 1
    session = run.session()
    assert (session.status, session.inbox, session.wait) == ("completed", [], None)


def test_a_kill_during_a_durable_sleep_wakes_at_the_end_first_set(tmp_path: Path) -> None:
    run = _scenario("sleep", tmp_path)
    try:
        # Given a worker killed while its session sleeps (3 s)
        first = run.spawn("start")
        run.until("the session sleeps", lambda: _status(run) == "waiting")
        wait = run.session().wait
        assert wait is not None
        assert wait.until is not None
        run.kill(first)

        # When a new worker waits for the session
        second = run.spawn("wait")
        run.until("the new worker began", lambda: run.count("begin") == 2)
        began = time.time()
        run.finish(second)
    finally:
        run.close()

    # Then it woke at the end first set: not before it, and without sleeping 3 s anew
    (woke,) = [float(line[1]) for line in run.lines() if line[0] == "woke"]
    assert woke >= wait.until.timestamp()
    assert woke < began + 3.0
    assert run.count("call", "stamp") == 1
    assert run.count("done", run.session_id, "stamped-rested") == 1


def test_a_kill_during_a_tool_call_replays_the_finished_calls_only(tmp_path: Path) -> None:
    run = _scenario("tool", tmp_path)
    try:
        # Given a worker killed inside its second tool call, after the first was recorded
        first = run.spawn("start")
        run.until("the second call", lambda: run.count("call", "second") == 1)
        run.kill(first)
        recorded = run.session()
        assert [r.name for r in recorded.tool_history] == ["first"]

        # When the same session is started again (an idempotency key) in a new worker
        run.finish(run.spawn("start"))
    finally:
        run.close()

    # Then the first call was replayed from the record, the second made again
    assert run.count("call", "first") == 1
    assert run.count("call", "second") == 2
    assert run.count("done", run.session_id, "11") == 1
    session = run.session()
    assert [(r.kind, r.name) for r in session.tool_history] == [
        ("tool", "first"),
        ("tool", "second"),
        ("step", "pair"),
    ]


def test_a_step_that_kills_every_worker_is_parked_instead_of_retried_forever(
    tmp_path: Path,
) -> None:
    run = _scenario("hang", tmp_path)
    try:
        # Given three workers in a row killed inside the same step (max_takeovers=2)
        for round_ in range(3):
            worker = run.spawn("start" if round_ == 0 else "resume_all")
            run.until(f"attempt {round_ + 1}", lambda r=round_: run.count("attempt") == r + 1)
            run.kill(worker)

        # When a fourth worker finds the session
        run.finish(run.spawn("wait"))
    finally:
        run.close()

    # Then it parks the session as failed instead of running the step again
    assert run.count("attempt") == 3
    assert run.count("error", run.session_id, "StepFailedError") == 1
    session = run.session()
    assert session.status == "failed"
    assert "taken over 3 times" in (session.error or "")


def _status(run: Scenario) -> str | None:
    session = run.load()
    return None if session is None else session.status
