"""A plain asyncio worker: runs each job dropped in an inbox folder, durably, once.

    python workflows/worker.py INBOX OUTBOX [--store ./sessions]

A job is a JSON file ``INBOX/<name>.json`` holding ``{"text": "..."}``. The worker
starts one session per job, with a session id derived from the job's name (so a
job is never started twice), removes the file once the session is stored, and the
workflow's last step writes ``OUTBOX/<name>.json``. Kill the worker at any moment
(even ``kill -9``): the next one resumes every unfinished job from its last
completed step. SIGTERM and Ctrl-C stop it cleanly: the step in flight is
cancelled and resumes next time.

``STEPVAULT_WORKER_DELAY`` (seconds, default 0) slows the counting step, to watch
a job in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from engine import Runner, StepContext, StepFailedError, Workflow, open_store

wordcount = Workflow("wordcount", version="1")


@wordcount.step
def read_job(ctx: StepContext, job: dict[str, Any]) -> dict[str, Any]:
    """Validate the job; what it needs from here on is in the session."""
    if not isinstance(job.get("text"), str):
        raise ValueError(f"job {job.get('name')!r} has no text")
    return job


@wordcount.step
async def count(ctx: StepContext, job: dict[str, Any]) -> dict[str, Any]:
    """The work itself (slow on purpose when STEPVAULT_WORKER_DELAY says so)."""
    await asyncio.sleep(float(os.environ.get("STEPVAULT_WORKER_DELAY", "0")))
    words = job["text"].split()
    return {**job, "words": len(words), "longest": max(words, key=len, default="")}


@wordcount.step
def deliver(ctx: StepContext, result: dict[str, Any]) -> str:
    """Write the result atomically: a rerun after a crash writes the same file again."""
    outbox = Path(result["outbox"])
    target = outbox / f"{result['name']}.json"
    partial = outbox / f".{result['name']}.json.partial"
    summary = {"job": result["name"], "words": result["words"], "longest": result["longest"]}
    partial.write_text(json.dumps(summary))
    partial.replace(target)
    return str(target)


def job_session_id(name: str) -> str:
    """Return the session id of a job: the same for the same name, in every process."""
    digest = hashlib.sha256(f"wordcount job {name}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


async def serve(
    store_url: str, inbox: Path, outbox: Path, stop: asyncio.Event, poll: float = 0.1
) -> None:
    """Take jobs from ``inbox`` until ``stop`` is set; results go to ``outbox``."""
    await asyncio.to_thread(outbox.mkdir, parents=True, exist_ok=True)
    async with Runner(open_store(store_url), workflows=[wordcount]) as runner:
        resumed = await runner.resume_all()
        running = {job: asyncio.create_task(_report(runner, job)) for job in resumed}
        print(f"worker: resumed {len(running)} unfinished job(s)", flush=True)
        while not stop.is_set():
            for path, job in await asyncio.to_thread(_pending, inbox):
                job.update(name=path.stem, outbox=str(outbox))
                session_id = await runner.start(
                    wordcount, job, session_id=job_session_id(path.stem)
                )
                await asyncio.to_thread(path.unlink)  # the session is stored: the job is safe
                if session_id not in running:
                    running[session_id] = asyncio.create_task(_report(runner, session_id))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
        print("worker: stopping; unfinished jobs resume on the next start", flush=True)
    await asyncio.gather(*running.values(), return_exceptions=True)


def _pending(inbox: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Read the jobs waiting in the inbox, oldest name first (file I/O: run in a thread)."""
    return [(path, json.loads(path.read_text())) for path in sorted(inbox.glob("*.json"))]


async def _report(runner: Runner, session_id: str) -> None:
    try:
        print(f"worker: done {await runner.wait(session_id)}", flush=True)
    except StepFailedError as exc:
        print(f"worker: job failed: {exc}", flush=True)


async def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inbox", type=Path)
    parser.add_argument("outbox", type=Path)
    parser.add_argument("--store", default=os.environ.get("STEPVAULT_STORE", "./sessions"))
    args = parser.parse_args(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(args.store, args.inbox, args.outbox, stop)


if __name__ == "__main__":
    asyncio.run(main())
