"""A runner process for the multi-runner tests. A script, not a test module.

Usage::

    python tests/lease_worker.py STORE_URL LOGFILE [--lease-ttl S] [--go FILE] [--hold FILE]

It runs every unfinished session of the ``relay`` workflow in the store, calling
``resume_all`` again every third of the lease TTL (at most every 0.5 s), so it
picks up sessions whose runner died once their lease runs out, until no session
is unfinished and its own sessions have settled; then it exits 0. With ``--go FILE`` it starts only
once FILE exists, so that several workers start together. With ``--hold FILE``,
step ``s1`` waits until FILE exists: the process is then mid-step for as long as
a test wants.

It appends one line per event to LOGFILE (``O_APPEND``: a line written before a
SIGKILL survives it):

- ``begin <pid> <owner>`` once its runner exists;
- ``start <session> <step> <pid>`` at the top of every step attempt;
- ``commit <session> <step> <pid>`` once a step's checkpoint is committed;
- ``lost <session> <pid>`` when a session stopped with ``LeaseLostError``;
- ``error <session> <pid> <message>`` for any other failure but ``SessionBusyError``.

Each step also records ``ran_by:<step> = pid`` in the session state, committed
atomically with its output: the store names the process whose run was committed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from engine import (
    LeaseLostError,
    Runner,
    SessionBusyError,
    StepContext,
    StepEvent,
    Workflow,
    open_store,
)
from engine.models import UNFINISHED

STEP_NAMES = ["s0", "s1", "s2", "s3"]
HOLD_STEP = "s1"
WORK_SECONDS = 0.02
CONCURRENCY = 16
"""Sessions one worker runs at once: fewer than a test's sessions, so workers share them."""

workflow = Workflow("relay", version="1")
_settings: dict[str, Path] = {}  # "log", and "go" and "hold" if given: set by main()


def log(line: str) -> None:
    """Append one line to the log file; a line written survives a SIGKILL after it.

    Outside a worker process (a test running the workflow itself) there is no log.
    """
    if "log" not in _settings:
        return
    fd = os.open(_settings["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


async def wait_for_file(path: Path | None) -> None:
    """Return once ``path`` exists (at once if None): another process creates it."""
    # A stat polled every 10 ms: another process has no event to set for us.
    while path is not None and not os.path.exists(path):  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.01)


async def _work(ctx: StepContext, value: int) -> int:
    log(f"start {ctx.session_id} {ctx.step} {os.getpid()}")
    if ctx.step == HOLD_STEP:
        await wait_for_file(_settings.get("hold"))
    await asyncio.sleep(WORK_SECONDS)
    ctx.state[f"ran_by:{ctx.step}"] = os.getpid()
    return value + 1


for _name in STEP_NAMES:
    workflow.step(name=_name)(_work)


def _on_event(event: StepEvent) -> None:
    if event.kind == "committed":
        log(f"commit {event.session_id} {event.step} {os.getpid()}")


def _settle(session_id: str, outcome: asyncio.Future[object]) -> None:
    error = outcome.exception()
    if isinstance(error, LeaseLostError):
        log(f"lost {session_id} {os.getpid()}")
    elif error is not None and not isinstance(error, SessionBusyError):
        message = " ".join(f"{type(error).__name__}: {error}".split())
        log(f"error {session_id} {os.getpid()} {message}")


async def serve(store_url: str, lease_ttl: float) -> None:
    """Resume sessions until none is unfinished and ours have settled."""
    store = open_store(store_url)
    poll = min(lease_ttl / 3, 0.5)
    runner = Runner(
        store,
        [workflow],
        lease_ttl=lease_ttl,
        max_concurrency=CONCURRENCY,
        cleanup_interval=None,
        hooks=[_on_event],
    )
    async with runner:
        await store.list()  # connected (and the schema migrated) before saying so
        log(f"begin {os.getpid()} {runner.owner}")
        await wait_for_file(_settings.get("go"))
        waiting: dict[str, asyncio.Future[object]] = {}
        while True:
            for session_id in await runner.resume_all():
                if session_id not in waiting:
                    waiting[session_id] = asyncio.ensure_future(runner.wait(session_id))
            if waiting:
                await asyncio.wait(waiting.values(), timeout=poll)
            for session_id, outcome in list(waiting.items()):
                if outcome.done():
                    del waiting[session_id]
                    _settle(session_id, outcome)
            unfinished = [row for row in await store.list() if row.status in UNFINISHED]
            if not unfinished and not waiting:
                return
            if not waiting:
                await asyncio.sleep(poll)  # others hold what is left: look again soon


def main() -> None:
    """Parse the command line and serve until the store's sessions are done."""
    parser = argparse.ArgumentParser()
    parser.add_argument("store_url")
    parser.add_argument("logfile", type=Path)
    parser.add_argument("--lease-ttl", type=float, default=1.5)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--hold", type=Path)
    args = parser.parse_args()
    _settings["log"] = args.logfile
    for name in ("go", "hold"):
        if getattr(args, name) is not None:
            _settings[name] = getattr(args, name)
    asyncio.run(serve(args.store_url, args.lease_ttl))


if __name__ == "__main__":
    main()
