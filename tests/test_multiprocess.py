"""Four real processes drain one FileStore folder: every session once, never two at a time.

``multiprocess_worker.py create`` leaves ``STEPVAULT_MP_SESSIONS`` unfinished
sessions (default 200; the long run in benchmarks/torture.py uses 1,000) of a
three-step workflow in a folder. Then four
``multiprocess_worker.py drain`` processes start at the same moment and call
``resume_all`` on that folder until nothing is left. Each step logs when it starts
and ends, with a system-wide monotonic timestamp, and stores the pid that ran it
with its output. From the logs and the store:

- every session completed once, with the right output, each step committed once
  (one successful attempt in its history), by the process whose run it logged;
- no step ran in two processes at once: the step runs of a session never overlap;
- with one process SIGKILLed while it holds sessions, the others take them over:
  the only steps run twice are the ones the killed process had in flight, each
  once more, and only after the kill.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from multiprocess_worker import STEP_NAMES, expected_output
from reliability_report import report

from engine import FileStore, Session

SESSIONS = int(os.environ.get("STEPVAULT_MP_SESSIONS", "200"))
PROCESSES = 4
WORKER = Path(__file__).with_name("multiprocess_worker.py")
DEADLINE = 120.0
"""Seconds the whole drain may take: a hang, not slowness."""
KILL_WHEN_IN_FLIGHT = 3
"""Steps the victim must have started and not finished when it is killed."""


@dataclass(frozen=True)
class Run:
    """One run of one step: who ran it, when it started, and when it ended (if it did)."""

    session_id: str
    step: str
    pid: int
    start: int
    end: int | None


@dataclass
class Logs:
    """What the workers logged."""

    runs: list[Run] = field(default_factory=list)
    done: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)


def read_logs(log_dir: Path) -> Logs:
    logs = Logs()
    open_runs: dict[tuple[str, str, int], int] = {}
    for path in sorted(log_dir.glob("*.log")):
        for line in path.read_text().splitlines():
            kind, *rest = line.split(" ", 4)
            if kind == "start":
                session_id, step, pid, ns = rest
                open_runs[(session_id, step, int(pid))] = int(ns)
            elif kind == "end":
                session_id, step, pid, ns = rest
                start = open_runs.pop((session_id, step, int(pid)))
                logs.runs.append(Run(session_id, step, int(pid), start, int(ns)))
            elif kind == "done":
                logs.done[rest[0]].append(int(rest[2]))
            elif kind == "error":
                logs.errors.append(line)
    logs.runs += [Run(s, step, pid, start, None) for (s, step, pid), start in open_runs.items()]
    return logs


def create_sessions(store_dir: Path, count: int) -> dict[str, int]:
    """Leave ``count`` unfinished sessions in ``store_dir``; return id -> input."""
    result = subprocess.run(
        [sys.executable, str(WORKER), "create", str(store_dir), str(count)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    return {session_id: value for value, session_id in enumerate(result.stdout.split())}


def start_drainers(store_dir: Path, log_dir: Path, go: Path) -> list[subprocess.Popen[bytes]]:
    """Start the drain workers and let them go together once all are ready."""
    log_dir.mkdir()
    args = [str(WORKER), "drain", str(store_dir), str(log_dir), str(go), str(DEADLINE)]
    workers = []
    for index in range(PROCESSES):
        with (log_dir / f"worker-{index}.err").open("wb") as stderr:  # the child has its own
            workers.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            )
    deadline = time.monotonic() + DEADLINE
    while sum(1 for path in log_dir.glob("*.log") if "ready" in path.read_text()) < PROCESSES:
        assert all(worker.poll() is None for worker in workers), "a worker died while starting"
        assert time.monotonic() < deadline, "workers did not get ready"
        time.sleep(0.01)
    go.touch()
    return workers


def wait_all(workers: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
    for index, worker in enumerate(workers):
        code = worker.wait(timeout=DEADLINE)
        err = (log_dir / f"worker-{index}.err").read_text(errors="replace")[-3000:]
        assert code in (0, -signal.SIGKILL), f"worker {worker.pid} exited {code}:\n{err}"


def load_all(store_dir: Path) -> tuple[list[Session], list[str]]:
    """Load every session in ``store_dir`` (the test is synchronous: it drives processes)."""

    async def load() -> tuple[list[Session], list[str]]:
        store = FileStore(store_dir)
        try:
            rows = await store.list()
            problems = [f"{row.id}: {row.problem}" for row in rows if row.problem]
            sessions = [await store.load(row.id) for row in rows if not row.problem]
            return [session for session in sessions if session is not None], problems
        finally:
            await store.close()

    return asyncio.run(load())


def check_sessions(
    sessions: list[Session], inputs: dict[str, int], logs: Logs, victim: int | None = None
) -> list[Run]:
    """Check every session completed once, right; return the runs that were not committed.

    Each step's committed run is the one by the pid stored with its output. Any
    other run of it must be by the killed ``victim`` (in flight when it died),
    at most one, before the committed run.
    """
    assert sorted(session.id for session in sessions) == sorted(inputs)
    assert logs.errors == []
    runs_of: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in logs.runs:
        runs_of[(run.session_id, run.step)].append(run)
    uncommitted = []
    for session in sessions:
        assert session.status == "completed", session.id
        assert session.steps_done == STEP_NAMES, session.id
        assert session.outputs["c"] == expected_output(inputs[session.id]), session.id
        history = [(result.name, result.attempt, result.error) for result in session.tool_history]
        assert history == [(name, 1, None) for name in STEP_NAMES], session.id
        for name in STEP_NAMES:
            runs = runs_of[(session.id, name)]
            committer = session.state[f"ran_by:{name}"]
            committed = [run for run in runs if run.pid == committer]
            others = [run for run in runs if run.pid != committer]
            assert len(committed) == 1, (session.id, name, runs)
            assert committed[0].end is not None, (session.id, name, runs)
            assert len(others) <= 1, (session.id, name, runs)
            for run in others:
                assert run.pid == victim, f"{session.id} {name}: {run} ran and was lost"
                assert run.start < committed[0].start, (session.id, name, runs)
            uncommitted += others
    return uncommitted


def check_no_overlap(logs: Logs, killed_at: int | None, victim: int | None) -> None:
    """The step runs of one session never overlap; a victim's open run ends at its kill."""
    by_session: dict[str, list[Run]] = defaultdict(list)
    for run in logs.runs:
        by_session[run.session_id].append(run)
    for session_id, runs in by_session.items():
        intervals = []
        for run in runs:
            if run.end is None:
                assert run.pid == victim, f"{session_id}: {run} never ended, yet lived"
                assert killed_at is not None
                intervals.append((run.start, killed_at, run))
            else:
                intervals.append((run.start, run.end, run))
        intervals.sort(key=lambda interval: interval[0])
        for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
            assert start >= end, f"{session_id}: {second} started while {first} ran"


