"""Durable checkpoints per second with many sessions running at once.

python benchmarks/concurrency.py SESSIONS STEPS STORE [PROCESSES]   # prints one JSON object

STORE is ``file`` (FileStore, durability fsync), ``file-batch`` (FileStore with
group commit), ``sqlite`` or ``sqlite-batch``. Every session runs STEPS trivial steps
(a 512-byte output each); the sessions are started together, and the figure
counts every checkpoint the store made durable (a session's revision) over the
wall time from the first start to the last session completed. With PROCESSES > 1,
that many runner processes share the one store, each running its share of the
sessions, all started together.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
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


async def run_share(root: Path, kind: str, sessions: int, steps: int) -> dict[str, Any]:
    """Run ``sessions`` sessions at once on one runner; return when it began and ended."""
    workflow = _workflow(steps)
    store = _store(kind, root)
    async with Runner(store, [workflow], cleanup_interval=None, max_concurrency=sessions) as runner:
        begin = time.time()  # wall clock: comparable between processes
        # Started together, as a server handling many requests would: a start returns
        # once its session is durably stored, and concurrent creates share the syncs.
        ids = await asyncio.gather(*(runner.start(workflow, None) for _ in range(sessions)))
        await asyncio.gather(*(runner.wait(session_id) for session_id in ids))
        end = time.time()
        loaded = [await store.load(session_id) for session_id in ids]
    done = [s for s in loaded if s is not None and s.status == "completed"]
    if len(done) != sessions:
        raise RuntimeError(f"only {len(done)} of {sessions} sessions completed")
    return {"begin": begin, "end": end, "checkpoints": sum(s.revision for s in done)}


def main(sessions: int, steps: int, kind: str, processes: int = 1) -> dict[str, Any]:
    """Run the sessions on ``processes`` runners sharing one store; return the figures."""
    with tempfile.TemporaryDirectory(prefix="stepvault-burst-") as folder:
        root = Path(folder)
        if processes == 1:
            shares = [asyncio.run(run_share(root, kind, sessions, steps))]
        else:
            shares = _in_processes(root, kind, sessions // processes, steps, processes)
    elapsed = max(s["end"] for s in shares) - min(s["begin"] for s in shares)
    checkpoints = sum(s["checkpoints"] for s in shares)
    return {
        "store": kind,
        "processes": processes,
        "sessions": sessions,
        "steps": steps,
        "checkpoints": checkpoints,
        "seconds": elapsed,
        "checkpoints_per_s": checkpoints / elapsed,
    }


def _in_processes(
    root: Path, kind: str, share: int, steps: int, processes: int
) -> list[dict[str, Any]]:
    """Start the runner processes, let them all go at once, and collect their shares."""
    command = [sys.executable, __file__, "share", str(root), kind, str(share), str(steps)]
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for child in children:  # every one imported and ready before any starts
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a runner process did not start")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    shares = []
    for child in children:
        out, _ = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise RuntimeError(f"a runner process failed ({child.returncode})")
        shares.append(json.loads(out.strip().splitlines()[-1]))
    return shares


def _share_process(root: str, kind: str, sessions: int, steps: int) -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(run_share(Path(root), kind, sessions, steps))))


if __name__ == "__main__":
    if sys.argv[1] == "share":
        _share_process(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        processes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], processes)))
