"""One durable loop of N steps per engine, timed step by step.

Every engine runs the same workflow: N trivial steps, each returning a string of
``size`` bytes, with every step's output kept (stepvault keeps all outputs in the
session; LangGraph keeps them in a list channel; DBOS records each step's output).
Each function runs in a fresh process (see bench.py) and returns the wall time at
which each step started, so cost per step can be plotted against step number.
"""


import asyncio
import operator
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict


def folder_bytes(path: Path) -> int:
    """Return the bytes stored under ``path`` (a folder or a file and its siblings)."""
    if path.is_file():
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_baseline(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """The same loop with no engine: what the work itself costs."""
    marks: list[float] = []
    outputs: list[str] = []
    for i in range(n):
        marks.append(time.perf_counter())
        outputs.append(str(i % 10) * size)
    marks.append(time.perf_counter())
    return {"marks": marks, "bytes": 0}


def run_floor(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """The physical floor: append ``size`` bytes and fdatasync, N times."""
    path = workdir / "floor.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    marks: list[float] = []
    try:
        for i in range(n):
            marks.append(time.perf_counter())
            os.write(fd, (str(i % 10) * size).encode())
            os.fdatasync(fd)
        marks.append(time.perf_counter())
    finally:
        os.close(fd)
    return {"marks": marks, "bytes": path.stat().st_size}


def run_floor_overwrite(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """Write ``size`` bytes over zeros already on disk and fdatasync, N times.

    The floor of the file store's journal, which writes into zeros it reserved: an
    fdatasync that leaves the file's size as it was commits no metadata.
    """
    path = workdir / "floor.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    marks: list[float] = []
    try:
        os.write(fd, bytes(n * size))
        os.fsync(fd)
        for i in range(n):
            marks.append(time.perf_counter())
            os.pwrite(fd, (str(i % 10) * size).encode(), i * size)
            os.fdatasync(fd)
        marks.append(time.perf_counter())
    finally:
        os.close(fd)
    return {"marks": marks, "bytes": path.stat().st_size}


def _stepvault_workflow(n: int, size: int, marks: list[float]) -> Any:
    from engine import StepContext, Workflow  # noqa: PLC0415  # timed import stays out of peers

    workflow = Workflow("bench")

    def make(index: int) -> Callable[[StepContext, Any], Any]:
        async def step(ctx: StepContext, value: Any) -> str:
            marks.append(time.perf_counter())
            return str(index % 10) * size

        step.__name__ = f"s{index}"
        return step

    for index in range(n):
        workflow.step(name=f"s{index}")(make(index))
    return workflow


def _run_stepvault(store: Any, n: int, size: int) -> list[float]:
    from engine import Runner  # noqa: PLC0415

    marks: list[float] = []
    workflow = _stepvault_workflow(n, size, marks)

    async def main() -> None:
        async with Runner(store, [workflow], cleanup_interval=None) as runner:
            await runner.run(workflow, None)
            # The last mark when the workflow call returns (its last checkpoint durable,
            # its lease given back), as for the peers after `invoke` or the workflow
            # call: closing the runner, the store and the event loop is left out.
            marks.append(time.perf_counter())

    asyncio.run(main())
    return marks


def run_stepvault_file(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """stepvault's FileStore, durability fsync (its default)."""
    from engine import FileStore  # noqa: PLC0415

    marks = _run_stepvault(FileStore(workdir / "sessions"), n, size)
    return {"marks": marks, "bytes": folder_bytes(workdir / "sessions")}


def run_stepvault_sqlite(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """stepvault's SQLiteStore, synchronous=FULL (its durable mode)."""
    from engine.stores.sqlite import SQLiteStore  # noqa: PLC0415

    marks = _run_stepvault(SQLiteStore(workdir / "sv.db"), n, size)
    return {"marks": marks, "bytes": folder_bytes(workdir / "sv.db")}


PG_URL = os.environ.get("STEPVAULT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL server the Postgres rows use (trust auth, a scratch database)."""


def run_sqlite_floor(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """SQLite's own floor: one transaction per step (insert a row, update a row), WAL, FULL."""
    import sqlite3  # noqa: PLC0415

    path = workdir / "floor.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE heads (id INTEGER PRIMARY KEY, revision INTEGER)")
    conn.execute("CREATE TABLE steps (id INTEGER, seq INTEGER, body BLOB, PRIMARY KEY (id, seq))")
    conn.execute("INSERT INTO heads VALUES (1, 0)")
    marks: list[float] = []
    for i in range(n):
        marks.append(time.perf_counter())
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO steps VALUES (1, ?, ?)", (i, (str(i % 10) * size).encode()))
        conn.execute("UPDATE heads SET revision = ? WHERE id = 1", (i,))
        conn.execute("COMMIT")
    marks.append(time.perf_counter())
    conn.close()
    return {"marks": marks, "bytes": folder_bytes(path)}


def _pg_schema() -> str:
    return f"bench_{os.getpid()}_{time.monotonic_ns()}"


async def _pg_drop(schema: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def _pg_bytes(schema: str) -> int:
    """Return what the schema's tables take on disk, indexes and TOAST included."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(PG_URL)
    try:
        size: int = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind = 'r'",
            schema,
        )
    finally:
        await conn.close()
    return size


def run_postgres_floor(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """PostgreSQL's own floor: one single-statement commit per step (insert a row)."""
    import asyncpg  # noqa: PLC0415

    schema = _pg_schema()
    marks: list[float] = []

    async def main() -> None:
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(f"CREATE TABLE {schema}.steps (seq INT PRIMARY KEY, body BYTEA)")
            insert = await conn.prepare(f"INSERT INTO {schema}.steps VALUES ($1, $2)")  # noqa: S608  # our own schema name
            for i in range(n):
                marks.append(time.perf_counter())
                await insert.fetch(i, (str(i % 10) * size).encode())
            marks.append(time.perf_counter())
            stored.append(await _pg_bytes(schema))
        finally:
            await conn.close()
            await _pg_drop(schema)

    stored: list[int] = []
    asyncio.run(main())
    return {"marks": marks, "bytes": stored[0]}


def run_stepvault_postgres(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """stepvault's PostgresStore (fenced single-statement commits)."""
    from engine.stores.postgres import PostgresStore  # noqa: PLC0415

    schema = _pg_schema()
    try:
        marks = _run_stepvault(PostgresStore(PG_URL, schema=schema), n, size)
        stored = asyncio.run(_pg_bytes(schema))
    finally:
        asyncio.run(_pg_drop(schema))
    return {"marks": marks, "bytes": stored}


class _LoopState(TypedDict):
    i: int
    outputs: Annotated[list[str], operator.add]


def run_langgraph_sqlite(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """LangGraph with SqliteSaver and durability="sync" (its durable mode)."""
    import sqlite3  # noqa: PLC0415

    from langgraph.checkpoint.sqlite import SqliteSaver  # noqa: PLC0415
    from langgraph.graph import END, START, StateGraph  # noqa: PLC0415

    marks: list[float] = []

    def step(state: _LoopState) -> dict[str, Any]:
        marks.append(time.perf_counter())
        return {"i": state["i"] + 1, "outputs": [str(state["i"] % 10) * size]}

    graph = StateGraph(_LoopState)
    graph.add_node("step", step)
    graph.add_edge(START, "step")
    graph.add_conditional_edges("step", lambda s: "step" if s["i"] < n else END)
    db_path = workdir / "lg.db"
    conn = sqlite3.connect(db_path, check_same_thread=False)
    app = graph.compile(checkpointer=SqliteSaver(conn))
    app.invoke(
        {"i": 0, "outputs": []},
        {"configurable": {"thread_id": "bench"}, "recursion_limit": n + 10},
        durability="sync",
    )
    marks.append(time.perf_counter())
    conn.close()
    return {"marks": marks, "bytes": folder_bytes(db_path)}


def run_dbos_sqlite(n: int, size: int, workdir: Path) -> dict[str, Any]:
    """DBOS Transact with its default SQLite system database."""
    from dbos import DBOS  # noqa: PLC0415

    marks: list[float] = []
    db_path = workdir / "dbos.sqlite"
    DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{db_path}"})

    @DBOS.step()
    def step(index: int) -> str:
        marks.append(time.perf_counter())
        return str(index % 10) * size

    @DBOS.workflow()
    def loop(count: int) -> int:
        for index in range(count):
            step(index)
        return count

    DBOS.launch()
    try:
        loop(n)
        marks.append(time.perf_counter())
    finally:
        DBOS.destroy()
    return {"marks": marks, "bytes": folder_bytes(db_path)}


ENGINES: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "baseline": run_baseline,
    "floor (append+fdatasync)": run_floor,
    "floor (overwrite+fdatasync)": run_floor_overwrite,
    "stepvault file": run_stepvault_file,
    "stepvault sqlite": run_stepvault_sqlite,
    "floor sqlite (one commit)": run_sqlite_floor,
    "stepvault postgres": run_stepvault_postgres,
    "floor postgres (one commit)": run_postgres_floor,
    "langgraph sqlite sync": run_langgraph_sqlite,
    "dbos sqlite": run_dbos_sqlite,
}


def run_in_temp(engine: str, n: int, size: int) -> dict[str, Any]:
    """Run one engine once in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="stepvault-bench-") as folder:
        return ENGINES[engine](n, size, Path(folder))
