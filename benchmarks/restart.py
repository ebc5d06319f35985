"""Restart figures: how soon resume_all starts work, how fast a long session loads, and
how long a cleanup sweep over the stored sessions takes.

python benchmarks/restart.py SESSIONS STEPS   # prints one JSON object

The stored sessions are made by another process, so the peak memory reported is
the runner's alone: a restarted runner that finds SESSIONS unfinished sessions.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import FileStore, Runner, SessionManager, StepContext, Workflow
from engine.stores.file_expiry import EXPIRY

LOADS = 5
"""How many times the long session is loaded (each by a new store); the median is reported."""


def _workflow(steps: int, started: list[float], first: asyncio.Event | None = None) -> Workflow:
    workflow = Workflow("restart")
    for index in range(steps):

        async def step(ctx: StepContext, value: Any) -> int:
            if not started:
                started.append(time.perf_counter())
                if first is not None:
                    first.set()
            return 1

        workflow.step(name=f"s{index}")(step)
    return workflow


async def _seed(folder: Path, sessions: int, workflow: Workflow) -> None:
    """Store ``sessions`` unfinished sessions, as a crashed runner would leave them."""
    store = FileStore(folder, durability="none")
    manager = SessionManager(store, cleanup_interval=None)
    for _ in range(sessions):
        session = manager.new_session(ttl=3600)
        session.workflow = workflow.name
        session.workflow_version = workflow.version
        session.workflow_fingerprint = workflow.fingerprint
        session.status = "running"
        await store.create(session)
    await store.close()


async def _long_session(folder: Path, steps: int) -> str:
    workflow = _workflow(steps, [])
    async with Runner(FileStore(folder), [workflow], cleanup_interval=None) as runner:
        session_id = await runner.start(workflow, None)
        await runner.wait(session_id)
    return session_id


def main(sessions: int, steps: int) -> dict[str, float]:
    """Seed the sessions in another process, then measure and return the restart figures."""
    with tempfile.TemporaryDirectory(prefix="stepvault-restart-") as root:
        many = Path(root) / "many"
        subprocess.run([sys.executable, __file__, "seed", str(many), str(sessions)], check=True)
        return asyncio.run(measure(many, Path(root) / "long", sessions, steps))


async def measure(many: Path, long: Path, sessions: int, steps: int) -> dict[str, float]:
    """Restart a runner over the ``many`` sessions; load a ``steps``-step session."""
    started: list[float] = []
    first = asyncio.Event()
    workflow = _workflow(1, started, first)
    async with Runner(FileStore(many), [workflow], cleanup_interval=None) as runner:
        begin = time.perf_counter()
        ids = await runner.resume_all()
        await first.wait()
        first_step = started[0] - begin
        # The runner works through them all; it offers no event for that: poll.
        while runner.backlog or runner.active:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        all_done = time.perf_counter() - begin
    if len(ids) != sessions:
        raise RuntimeError(f"resume_all found {len(ids)} of {sessions} sessions")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bounded, unbounded = await _sweeps(many)

    session_id = await _long_session(long, steps)
    loads = []
    for _ in range(LOADS):  # one load is one sample of a noisy machine: the median of a few
        store = FileStore(long)
        begin = time.perf_counter()
        loaded = await store.load(session_id)
        loads.append((time.perf_counter() - begin) * 1000)
        if loaded is None or len(loaded.steps_done) != steps:
            raise RuntimeError("the long session did not load whole")
    load_ms = statistics.median(loads)
    return {
        "sessions": sessions,
        "resume_all_first_step_s": first_step,
        "all_sessions_done_s": all_done,
        "peak_rss_mb": rss_mb,
        "long_session_steps": steps,
        "load_long_session_ms": load_ms,
        "cleanup_sweep_s": bounded,
        "cleanup_sweep_without_bounds_s": unbounded,
    }


async def _sweeps(folder: Path) -> tuple[float, float]:
    """Time a cleanup sweep over the (live) sessions with their expiry bounds, then without.

    Without bounds (a store written by an older stepvault) the sweep reads every
    session, and gives each a bound.
    """
    manager = SessionManager(FileStore(folder), cleanup_interval=None)
    timings = []
    for drop_bounds in (False, True):
        if drop_bounds:
            shutil.rmtree(folder / EXPIRY)
        begin = time.perf_counter()
        result = await manager.perform_cleanup()
        timings.append(time.perf_counter() - begin)
        if result.cleaned_sessions or result.skipped:
            raise RuntimeError(f"the sweep removed or skipped live sessions: {result}")
    return timings[0], timings[1]


if __name__ == "__main__":
    if sys.argv[1] == "seed":
        asyncio.run(_seed(Path(sys.argv[2]), int(sys.argv[3]), _workflow(1, [])))
    else:
        print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
