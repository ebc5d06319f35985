"""Durable checkpoints per second with many sessions running at once.

python benchmarks/concurrency.py SESSIONS STEPS STORE   # prints one JSON object

STORE is ``file`` (FileStore, durability fsync), ``file-batch`` (FileStore with
group commit), ``sqlite`` or ``sqlite-batch``. Every session runs STEPS trivial steps
(a 512-byte output each) on one runner; the figure counts every checkpoint the
store made durable (a session's revision) over the wall time from the first
start to the last session completed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import FileStore, Runner, SQLiteStore, StepContext, Workflow
from engine.stores.base import Store


def _workflow(steps: int) -> Workflow:
    workflow = Workflow("burst")
    for index in range(steps):

        async def step(ctx: StepContext, value: Any) -> str:
            return "x" * 512

        workflow.step(name=f"s{index}")(step)
    return workflow


def _store(kind: str, folder: Path) -> Store:
    if kind == "file":
        return FileStore(folder / "sessions")
    if kind == "file-batch":
        return FileStore(folder / "sessions", durability="batch")
    if kind == "sqlite":
        return SQLiteStore(folder / "sv.db")
    if kind == "sqlite-batch":
        return SQLiteStore(folder / "sv.db", durability="batch")
    raise SystemExit(f"unknown store {kind!r}")


async def main(sessions: int, steps: int, kind: str) -> dict[str, Any]:
    """Run ``sessions`` sessions of ``steps`` steps at once and return the figures."""
    workflow = _workflow(steps)
    with tempfile.TemporaryDirectory(prefix="stepvault-burst-") as root:
        store = _store(kind, Path(root))
        async with Runner(
            store, [workflow], cleanup_interval=None, max_concurrency=sessions
        ) as runner:
            begin = time.perf_counter()
            ids = [await runner.start(workflow, None) for _ in range(sessions)]
            await asyncio.gather(*(runner.wait(session_id) for session_id in ids))
            elapsed = time.perf_counter() - begin
            loaded = [await store.load(session_id) for session_id in ids]
        checkpoints = sum(session.revision for session in loaded if session is not None)
        done = sum(1 for s in loaded if s is not None and s.status == "completed")
    if done != sessions:
        raise RuntimeError(f"only {done} of {sessions} sessions completed")
    return {
        "store": kind,
        "sessions": sessions,
        "steps": steps,
        "checkpoints": checkpoints,
        "seconds": elapsed,
        "checkpoints_per_s": checkpoints / elapsed,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))))
