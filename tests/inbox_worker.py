"""A runner process for test_events.py's cross-process inbox tests. A script, not a test module.

Usage::

    python tests/inbox_worker.py STORE_DIR MODE SESSION_ID

Runs the ``inbox-gate`` workflow on a FileStore (fsync) at STORE_DIR: its one step
prints ``reached <pid>``, then holds the session (the step is running, not waiting)
until a line comes on stdin (a tool call, so not again once it returned), then waits
for the event ``approval``. MODE is
``start`` (start SESSION_ID, an idempotency key) or ``wait`` (resume it here).
Prints ``done <output>`` once the session is complete.
"""

from __future__ import annotations

import asyncio
import os
import sys

from engine import FileStore, Runner, StepContext, Workflow

gated = Workflow("inbox-gate")


async def hold() -> str:
    """Return once the test writes a line to stdin: until then the step runs, not waits."""
    print(f"reached {os.getpid()}", flush=True)  # noqa: T201  # the test reads stdout
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


@gated.step
async def review(ctx: StepContext, value: str) -> str:
    await ctx.tool("hold", hold)  # a tool: once it returned, the step's replay skips it
    decision = await ctx.wait_for_event("approval")
    return f"{value}-approved-by-{decision['by']}"


async def _run(store_dir: str, mode: str, session_id: str) -> None:
    store = FileStore(store_dir)
    async with Runner(
        store, [gated], cleanup_interval=None, poll_interval=0.05, inline_wait=0.05
    ) as runner:
        if mode == "start":
            await runner.start(gated, "memo", session_id=session_id)
        output = await runner.wait(session_id)
    print(f"done {output}", flush=True)  # noqa: T201


def main(argv: list[str]) -> int:
    """Run the workflow in one mode; see the module docstring."""
    if len(argv) != 4 or argv[2] not in ("start", "wait"):
        sys.stderr.write(__doc__ or "")
        return 2
    asyncio.run(_run(*argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
