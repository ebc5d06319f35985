"""The process test_crash.py kills with SIGKILL. A script, not a test module.

Usage::

    python tests/crash_worker.py STORE_DIR SIDEFILE [SESSION_ID]
    python tests/crash_worker.py --serve

With SESSION_ID it starts that session (an idempotency key: an existing session is
adopted, and its completed steps do not run again) and waits for it; without, it
resumes every unfinished session with ``resume_all``. It appends to SIDEFILE, each
line written with O_APPEND and fsynced before anything else happens:

- ``begin <pid>`` once the engine is imported, before the runner starts;
- ``start <step> <pid>`` at the top of every step attempt, before its work;
- ``done <session_id> <output> <pid>`` when a session's final output is in hand.

Step ``k`` (0-based) returns its input plus ``k + 1``, so the final output is
``INPUT + 1 + 2 + ... + len(STEP_NAMES)``, and records the pid that ran it in the
session state under ``ran_by:<step>``, which commits atomically with its output:
the stored state names the process whose run of each step was committed.

test_crash.py starts one ``--serve`` process per thread and has it fork each
worker (see ``serve``): the engine is imported once, instead of once per worker,
which would take most of a trial's time.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from engine import FileStore, Runner, StepContext, Workflow

STEP_NAMES = [f"s{index}" for index in range(8)]
INPUT = 1000
MAX_WORK_SECONDS = 0.005

workflow = Workflow("crash-chain", version="1")
_sidefile: list[str] = []  # set by main(); steps read it


def append_line(path: str, line: str) -> None:
    """Append one line to ``path`` and make it durable before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _announce(ctx: StepContext) -> None:
    append_line(_sidefile[0], f"start {ctx.step} {os.getpid()}")
    ctx.state[f"ran_by:{ctx.step}"] = os.getpid()


def _make_step(index: int) -> Callable[[StepContext, int], Any]:
    """Even steps are sync (a worker thread), odd ones async, to crash in both."""
    if index % 2 == 0:

        def sync_step(ctx: StepContext, value: int) -> int:
            _announce(ctx)
            time.sleep(random.uniform(0.001, MAX_WORK_SECONDS))
            return value + index + 1

        return sync_step

    async def async_step(ctx: StepContext, value: int) -> int:
        _announce(ctx)
        await asyncio.sleep(random.uniform(0.001, MAX_WORK_SECONDS))
        return value + index + 1

    return async_step


for _index, _name in enumerate(STEP_NAMES):
    workflow.step(name=_name)(_make_step(_index))


async def _run(store_dir: str, session_id: str | None) -> list[tuple[str, Any]]:
    store = FileStore(store_dir, durability="fsync")
    async with Runner(store, [workflow], cleanup_interval=None) as runner:
        if session_id is not None:
            return [(session_id, await runner.run(workflow, INPUT, session_id=session_id))]
        return [(sid, await runner.wait(sid)) for sid in await runner.resume_all()]


def serve() -> int:
    """Fork workers on request, from this process that imported the engine once.

    Reads tab-separated commands on stdin and answers each with one line on stdout:

    - ``spawn OUTPUT ARG...``: fork a worker that runs ``main(["crash_worker.py",
      ARG...])`` with its stdout and stderr going to OUTPUT; answer its pid. The
      worker stays unreaped, so its pid cannot be reused, until ``reap``.
    - ``reap PID``: wait for that worker to end; answer its exit code (minus the
      signal's number if a signal ended it).

    Returns at the end of stdin. It starts no thread, so forking is safe.
    """
    while line := sys.stdin.readline():
        command, *fields = line.rstrip("\n").split("\t")
        if command == "spawn":
            pid = os.fork()
            if pid == 0:
                _worker_child(fields[0], ["crash_worker.py", *fields[1:]])
            answer = pid
        elif command == "reap":
            answer = os.waitstatus_to_exitcode(os.waitpid(int(fields[0]), 0)[1])
        else:
            raise SystemExit(f"unknown command {command!r}")
        sys.stdout.write(f"{answer}\n")
        sys.stdout.flush()
    return 0


def _worker_child(output: str, argv: list[str]) -> NoReturn:
    """Run ``main`` in a forked worker, its output going to ``output``; never return."""
    code = 1
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str]) -> int:
    """Run or resume the crash workflow; see the module docstring."""
    if len(argv) not in (3, 4):
        sys.stderr.write(__doc__ or "")
        return 2
    store_dir, sidefile = argv[1], argv[2]
    _sidefile.append(sidefile)
    append_line(sidefile, f"begin {os.getpid()}")
    for session_id, output in asyncio.run(_run(store_dir, argv[3] if len(argv) == 4 else None)):
        append_line(sidefile, f"done {session_id} {output} {os.getpid()}")
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(sys.argv))
