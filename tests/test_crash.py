"""kill -9 at random moments: no committed step runs again, none is lost, nothing corrupts.

Each trial runs ``crash_worker.py`` (an 8-step workflow on a FileStore with fsync
durability) in a real process, SIGKILLs it at a random moment, 2 to 4 times in a
row (each time in a new process that resumes the session), then lets a last
worker finish the session. The workers are forked by ``crash_worker.py --serve``,
a process that imported the engine once, so a worker starts in milliseconds
instead of the quarter second a fresh interpreter takes to import it; each is
watched and killed through a pidfd, and reaped only once it has ended, so a kill
can never hit a reused pid.

The number of trials comes from ``STEPVAULT_CRASH_TRIALS`` (300 by default, which
bounds the failure rate near 1%: about half a minute on two cores); the long run
(benchmarks/torture.py) is::

    STEPVAULT_CRASH_TRIALS=3000 .venv/bin/python -m pytest tests/test_crash.py

``STEPVAULT_CRASH_SEED`` replays a failing schedule (the failure message names it);
``STEPVAULT_CRASH_JOBS`` sets how many trials run side by side (default: twice the
CPU count, at most 8: the workers mostly sleep in their steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from crash_worker import INPUT, STEP_NAMES
from reliability_report import report

from engine import FileStore, Session

TRIALS = int(os.environ.get("STEPVAULT_CRASH_TRIALS", "300"))
JOBS = int(os.environ.get("STEPVAULT_CRASH_JOBS", str(min(8, 2 * (os.cpu_count() or 1)))))
KILLS = (2, 4)
"""Each trial kills this many workers in a row, at least and at most."""
DEADLINE = 60.0
"""Seconds any one worker may take to reach a point or finish: a hang, not slowness."""

WORKER_PATH = Path(__file__).with_name("crash_worker.py")


class Zygote:
    """A ``crash_worker.py --serve`` process: it forks the workers of one thread's trials."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER_PATH), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, *fields: str) -> int:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("\t".join(fields) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the zygote died (exit code {self.process.poll()})"
        return int(answer)

    def close(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=DEADLINE)
        self.process.stdout.close()


_zygotes = threading.local()


@contextlib.contextmanager
def zygotes() -> Iterator[list[Zygote]]:
    """Collect the zygotes the trial threads start; stop them all at the end."""
    started: list[Zygote] = []
    try:
        yield started
    finally:
        for zygote in started:
            zygote.close()


def _zygote(started: list[Zygote]) -> Zygote:
    """Return this thread's zygote, starting it on first use."""
    zygote: Zygote | None = getattr(_zygotes, "zygote", None)
    if zygote is None or zygote not in started:
        zygote = _zygotes.zygote = Zygote()
        started.append(zygote)  # list.append is atomic: threads may share the list
    return zygote


def _expected_outputs() -> dict[str, int]:
    """Step k adds k + 1 to its input: the chain of outputs a correct run produces."""
    outputs, value = {}, INPUT
    for index, name in enumerate(STEP_NAMES):
        value += index + 1
        outputs[name] = value
    return outputs


@dataclass
class Worker:
    """One worker process of a trial, in the order they ran (never two at once).

    It is watched and signalled through a pidfd; its zygote reaps it only once it
    has ended, so until then its pid cannot be given to another process.
    """

    zygote: Zygote
    pid: int
    mode: str  # "start" (with the session id) or "resume_all"
    output: Path
    pidfd: int = -1
    exitcode: int | None = None
    killed: bool = False

    def running(self) -> bool:
        return self.exitcode is None and not select.select([self.pidfd], [], [], 0)[0]

    def kill(self) -> None:
        if self.exitcode is None:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)  # a no-op once it ended

    def finish(self, timeout: float) -> int | None:
        """Wait for the process to end; return its exit code (minus a signal's number)."""
        if self.exitcode is None and select.select([self.pidfd], [], [], timeout)[0]:
            self.exitcode = self.zygote.ask("reap", str(self.pid))
            os.close(self.pidfd)
        return self.exitcode


