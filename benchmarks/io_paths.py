"""How the journal's append + fdatasync should reach the disk from the event loop.

python benchmarks/io_paths.py [N]   # prints a table: median microseconds per append

The same 850-byte record (a checkpoint's size) appended and synced N times, by:

- ``inline``: ``os.pwrite`` + ``os.fdatasync`` on the event loop's thread (what
  ``FileStore`` does while it runs one session);
- ``to_thread``: the same two calls in one ``asyncio.to_thread`` hop (what it does
  with several sessions, so their syncs overlap);
- ``aiofiles``: ``aiofiles``' file object (a thread hop for the write, one for the
  flush) and a third hop for the fdatasync.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

RECORD = b"x" * 850


async def inline(path: Path, n: int) -> list[float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    costs, end = [], 0
    try:
        for _ in range(n):
            start = time.perf_counter()
            os.pwrite(fd, RECORD, end)
            os.fdatasync(fd)
            end += len(RECORD)
            costs.append(time.perf_counter() - start)
            await asyncio.sleep(0)
    finally:
        os.close(fd)
    return costs


async def to_thread(path: Path, n: int) -> list[float]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)

    def append(end: int) -> None:
        os.pwrite(fd, RECORD, end)
        os.fdatasync(fd)

    costs = []
    try:
        for index in range(n):
            start = time.perf_counter()
            await asyncio.to_thread(append, index * len(RECORD))
            costs.append(time.perf_counter() - start)
    finally:
        os.close(fd)
    return costs


async def with_aiofiles(path: Path, n: int) -> list[float]:
    import aiofiles  # noqa: PLC0415  # the bench extra only

    costs = []
    async with aiofiles.open(path, "ab") as handle:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            start = time.perf_counter()
            await handle.write(RECORD)
            await handle.flush()
            await loop.run_in_executor(None, os.fdatasync, handle.fileno())
            costs.append(time.perf_counter() - start)
    return costs


WAYS: dict[str, Callable[[Path, int], Awaitable[list[float]]]] = {
    "inline": inline,
    "to_thread": to_thread,
    "aiofiles": with_aiofiles,
}


def main(n: int) -> None:
    """Print the median cost of each way, three rounds each, interleaved."""
    results: dict[str, list[float]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory(prefix="stepvault-io-") as folder:
        for round_ in range(3):
            for name, way in WAYS.items():
                path = Path(folder) / f"{name}-{round_}"
                results[name].append(statistics.median(asyncio.run(way(path, n))))
    print("| way | median µs per append + fdatasync (3 rounds) |")
    print("|---|---:|")
    for name, medians in results.items():
        shown = ", ".join(f"{m * 1e6:.0f}" for m in medians)
        print(f"| {name} | {statistics.median(medians) * 1e6:.0f} ({shown}) |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
