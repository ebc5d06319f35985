"""The processes test_multiprocess.py runs side by side. A script, not a test module.

Usage::

    python tests/multiprocess_worker.py create STORE_DIR COUNT
    python tests/multiprocess_worker.py drain STORE_DIR LOG_DIR GO_FILE DEADLINE_SECONDS

``create`` starts COUNT sessions of the workflow (inputs 0 .. COUNT - 1) and stops
before any step runs, leaving them unfinished; it prints their ids, one a line.

``drain`` writes ``ready <pid>``, waits until GO_FILE exists (so that every worker
starts at once), then calls ``resume_all`` and waits for what it started, again
and again, until no unfinished session is left: sessions another process holds
are busy here, so it polls for them, and takes over those of a process that dies.
It exits 0 when nothing is left, 3 if DEADLINE_SECONDS pass first.

Every step writes ``start <session> <step> <pid> <ns>`` before its work and
``end <session> <step> <pid> <ns>`` after it to LOG_DIR/<pid>.log (``ns`` from the
system-wide monotonic clock, so the logs of all processes line up), and records
its pid in the session state under ``ran_by:<step>``, committed with its output.
``done`` and ``error`` lines report what ``wait`` returned. A killed process's
lines survive it: they are in the page cache.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from pathlib import Path

from engine import FileStore, Runner, SessionBusyError, StepContext, Workflow

STEP_NAMES = ["a", "b", "c"]
POLL_SECONDS = 0.02
"""How often a worker looks again for sessions that another process holds."""

workflow = Workflow("multiprocess", version="1")
_log_fd: list[int] = []  # the open log of a drain worker
_hold: list[asyncio.Event] = []  # set in create mode: no step may run


def expected_output(value: int) -> int:
    """The workflow's result for input ``value``."""
    return (value + 1) * 2 + 3


def log_line(*fields: object) -> None:
    """Append one line to this worker's log (O_APPEND, one write: never torn)."""
    os.write(_log_fd[0], (" ".join(str(part) for part in fields) + "\n").encode())


def _work(ctx: StepContext) -> float:
    log_line("start", ctx.session_id, ctx.step, os.getpid(), time.monotonic_ns())
    ctx.state[f"ran_by:{ctx.step}"] = os.getpid()
    return random.uniform(0.001, 0.004)


def _done(ctx: StepContext) -> None:
    log_line("end", ctx.session_id, ctx.step, os.getpid(), time.monotonic_ns())


@workflow.step
async def a(ctx: StepContext, value: int) -> int:
    if _hold:
        await _hold[0].wait()  # create mode: stays here until the runner is closed
    await asyncio.sleep(_work(ctx))
    _done(ctx)
    return value + 1


@workflow.step
def b(ctx: StepContext, value: int) -> int:
    time.sleep(_work(ctx))  # a sync step, in a worker thread
    _done(ctx)
    return value * 2


@workflow.step
async def c(ctx: StepContext, value: int) -> int:
    await asyncio.sleep(_work(ctx))
    _done(ctx)
    return value + 3


async def create(store_dir: str, count: int) -> list[str]:
    """Start ``count`` sessions, then close the runner before any step has run."""
    _hold.append(asyncio.Event())
    async with Runner(FileStore(store_dir), [workflow], cleanup_interval=None) as runner:
        return [await runner.start(workflow, value) for value in range(count)]


def wait_for_go(go_file: Path, deadline: float) -> bool:
    """Say we are ready, then wait until every worker may go; False at the deadline."""
    log_line("ready", os.getpid())
    while not go_file.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def drain(store_dir: str, deadline: float) -> int:
    """Resume sessions until none is unfinished; return the exit status."""
    async with Runner(FileStore(store_dir), [workflow], cleanup_interval=None) as runner:
        while True:
            session_ids = await runner.resume_all()
            if not session_ids:
                return 0
            results = await asyncio.gather(
                *(runner.wait(session_id) for session_id in session_ids), return_exceptions=True
            )
            busy = 0
            for session_id, result in zip(session_ids, results, strict=True):
                if isinstance(result, SessionBusyError):
                    busy += 1
                elif isinstance(result, BaseException):
                    log_line("error", session_id, os.getpid(), repr(result).replace("\n", " "))
                else:
                    log_line("done", session_id, os.getpid(), result)
            if time.monotonic() > deadline:
                return 3
            if busy == len(session_ids):
                await asyncio.sleep(POLL_SECONDS)  # all held elsewhere: look again soon


def main(argv: list[str]) -> int:
    """Run ``create`` or ``drain``; see the module docstring."""
    if len(argv) == 4 and argv[1] == "create":
        for session_id in asyncio.run(create(argv[2], int(argv[3]))):
            sys.stdout.write(f"{session_id}\n")
        return 0
    if len(argv) == 6 and argv[1] == "drain":
        log = Path(argv[3]) / f"{os.getpid()}.log"
        _log_fd.append(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
        deadline = time.monotonic() + float(argv[5])
        if not wait_for_go(Path(argv[4]), deadline):
            return 3
        return asyncio.run(drain(argv[2], deadline))
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