@dataclass
class Trial:
    """One session, its store and side file, and the workers that ran it."""

    label: str
    folder: Path
    rng: random.Random
    zygote: Zygote
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    workers: list[Worker] = field(default_factory=list)

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

    def spawn(self, mode: str) -> Worker:
        args = [str(self.store_dir), str(self.sidefile)]
        if mode == "start":
            args.append(self.session_id)
        output = self.folder / f"worker-{len(self.workers)}.err"
        pid = self.zygote.ask("spawn", str(output), *args)
        worker = Worker(self.zygote, pid, mode, output, pidfd=os.pidfd_open(pid))
        self.workers.append(worker)
        return worker

    def kill_at_random_point(self, worker: Worker) -> None:
        """SIGKILL ``worker`` at a random moment of its run.

        The moment is a random point the worker reached (still starting up, after
        ``begin``, or after its k-th ``start``), seen by polling the side file, plus
        a random delay of up to a few milliseconds, so that kills land inside
        steps, inside commits and between them.
        """
        point = self.rng.randint(-1, len(STEP_NAMES))
        if point >= 0:
            wanted, pid = point + 1, str(worker.pid)
            deadline = time.monotonic() + DEADLINE
            while worker.running():
                if sum(1 for line in self.lines() if line[-1] == pid) >= wanted:
                    break
                assert time.monotonic() < deadline, f"{self.label}: worker {pid} stalled"
                time.sleep(0.0005)
        time.sleep(self.rng.uniform(0, 0.008))  # the kill's random moment, not a wait
        worker.kill()  # SIGKILL; a no-op if it already exited
        code = worker.finish(DEADLINE)
        worker.killed = code == -signal.SIGKILL
        assert worker.killed or code == 0, self.describe()

    def describe(self) -> str:
        parts = [self.label]
        for worker in self.workers:
            err = (
                worker.output.read_text(errors="replace")[-2000:] if worker.output.exists() else ""
            )
            parts.append(
                f"worker {worker.pid} mode={worker.mode} rc={worker.exitcode} "
                f"killed={worker.killed}\n{err}"
            )
        parts.append("side file:\n" + "\n".join(" ".join(line) for line in self.lines()))
        return "\n".join(parts)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
            assert worker.finish(DEADLINE) is not None, f"worker {worker.pid} outlived SIGKILL"


async def _read_store(store_dir: Path) -> tuple[list[str], Session | None, list[str]]:
    """Return the stored session ids, the one session, and every listing problem."""
    store = FileStore(store_dir, durability="fsync")
    try:
        rows = await store.list()
        problems = [f"{row.id}: {row.problem}" for row in rows if row.problem is not None]
        sessions = [await store.load(row.id) for row in rows if row.problem is None]
        return [row.id for row in rows], (sessions[0] if sessions else None), problems
    finally:
        await store.close()


