"""Commands for looking after stored sessions: list, show, remove, clean up, measure.

``stepvault sessions ls`` lists sessions (filters: status, workflow, tag, expiring
within), ``sessions show ID`` prints one with its tool history, ``sessions rm ID``
removes one, ``cleanup`` removes expired sessions (``--dry-run`` only lists them)
and ``stats`` prints the spec's analytics. Every command takes ``--store``; those
that print a table take ``--json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar, get_args

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_support import DEFAULT_STORE, JsonOption, StoreOption, dump_json, open_cli_store
from .errors import EngineError, SessionBusyError, SessionNotFoundError
from .humanize import ago, short
from .models import Session, SessionInfo, SessionStatus, ToolResult, utcnow
from .sessions import SessionManager
from .stores import FileStore, Store, validate_session_id

_T = TypeVar("_T")
_STATUSES: tuple[str, ...] = get_args(SessionStatus)
_STATUS_STYLES = {
    "completed": "green",
    "running": "cyan",
    "waiting": "yellow",
    "pending": "",
    "failed": "red",
    "cancelled": "magenta",
    "unreadable": "red",
}
_STATE_PREVIEW = 4000
"""Characters of a session's state ``show`` prints before pointing at ``--json``."""

_PANEL = "Sessions"

SessionArgument = Annotated[str, typer.Argument(metavar="ID", help="The session's id.")]


def register(app: typer.Typer) -> None:
    """Add ``sessions ls|show|rm``, ``cleanup`` and ``stats`` to the command line."""
    sessions = typer.Typer(
        name="sessions", help="List, inspect and remove stored sessions.", no_args_is_help=True
    )
    sessions.command("ls")(ls)
    sessions.command("show")(show)
    sessions.command("rm")(rm)
    app.add_typer(sessions, rich_help_panel=_PANEL)
    app.command("cleanup", rich_help_panel=_PANEL)(cleanup)
    app.command("stats", rich_help_panel=_PANEL)(stats)


# -- sessions ls ------------------------------------------------------------------------


def ls(
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help=f"Only sessions with this status (repeatable): {', '.join(_STATUSES)}.",
        ),
    ] = None,
    workflow: Annotated[
        str | None,
        typer.Option("--workflow", metavar="NAME", help="Only sessions of this workflow."),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag", metavar="TAG", help="Only sessions tagged so (repeatable: all must match)."
        ),
    ] = None,
    expiring_within: Annotated[
        float | None,
        typer.Option(
            "--expiring-within",
            metavar="SECONDS",
            min=0,
            help="Only unexpired sessions that expire within this many seconds.",
        ),
    ] = None,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """List sessions, most recently active first; expired ones not yet cleaned up too."""
    unknown = sorted(set(status or ()) - set(_STATUSES))
    if unknown:
        raise typer.BadParameter(
            f"unknown status {', '.join(unknown)}; use {', '.join(_STATUSES)}",
            param_hint="'--status'",
        )
    rows = _run(_listing(store))
    now = utcnow()
    horizon = None if expiring_within is None else now + timedelta(seconds=expiring_within)
    wanted_tags = set(tag or ())
    shown = [
        (info, session)
        for info, session in rows
        if (not status or info.status in status)
        and (workflow is None or info.workflow == workflow)
        and wanted_tags <= set(session.metadata.tags if session else ())
        and (horizon is None or (info.expires_at is not None and now < info.expires_at <= horizon))
    ]
    if json_output:
        typer.echo(dump_json([_row_json(info, session, now) for info, session in shown]))
        return
    console = Console()
    if not shown:
        console.print("no sessions" + (" match" if len(rows) else " stored"))
        return
    with_tags = any(session and session.metadata.tags for _, session in shown)
    table = Table(
        title=f"{len(shown)} of {len(rows)} sessions",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
    )
    for column in ("id", "workflow", "status", "steps", "active", "expires"):
        table.add_column(column, no_wrap=column in ("id", "workflow", "status", "steps"))
    if with_tags:
        table.add_column("tags")
    for info, session in shown:
        label = "unreadable" if info.problem else info.status or "?"
        cells: list[str | Text] = [
            info.id,
            info.workflow or "",
            Text(label, style=_STATUS_STYLES.get(label, "")),
            str(info.steps_done),
            ago(info.last_activity, now),
            _expiry(info.expires_at, now) if not info.problem else Text(info.problem, "red"),
        ]
        if with_tags:
            cells.append(", ".join(session.metadata.tags) if session else "")
        table.add_row(*cells)
    console.print(table)