def test_four_processes_drain_200_sessions_each_exactly_once(tmp_path: Path) -> None:
    # Given unfinished sessions in one folder
    store_dir, log_dir, go = tmp_path / "store", tmp_path / "logs", tmp_path / "go"
    inputs = create_sessions(store_dir, SESSIONS)

    # When four processes resume them all at once
    workers = start_drainers(store_dir, log_dir, go)
    wait_all(workers, log_dir)

    # Then each session completed once, and no session ran in two places at once
    logs = read_logs(log_dir)
    sessions, problems = load_all(store_dir)
    assert problems == []
    assert check_sessions(sessions, inputs, logs) == []  # no step ran twice
    check_no_overlap(logs, None, None)
    committers = {session.state[f"ran_by:{name}"] for session in sessions for name in STEP_NAMES}
    assert committers <= {worker.pid for worker in workers}
    assert len(committers) >= 2, "one process did all the work: nothing ran side by side"
    report(
        "multiprocess",
        size=f"{PROCESSES} processes, {SESSIONS} sessions",
        cases=SESSIONS,
        found=None,
        survived=len(sessions),
        lost=0,
        steps=len(logs.runs),
        processes_that_committed=len(committers),
    )


def in_flight(log_dir: Path, pid: int) -> int:
    """How many steps ``pid`` has started and not ended, from its log."""
    path = log_dir / f"{pid}.log"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return sum(line.startswith("start ") for line in lines) - sum(
        line.startswith("end ") for line in lines
    )


def test_sigkill_of_a_process_holding_sessions_hands_them_to_the_others(tmp_path: Path) -> None:
    # Given four processes draining unfinished sessions together
    store_dir, log_dir, go = tmp_path / "store", tmp_path / "logs", tmp_path / "go"
    inputs = create_sessions(store_dir, SESSIONS)
    workers = start_drainers(store_dir, log_dir, go)
    victim = workers[0]

    # When one of them is SIGKILLed while it has steps in flight
    deadline = time.monotonic() + DEADLINE
    while in_flight(log_dir, victim.pid) < KILL_WHEN_IN_FLIGHT:
        assert victim.poll() is None, "the victim finished before it could be killed"
        assert time.monotonic() < deadline, "the victim never had steps in flight"
        time.sleep(0.0005)
    killed_at = time.monotonic_ns()
    victim.send_signal(signal.SIGKILL)
    wait_all(workers, log_dir)

    # Then the others finished every session, each exactly once, and the only
    # steps run twice are those the victim had in flight, run once more after it died
    logs = read_logs(log_dir)
    sessions, problems = load_all(store_dir)
    assert problems == []
    lost_in_flight = check_sessions(sessions, inputs, logs, victim=victim.pid)
    check_no_overlap(logs, killed_at, victim.pid)
    assert lost_in_flight, "the victim had nothing in flight"
    survivors = {worker.pid for worker in workers[1:]}
    took_over = {
        session.state[f"ran_by:{run.step}"]
        for run in lost_in_flight
        for session in sessions
        if session.id == run.session_id
    }
    assert took_over <= survivors
    report(
        "multiprocess: SIGKILL",
        size=f"{PROCESSES} processes, {SESSIONS} sessions, 1 killed",
        cases=SESSIONS,
        found=None,
        survived=len(sessions),
        lost=0,
        taken_over_in_flight=len(lost_in_flight),
    )
