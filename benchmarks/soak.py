"""Soak: keep 1,000 sessions in flight for minutes; memory and descriptors must stay flat.

    .venv/bin/python benchmarks/soak.py                        # 1,000 sessions, 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 2 --every 10

One runner on a FileStore (fsync durability) in a temporary folder keeps
``--sessions`` sessions of a four-step workflow running at all times: as soon as
one completes it is removed and another starts. Every ``--every`` seconds it prints
the sessions completed, the checkpoints per second, the resident memory (RSS), the
open file descriptors (session lock files, one per session a runner holds, apart
from all others) and the threads. At the end it compares the samples after the
warm-up (the first fifth of the run): RSS must not grow by more than 10% and
``--rss-slack`` MiB, lock descriptors must never outnumber the sessions, and the
other descriptors must stay within ``--fd-slack`` of each other, or it exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine import FileStore, Runner, StepContext, Workflow

workflow = Workflow("soak", version="1")
STEP_SECONDS = [1.0]  # mean seconds a step waits; set from --step-seconds


async def _pause() -> None:
    await asyncio.sleep(random.uniform(0.2, 1.8) * STEP_SECONDS[0])


@workflow.step
async def fetch(ctx: StepContext, value: int) -> dict[str, object]:
    await _pause()
    return {"value": value, "pages": ["x" * 64] * 4}


@workflow.step
def parse(ctx: StepContext, fetched: dict[str, object]) -> list[int]:
    time.sleep(random.uniform(0.0, 0.002))  # a sync step, in a worker thread
    ctx.state["parsed"] = len(fetched)
    return list(range(8))


@workflow.step
async def enrich(ctx: StepContext, numbers: list[int]) -> list[int]:
    await _pause()
    ctx.state["enriched"] = sum(numbers)
    return [number * 2 for number in numbers]


@workflow.step
async def store(ctx: StepContext, numbers: list[int]) -> int:
    await _pause()
    return sum(numbers)


@dataclass
class Sample:
    """One look at the process."""

    elapsed: float
    completed: int
    checkpoints_per_second: float
    rss_mib: float
    locks: int
    other_fds: int
    threads: int


def rss_mib() -> float:
    """The resident set size now (not the peak), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> tuple[int, int]:
    """Return the open descriptors: session lock files (one per leased session), and the rest."""
    locks = other = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # closed while we looked
            continue
        if target.endswith("/lock"):
            locks += 1
        else:
            other += 1
    return locks, other


async def keep_busy(runner: Runner, slot: int, deadline: float, done: list[int]) -> None:
    """Run sessions one after another until the deadline, removing each once it ends."""
    value = slot
    while time.monotonic() < deadline:
        session_id = await runner.start(workflow, value)
        await runner.wait(session_id)
        await runner.sessions.remove_session(session_id)
        done[0] += 1
        value += 1


def report(sample: Sample) -> None:
    print(
        f"{sample.elapsed:10.0f} {sample.completed:10,} {sample.checkpoints_per_second:10.0f} "
        f"{sample.rss_mib:10.1f} {sample.locks:10} {sample.other_fds:10} {sample.threads:10}",
        flush=True,
    )


async def soak(sessions: int, seconds: float, every: float) -> list[Sample]:
    """Run the soak; print and return the samples."""
    samples: list[Sample] = []
    done = [0]
    columns = ["elapsed", "completed", "ckpt/s", "RSS MiB", "locks", "other fds", "threads"]
    print(" ".join(f"{name:>10}" for name in columns))
    with tempfile.TemporaryDirectory(prefix="stepvault-soak-") as folder:
        async with Runner(
            FileStore(folder), [workflow], max_concurrency=sessions, cleanup_interval=60
        ) as runner:
            started = time.monotonic()
            deadline = started + seconds
            slots = [
                asyncio.create_task(keep_busy(runner, slot * 1_000_000, deadline, done))
                for slot in range(sessions)
            ]
            try:
                last_done, last_time = 0, started
                while not all(slot.done() for slot in slots):
                    await asyncio.wait(slots, timeout=every)
                    now = time.monotonic()
                    rate = (done[0] - last_done) * len(workflow.steps) / (now - last_time)
                    locks, other = open_fds()
                    sample = Sample(
                        now - started,
                        done[0],
                        rate,
                        rss_mib(),
                        locks,
                        other,
                        threading.active_count(),
                    )
                    samples.append(sample)
                    report(sample)
                    last_done, last_time = done[0], now
                for slot in slots:
                    slot.result()  # re-raise what any slot hit
            finally:
                for slot in slots:
                    slot.cancel()
                await asyncio.gather(*slots, return_exceptions=True)
    return samples


def verdict(samples: list[Sample], sessions: int, rss_slack: float, fd_slack: int) -> list[str]:
    """Compare the samples after the warm-up; return what is not flat.

    Lock descriptors come and go with the sessions a runner holds (one each, at
    most ``sessions``); every other descriptor must stay within ``fd_slack``.
    """
    steady = samples[max(1, len(samples) // 5) : -1] or samples  # the last one is the drain
    problems = []
    base_rss = min(sample.rss_mib for sample in steady)
    top_rss = steady[-1].rss_mib
    if top_rss > base_rss * 1.10 and top_rss - base_rss > rss_slack:
        problems.append(f"RSS grew from {base_rss:.1f} MiB to {top_rss:.1f} MiB")
    others = [sample.other_fds for sample in steady]
    if max(others) - min(others) > fd_slack:
        problems.append(f"descriptors other than locks ranged from {min(others)} to {max(others)}")
    if max(sample.locks for sample in samples) > sessions:
        problems.append(f"more lock descriptors than sessions in flight ({sessions})")
    return problems


def main() -> int:
    """Parse the options, run the soak, print the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="sessions kept in flight")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="mean wait per step")
    parser.add_argument("--rss-slack", type=float, default=20.0, help="MiB of RSS growth allowed")
    parser.add_argument(
        "--fd-slack", type=int, default=32, help="spread allowed in descriptors other than locks"
    )
    args = parser.parse_args()
    STEP_SECONDS[0] = args.step_seconds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a lock descriptor per session
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.sessions + 256)), hard)
    )
    samples = asyncio.run(soak(args.sessions, args.minutes * 60, args.every))
    problems = verdict(samples, args.sessions, args.rss_slack, args.fd_slack)
    completed = samples[-1].completed if samples else 0
    print(f"\n{completed:,} sessions completed in {args.minutes:g} minutes")
    if problems:
        print("NOT FLAT: " + "; ".join(problems))
        return 1
    print("flat: RSS and open descriptors held steady after the warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