def _check(trial: Trial) -> None:
    """Check one finished trial exactly.

    Workers run one after another, so the side file is the trial's timeline, and the
    stored state names, for every step, the worker whose run of it was committed
    (``ran_by:<step>``, committed atomically with the step's output). A correct
    engine leaves exactly this:

    1. The session is completed: its steps, in order, each committed once
       (one successful attempt in ``tool_history``), with the right outputs.
    2. For every step, the last ``start`` line is by the worker that committed it:
       once a step is committed, no later worker starts it again.
    3. Any other ``start`` of that step is by a worker that was killed, and is that
       worker's last line: the only step ever run twice is the one in flight at a
       kill, and a killed worker's in-flight step was not committed by it.
    4. No worker starts a step twice, and each runs consecutive steps in order:
       nothing is skipped and nothing goes backwards.
    5. The committing workers follow the order in which workers ran.
    6. Every ``done`` line carries the right output; the last worker, if it
       started the session by id or ran a step, wrote one.
    7. The store holds just this session, and it loads without error.
    """
    ids, session, problems = asyncio.run(_read_store(trial.store_dir))
    context = trial.describe()
    assert problems == [], context
    assert ids == [trial.session_id], context
    assert session is not None, context
    expected = _expected_outputs()

    # 1. complete, each step committed once, outputs right
    assert session.status == "completed", context
    assert session.steps_done == STEP_NAMES, context
    assert session.outputs == expected, context
    history = [(result.name, result.attempt, result.error) for result in session.tool_history]
    assert history == [(name, 1, None) for name in STEP_NAMES], context

    pids = [worker.pid for worker in trial.workers]
    order = {pid: position for position, pid in enumerate(pids)}
    killed = {worker.pid for worker in trial.workers if worker.killed}
    lines = trial.lines()
    for line in lines:
        assert int(line[-1]) in order, f"line from an unknown process: {line}\n{context}"
    last_line_of = {int(line[-1]): position for position, line in enumerate(lines)}
    starts = [
        (position, line[1], int(line[2]))
        for position, line in enumerate(lines)
        if line[0] == "start"
    ]

    committers = []
    for name in STEP_NAMES:
        committer = session.state.get(f"ran_by:{name}")
        assert committer in order, f"{name}: state does not name its committer\n{context}"
        committers.append(order[committer])
        runs = [(position, pid) for position, step, pid in starts if step == name]
        # 2. the committed run is the last run of the step
        assert runs, f"{name} never started\n{context}"
        assert runs[-1][1] == committer, f"{name} ran again after its commit\n{context}"
        # 3. earlier runs died in flight, uncommitted
        for position, pid in runs[:-1]:
            assert pid in killed, f"{name}: worker {pid} ran it, lived, did not commit\n{context}"
            assert last_line_of[pid] == position, f"{name}: worker {pid} went on\n{context}"
        # 4a. no worker starts a step twice
        assert len({pid for _, pid in runs}) == len(runs), f"{name} ran twice in one\n{context}"

    # 4b. each worker runs consecutive steps, in order
    for pid in pids:
        mine = [STEP_NAMES.index(step) for _, step, owner in starts if owner == pid]
        first = mine[0] if mine else 0
        assert mine == list(range(first, first + len(mine))), f"worker {pid}\n{context}"
    # 5. commits follow the order the workers ran in
    assert committers == sorted(committers), context

    # 6. done lines
    done = [line for line in lines if line[0] == "done"]
    for line in done:
        assert line[1:3] == [trial.session_id, str(expected[STEP_NAMES[-1]])], context
    final = trial.workers[-1]
    final_ran_steps = any(owner == final.pid for _, _, owner in starts)
    if final.mode == "start" or final_ran_steps:
        assert any(int(line[3]) == final.pid for line in done), context


def _run_trial(folder: Path, seed: int, number: int, started: list[Zygote]) -> int:
    """Run one trial; return how many workers it killed."""
    trial = Trial(
        label=f"trial {number} (STEPVAULT_CRASH_SEED={seed})",
        folder=folder,
        rng=random.Random(seed * 1_000_003 + number),
        zygote=_zygote(started),
    )
    folder.mkdir()
    try:
        for kill in range(trial.rng.randint(*KILLS)):
            # The first worker must create the session: only a start by id does.
            mode = "start" if kill == 0 or trial.rng.random() < 0.5 else "resume_all"
            trial.kill_at_random_point(trial.spawn(mode))
        # The last worker finishes; resume_all only finds the session if it is stored.
        ids, _, _ = asyncio.run(_read_store(trial.store_dir))
        mode = "resume_all" if ids and trial.rng.random() < 0.5 else "start"
        final = trial.spawn(mode)
        assert final.finish(DEADLINE) == 0, trial.describe()
        _check(trial)
        return sum(worker.killed for worker in trial.workers)
    finally:
        trial.close()


def test_kill_9_never_loses_or_repeats_a_committed_step(tmp_path: Path) -> None:
    seed = int(os.environ.get("STEPVAULT_CRASH_SEED", str(random.randrange(1 << 32))))
    with zygotes() as started, ThreadPoolExecutor(max_workers=max(1, JOBS)) as pool:
        futures = [
            pool.submit(_run_trial, tmp_path / f"trial-{number}", seed, number, started)
            for number in range(TRIALS)
        ]
        try:
            kills = sum(future.result() for future in futures)
        finally:
            pool.shutdown(cancel_futures=True)  # stop at the first failing trial
    # Each trial's last worker completed its session: lost and repeated steps fail _check
    report(
        "kill -9",
        size=f"{TRIALS} trials, {KILLS[0]}-{KILLS[1]} kills each",
        cases=kills,
        found=None,
        survived=TRIALS,
        lost=0,
    )
    # About two kills a trial land before the worker finishes on its own (some come
    # after its last step): far fewer would mean the trials tested little
    assert kills >= TRIALS // 2