async def _listing(url: str) -> list[tuple[SessionInfo, Session | None]]:
    store = _open(url)
    try:
        rows: list[tuple[SessionInfo, Session | None]] = []
        for listed in await store.list():
            info, session = listed, None
            if listed.problem is None:
                try:
                    session = await store.load(listed.id)
                except EngineError as exc:  # damaged since it was listed: say so
                    info = listed.model_copy(update={"problem": str(exc)})
            rows.append((info, session))
    finally:
        await store.close()
    never = datetime.min.replace(tzinfo=utcnow().tzinfo)
    rows.sort(key=lambda row: (row[0].problem is None, row[0].last_activity or never), reverse=True)
    return rows


def _row_json(info: SessionInfo, session: Session | None, now: datetime) -> dict[str, Any]:
    row: dict[str, Any] = info.model_dump(mode="json")
    row["expired"] = info.is_expired(now)
    row["tags"] = session.metadata.tags if session else []
    if row.get("problem") is None:
        row.pop("problem", None)
    return row


# -- sessions show ----------------------------------------------------------------------


def show(
    session_id: SessionArgument,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Print a session: metadata, context, state, and its tool history with durations."""
    validate_session_id(session_id)
    session = _run(_load(store, session_id))
    if json_output:
        typer.echo(dump_json(session.model_dump(mode="json")))
        return
    now = utcnow()
    console = Console()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    workflow = session.workflow or "-"
    if session.workflow_version:
        workflow += f" (version {session.workflow_version})"
    summary.add_row("session", session.id)
    summary.add_row("workflow", workflow)
    summary.add_row("status", Text(session.status, style=_STATUS_STYLES.get(session.status, "")))
    summary.add_row("steps done", ", ".join(session.steps_done) or "none")
    summary.add_row("created", f"{session.created_at:%Y-%m-%d %H:%M:%S} UTC")
    summary.add_row("last activity", ago(session.last_activity, now))
    summary.add_row("expires", _expiry(session.expires_at, now))
    summary.add_row("ttl", f"{_duration(session.ttl)} ({session.ttl_policy})")
    if session.error:
        summary.add_row("error", Text(session.error, style="red"))
    console.print(summary)
    for title, value in (
        ("metadata", session.metadata.model_dump(mode="json")),
        ("context", session.context.model_dump(mode="json")),
        ("state", session.state),
    ):
        text = dump_json(value)
        if len(text) > _STATE_PREVIEW:
            cut = len(text) - _STATE_PREVIEW
            text = text[:_STATE_PREVIEW] + f"\n... {cut} more characters: use --json"
        console.rule(title, align="left")
        console.print(Text(text))
    console.rule(f"tool history ({len(session.tool_history)})", align="left")
    if session.tool_history:
        console.print(_history_table(session.tool_history))


def _history_table(history: list[ToolResult]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("#", "name", "attempt", "started", "duration", "result"):
        table.add_column(
            column, justify="right" if column in ("#", "attempt", "duration") else "left"
        )
    for number, result in enumerate(history, start=1):
        table.add_row(
            str(number),
            result.name,
            str(result.attempt),
            f"{result.started_at:%H:%M:%S.%f}"[:-3],
            _duration(result.duration),
            Text("ok", "green") if result.ok else Text(result.error or "error", "red"),
        )
    return table


async def _load(url: str, session_id: str) -> Session:
    store = _open(url)
    try:
        session = await store.load(session_id)
    finally:
        await store.close()
    if session is None:
        raise SessionNotFoundError(f"session {session_id} not found in {url}")
    return session


# -- sessions rm ------------------------------------------------------------------------


def rm(
    session_id: SessionArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Remove it even while a runner is running it.")
    ] = False,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Remove a session and everything stored for it."""
    validate_session_id(session_id)
    _run(_remove(store, session_id, force=force))
    if json_output:
        typer.echo(dump_json({"removed": session_id}))
    else:
        typer.echo(f"removed session {session_id}")


async def _remove(url: str, session_id: str, *, force: bool) -> None:
    store = _open(url)
    try:
        lease = await store.acquire(session_id, "stepvault sessions rm")
        if lease is None and not force:
            raise SessionBusyError(
                f"session {session_id} is being run right now; stop it first, or use --force"
            )
        try:
            if not await store.delete(session_id):
                raise SessionNotFoundError(f"session {session_id} not found in {url}")
        finally:
            if lease is not None:
                await store.release(lease)
    finally:
        await store.close()


# -- cleanup and stats ------------------------------------------------------------------


def cleanup(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the expired sessions; remove nothing.")
    ] = False,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Remove every expired session; corrupt or undecryptable ones are kept and reported."""
    if dry_run:
        now = utcnow()
        rows = _run(_listing(store))
        expired = [info for info, _ in rows if info.is_expired(now)]
        if json_output:
            typer.echo(dump_json({"dry_run": True, "expired": [i.id for i in expired]}))
            return
        for info in expired:
            typer.echo(f"{info.id}  {info.workflow or '-'}  {_expiry(info.expires_at, now)}")
        typer.echo(f"{len(expired)} expired session(s) would be removed")
        return
    result = _run(_cleanup(store))
    if json_output:
        typer.echo(dump_json(result.model_dump(mode="json")))
        return
    typer.echo(f"removed {result.cleaned_sessions} expired session(s) in {result.duration:.3f}s")
    for session_id, problem in result.skipped.items():
        typer.echo(f"kept unreadable session {session_id}: {problem}", err=True)


async def _cleanup(url: str) -> Any:
    async with SessionManager(_open(url), cleanup_interval=None) as manager:
        return await manager.perform_cleanup()


def stats(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """Print the analytics: sessions, active ones, average duration, statuses, tool usage."""
    metrics = _run(_metrics(store))
    if json_output:
        typer.echo(dump_json(metrics.model_dump(mode="json")))
        return
    console = Console()
    totals = Table.grid(padding=(0, 2))
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    totals.add_row("sessions", str(metrics.total_sessions))
    totals.add_row("active (unexpired)", str(metrics.active_sessions))
    totals.add_row("average duration", _duration(metrics.average_session_duration))
    if metrics.unreadable_sessions:
        totals.add_row("unreadable", Text(str(metrics.unreadable_sessions), "red"))
    console.print(totals)
    for title, counts in (("status", metrics.status_counts), ("tool", metrics.tool_usage_stats)):
        if counts:
            table = Table(box=box.SIMPLE_HEAD)
            table.add_column(title)
            table.add_column("count" if title == "status" else "calls", justify="right")
            for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
                table.add_row(name, str(count))
            console.print(table)


async def _metrics(url: str) -> Any:
    async with SessionManager(_open(url), cleanup_interval=None) as manager:
        return await manager.collect_metrics()


# -- helpers ----------------------------------------------------------------------------


def _open(url: str) -> Store:
    """Open the store; a folder that does not exist is an error, not a new empty store."""
    store = open_cli_store(url)
    if isinstance(store, FileStore) and not store.path.is_dir():
        raise EngineError(
            f"no sessions at {store.path}: the folder does not exist "
            "(give the store with --store or STEPVAULT_STORE)"
        )
    return store


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return " ".join(f"{value}{unit}" for value, unit in parts if value)


def _expiry(expires_at: datetime | None, now: datetime) -> Text:
    if expires_at is None:
        return Text("?")
    seconds = (expires_at - now).total_seconds()
    if seconds <= 0:
        return Text(f"expired {short(-seconds)} ago", style="red")
    return Text(short(seconds))
