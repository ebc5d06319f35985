"""Restart figures: how soon resume_all starts work, and how fast a long session loads.

python benchmarks/restart.py SESSIONS STEPS   # prints one JSON object
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import FileStore, Runner, SessionManager, StepContext, Workflow


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


async def main(sessions: int, steps: int) -> dict[str, float]:
    """Measure and return the restart figures."""
    with tempfile.TemporaryDirectory(prefix="stepvault-restart-") as root:
        many, long = Path(root) / "many", Path(root) / "long"
        started: list[float] = []
        first = asyncio.Event()
        workflow = _workflow(1, started, first)
        await _seed(many, sessions, workflow)
        async with Runner(FileStore(many), [workflow], cleanup_interval=None) as runner:
            begin = time.perf_counter()
            ids = await runner.resume_all()
            await first.wait()
            first_step = started[0] - begin
            await asyncio.gather(*(runner.wait(i) for i in ids))
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        session_id = await _long_session(long, steps)
        store = FileStore(long)
        begin = time.perf_counter()
        loaded = await store.load(session_id)
        load_ms = (time.perf_counter() - begin) * 1000
        if loaded is None or len(loaded.steps_done) != steps:
            raise RuntimeError("the long session did not load whole")
    return {
        "sessions": sessions,
        "resume_all_first_step_s": first_step,
        "peak_rss_mb": rss_mb,
        "long_session_steps": steps,
        "load_long_session_ms": load_ms,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))))
