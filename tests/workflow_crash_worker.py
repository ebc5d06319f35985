"""The process test_workflow_crash.py kills with SIGKILL. A script, not a test module.

Usage::

    python tests/workflow_crash_worker.py SCENARIO STORE_DIR SIDEFILE MODE SESSION_ID

SCENARIO picks the workflow (``retry``, ``wait``, ``sleep``, ``tool``, ``hang``). MODE
is ``start`` (start SESSION_ID, an idempotency key, and wait for it), ``wait``
(wait for SESSION_ID, resuming it here) or ``resume_all``. Lines appended to
SIDEFILE, each fsynced before anything else happens::

    begin <pid>                     the engine is imported
    attempt <n> <pid>               a step attempt began (retry, hang)
    call <tool> <pid>               a tool function really ran (not a replay)
    woke <unix time> <pid>          a durable sleep returned
    done <session id> <output>      the session's final output is in hand
    error <session id> <error type> the session ended with an engine error
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from engine import EngineError, FileStore, Runner, StepContext, Workflow

SLEEP_SECONDS = 3.0
RUNNER_OPTIONS: dict[str, Any] = {
    "cleanup_interval": None,
    "poll_interval": 0.05,
    "inline_wait": 0.2,
    "max_takeovers": 2,
}
_sidefile: list[str] = []


def append_line(path: str, line: str) -> None:
    """Append one line to ``path`` and make it durable before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def note(line: str) -> None:
    """Record ``line`` with this process's pid."""
    append_line(_sidefile[0], f"{line} {os.getpid()}")


def seen(prefix: str) -> int:
    """Count the side file's lines starting with ``prefix``."""
    with open(_sidefile[0]) as handle:
        return sum(1 for line in handle if line.startswith(prefix))


retry = Workflow("crash-retry")


@retry.step(retries=3, backoff=30.0, max_backoff=30.0)  # long: the kill lands in the wait
async def flaky(ctx: StepContext, value: int) -> int:
    note(f"attempt {ctx.attempt}")
    if ctx.attempt < 2:
        raise ConnectionError(f"flake {ctx.attempt}")
    return value + ctx.attempt


wait = Workflow("crash-wait")


def lookup(key: str) -> str:
    note("call lookup")
    return key.upper()


@wait.step
async def review(ctx: StepContext, key: str) -> str:
    found = await ctx.tool("lookup", lookup, key)
    decision = await ctx.wait_for_event("approval")
    return f"{found}-approved-by-{decision['by']}"


sleep = Workflow("crash-sleep")


def stamp() -> str:
    note("call stamp")
    return "stamped"


@sleep.step
async def nap(ctx: StepContext, value: int) -> str:
    first = await ctx.tool("stamp", stamp)
    await ctx.sleep(SLEEP_SECONDS)
    note(f"woke {time.time()}")
    return f"{first}-rested"


tool = Workflow("crash-tool")


def first_call(value: int) -> int:
    note("call first")
    return value * 2


async def second_call(value: int) -> int:
    blocks = seen("call second") == 0  # the first time it runs, it never returns
    note("call second")
    if blocks:
        await asyncio.Event().wait()
    return value + 1


@tool.step
async def pair(ctx: StepContext, value: int) -> int:
    doubled = await ctx.tool("first", first_call, value)
    return await ctx.tool("second", second_call, doubled)


hang = Workflow("crash-hang")


@hang.step(retries=5)
async def stuck(ctx: StepContext, value: int) -> int:
    note(f"attempt {ctx.attempt}")
    await asyncio.Event().wait()  # crashes its process every time (the test kills it)
    return value


SCENARIOS = {"retry": retry, "wait": wait, "sleep": sleep, "tool": tool, "hang": hang}
INPUTS: dict[str, Any] = {"retry": 10, "wait": "ok", "sleep": 1, "tool": 5, "hang": 1}


async def _run(scenario: str, store_dir: str, mode: str, session_id: str) -> None:
    workflow = SCENARIOS[scenario]
    store = FileStore(store_dir, durability="fsync")
    async with Runner(store, [workflow], **RUNNER_OPTIONS) as runner:
        if mode == "start":
            ids = [await runner.start(workflow, INPUTS[scenario], session_id=session_id)]
        elif mode == "wait":
            ids = [session_id]
        else:
            ids = await runner.resume_all()
        for sid in ids:
            try:
                output = await runner.wait(sid)
            except EngineError as exc:
                append_line(_sidefile[0], f"error {sid} {type(exc).__name__}")
            else:
                append_line(_sidefile[0], f"done {sid} {output}")


def main(argv: list[str]) -> int:
    """Run one scenario in one mode; see the module docstring."""
    if len(argv) != 6 or argv[1] not in SCENARIOS:
        sys.stderr.write(__doc__ or "")
        return 2
    scenario, store_dir, sidefile, mode, session_id = argv[1:]
    _sidefile.append(sidefile)
    note("begin")
    asyncio.run(_run(scenario, store_dir, mode, session_id))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
