"""kill -9 at random moments: no committed step runs again, none is lost, nothing corrupts.

Each trial runs ``crash_worker.py`` (an 8-step workflow on a FileStore with fsync
durability) as a real process, SIGKILLs it at a random moment 1 to 3 times, then
lets a last worker finish the session. The number of trials comes from
``STEPVAULT_CRASH_TRIALS`` (50 by default, about 30 s); the long run is::

    STEPVAULT_CRASH_TRIALS=3000 .venv/bin/python -m pytest tests/test_crash.py

``STEPVAULT_CRASH_SEED`` replays a failing schedule (the failure message names it);
``STEPVAULT_CRASH_JOBS`` sets how many trials run side by side (default: CPU count,
at most 4).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO

from engine import FileStore, Session

TRIALS = int(os.environ.get("STEPVAULT_CRASH_TRIALS", "50"))
JOBS = int(os.environ.get("STEPVAULT_CRASH_JOBS", str(min(4, os.cpu_count() or 1))))
WORKER_PATH = Path(__file__).with_name("crash_worker.py")
DEADLINE = 60.0
"""Seconds any one worker may take to reach a point or finish: a hang, not slowness."""


def _load_worker() -> ModuleType:
    """Import crash_worker.py by path, for its step names and input (not to run it)."""
    spec = importlib.util.spec_from_file_location("stepvault_crash_worker", WORKER_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_WORKER = _load_worker()
STEP_NAMES: list[str] = _WORKER.STEP_NAMES
INPUT: int = _WORKER.INPUT


def _expected_outputs() -> dict[str, int]:
    """Step k adds k + 1 to its input: the chain of outputs a correct run produces."""
    outputs, value = {}, INPUT
    for index, name in enumerate(STEP_NAMES):
        value += index + 1
        outputs[name] = value
    return outputs


@dataclass
class Worker:
    """One worker process of a trial, in the order they ran (never two at once)."""

    process: subprocess.Popen[bytes]
    mode: str  # "start" (with the session id) or "resume_all"
    stderr: IO[bytes]
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Trial:
    """One session, its store and side file, and the workers that ran it."""

    label: str
    folder: Path
    rng: random.Random
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
        args = [sys.executable, str(WORKER_PATH), str(self.store_dir), str(self.sidefile)]
        if mode == "start":
            args.append(self.session_id)
        stderr = (self.folder / f"worker-{len(self.workers)}.err").open("wb")
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        worker = Worker(process, mode, stderr)
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
            while worker.process.poll() is None:
                if sum(1 for line in self.lines() if line[-1] == pid) >= wanted:
                    break
                assert time.monotonic() < deadline, f"{self.label}: worker {pid} stalled"
                time.sleep(0.0005)
        time.sleep(self.rng.uniform(0, 0.008))  # the kill's random moment, not a wait
        worker.process.send_signal(signal.SIGKILL)  # a no-op if it already exited
        worker.process.wait(timeout=DEADLINE)
        worker.killed = worker.process.returncode == -signal.SIGKILL
        assert worker.killed or worker.process.returncode == 0, self.describe()

    def describe(self) -> str:
        parts = [self.label]
        for worker in self.workers:
            worker.stderr.flush()
            err = Path(worker.stderr.name).read_text(errors="replace")[-2000:]
            parts.append(
                f"worker {worker.pid} mode={worker.mode} rc={worker.process.returncode} "
                f"killed={worker.killed}\n{err}"
            )
        parts.append("side file:\n" + "\n".join(" ".join(line) for line in self.lines()))
        return "\n".join(parts)

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
            worker.stderr.close()


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


def _run_trial(folder: Path, seed: int, number: int) -> None:
    trial = Trial(
        label=f"trial {number} (STEPVAULT_CRASH_SEED={seed})",
        folder=folder,
        rng=random.Random(seed * 1_000_003 + number),
    )
    folder.mkdir()
    try:
        for kill in range(trial.rng.randint(1, 3)):
            # The first worker must create the session: only a start by id does.
            mode = "start" if kill == 0 or trial.rng.random() < 0.5 else "resume_all"
            trial.kill_at_random_point(trial.spawn(mode))
        # The last worker finishes; resume_all only finds the session if it is stored.
        ids, _, _ = asyncio.run(_read_store(trial.store_dir))
        mode = "resume_all" if ids and trial.rng.random() < 0.5 else "start"
        final = trial.spawn(mode)
        final.process.wait(timeout=DEADLINE)
        assert final.process.returncode == 0, trial.describe()
        _check(trial)
    finally:
        trial.close()


def test_kill_9_never_loses_or_repeats_a_committed_step(tmp_path: Path) -> None:
    seed = int(os.environ.get("STEPVAULT_CRASH_SEED", str(random.randrange(1 << 32))))
    with ThreadPoolExecutor(max_workers=max(1, JOBS)) as pool:
        futures = [
            pool.submit(_run_trial, tmp_path / f"trial-{number}", seed, number)
            for number in range(TRIALS)
        ]
        try:
            for future in futures:
                future.result()
        finally:
            pool.shutdown(cancel_futures=True)  # stop at the first failing trial
