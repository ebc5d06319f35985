"""Dashboard load: the sessions page over many stored sessions, response times reported.

    python benchmarks/ui_load.py                          # 100,000 sessions, SQLite and files
    python benchmarks/ui_load.py --sessions 10000 --stores sqlite
    python benchmarks/ui_load.py --stores postgres --pg postgresql://postgres@127.0.0.1/test

Each store is seeded with sessions that look like finished workflow runs (five
steps, ``--history`` tool results each, a tag), then the app from
``engine.ui.create_app`` answers the requests in-process through httpx's ASGI
transport, so the figures are the app's and the store's time (no sockets). For
each request it prints the first (cold) and the median of ``--repeat`` timings,
plus ``store.list()`` alone: the sessions page reads one ``SessionInfo`` row per
session, then loads only the page's sessions in full. A tag filter is the
exception (tags live in the sessions' metadata) and is timed separately.

Prints a table, then one JSON object per store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from engine import FileStore, Session, Store, ToolResult
from engine.models import SessionMetadata, utcnow
from engine.stores import PostgresStore, SQLiteStore
from engine.ui import create_app

STATUSES = ["completed", "completed", "completed", "failed", "running", "waiting", "cancelled"]
STEPS = [("fetch", "str"), ("parse", "dict"), ("score", "int"), ("store", "str"), ("notify", "str")]
BATCH = 256


def _template(history: int) -> Session:
    """One realistic session; the seed copies it with a new id, status and tag."""
    now = utcnow()
    records = [
        ToolResult(
            name=STEPS[i % len(STEPS)][0],
            step=STEPS[i % len(STEPS)][0],
            attempt=1,
            output={"rows": list(range(20)), "note": "x" * 200},
            started_at=now,
            finished_at=now,
            duration=0.01,
        )
        for i in range(history)
    ]
    return Session(
        id=str(uuid.uuid4()),
        created_at=now - timedelta(minutes=5),
        last_activity=now,
        expires_at=now + timedelta(days=7),
        ttl=7 * 86400.0,
        workflow="bench-0",
        workflow_version="1",
        workflow_shape=STEPS,
        steps_done=[name for name, _ in STEPS],
        state={"score": 42, "items": list(range(50))},
        tool_history=records,
    )


async def seed(store: Store, count: int, history: int) -> float:
    """Store ``count`` sessions; return the seconds it took."""
    template = _template(history)
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        batch = []
        for i in range(first, min(first + BATCH, count)):
            moment = template.last_activity - timedelta(seconds=i)
            batch.append(
                template.model_copy(
                    update={
                        "id": str(uuid.uuid4()),
                        "status": STATUSES[i % len(STATUSES)],
                        "workflow": f"bench-{i % 5}",
                        "last_activity": moment,
                        "expires_at": moment + timedelta(hours=1 + i % 200),
                        "metadata": SessionMetadata(tags=[f"t{i % 10}"]),
                    }
                )
            )
        await asyncio.gather(*(store.create(session) for session in batch))
    return time.perf_counter() - started


async def timed(call: Callable[[], Awaitable[Any]], repeat: int) -> dict[str, float]:
    """Run ``call`` ``repeat`` times; return the first and the median, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return {"first_ms": round(times[0], 1), "median_ms": round(statistics.median(times), 1)}


async def measure(store: Store, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seed one store and time the dashboard's requests over it."""
    seconds = await seed(store, args.sessions, args.history)
    results: dict[str, Any] = {
        "store": kind,
        "sessions": args.sessions,
        "history_per_session": args.history,
        "seed_s": round(seconds, 1),
    }
    results["store.list()"] = await timed(store.list, args.repeat)
    app = create_app(store)
    requests = {
        "sessions page 1": "/",
        "sessions page 1000": "/?page=1000",
        "status=failed": "/?status=failed",
        "workflow + expiring within 1h": "/?workflow=bench-3&expiring_within=3600",
        "api, 500 rows": "/api/sessions?per_page=500",
    }
    if args.tag:
        requests["tag=t3 (loads every candidate)"] = "/?tag=t3"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", timeout=600
        ) as client:
            first = (await client.get("/api/sessions?per_page=1")).json()["sessions"][0]["id"]
            requests["one session page"] = f"/sessions/{first}"
            for label, path in requests.items():

                async def get(path: str = path) -> None:
                    response = await client.get(path)
                    response.raise_for_status()

                repeat = 1 if label.startswith("tag") else args.repeat
                results[label] = await timed(get, repeat)
    return results


def _print(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(
            f"\n{result['store']}: {result['sessions']:,} sessions, "
            f"{result['history_per_session']} tool results each (seeded in {result['seed_s']} s)"
        )
        print(f"  {'request':40} {'first ms':>10} {'median ms':>10}")
        for label, value in result.items():
            if isinstance(value, dict):
                print(f"  {label:40} {value['first_ms']:>10} {value['median_ms']:>10}")
    for result in results:
        print(json.dumps(result))


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the benchmark on each store asked for."""
    results = []
    with tempfile.TemporaryDirectory(prefix="stepvault-ui-load-") as root:
        for kind in args.stores.split(","):
            store: Store
            if kind == "sqlite":
                store = SQLiteStore(Path(root) / "sessions.db", durability="none")
            elif kind == "file":
                store = FileStore(Path(root) / "files", durability="none")
            elif kind == "postgres":
                schema = f"ui_load_{uuid.uuid4().hex[:8]}"
                store = PostgresStore(args.pg, schema=schema, durability="none")
            else:
                raise SystemExit(f"unknown store {kind!r}: use sqlite, file or postgres")
            try:
                results.append(await measure(store, kind, args))
            finally:
                await store.close()  # the app closed it already; closing twice is harmless
                if isinstance(store, PostgresStore):
                    await _drop_schema(args.pg, store.schema)
    return results


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415  # Postgres runs only

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=20, help="tool results per session")
    parser.add_argument("--stores", default="sqlite,file", help="sqlite, file, postgres")
    parser.add_argument("--repeat", type=int, default=5, help="timings per request")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--no-tag", dest="tag", action="store_false", help="skip the tag filter's timing"
    )
    _print(asyncio.run(main(parser.parse_args())))
