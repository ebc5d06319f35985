"""Commands for running workflows safely: check a deploy, send events, fork, skip, cancel.

``stepvault check FILE[:WORKFLOW]`` tells, before a deploy, what the file's code
would do to every stored session of that workflow, and exits 1 if any is
incompatible. ``send`` delivers an event to a session; ``fork`` copies a session up
to a step into a new one; ``skip`` and ``cancel`` are the operator's answers to a
parked (or failed) session, with ``resume`` for the third one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_support import (
    DEFAULT_STORE,
    JsonOption,
    StoreOption,
    WorkflowFiles,
    check_resumable,
    dump_json,
    one_line,
    open_cli_store,
    split_target,
    workflow_for_session,
    workflows_from_files,
)
from .runner import Runner, SessionCheck
from .stores import validate_session_id
from .workflow import Workflow

SessionArgument = Annotated[str, typer.Argument(metavar="ID", help="The session's id.")]
WorkflowFileOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--workflow",
        help="A file declaring the session's workflow (repeatable); "
        "default: the session's recorded file.",
    ),
]
_STYLES = {"safe": "green", "reruns": "yellow", "incompatible": "red", "unreadable": "red"}


def register(app: typer.Typer) -> None:
    """Add ``check``, ``send``, ``fork``, ``skip`` and ``cancel`` to the command line."""
    app.command("check")(check)
    app.command("send")(send)
    app.command("fork")(fork)
    app.command("skip")(skip)
    app.command("cancel")(cancel)


def check(
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE[:WORKFLOW]",
            help="The workflow file about to be deployed and, if it declares several, "
            "the workflow's attribute or name.",
        ),
    ],
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Say what this code would do to each stored session of the workflow; exit 1 if any breaks.

    Each session is safe (nothing done runs again), reruns a step (it failed, or
    the step it was in changed), or is incompatible (resuming it would raise).
    """
    path, selector = split_target(target)
    workflow = WorkflowFiles().select(path, selector)
    checks = asyncio.run(_check(workflow, store))
    if json_output:
        typer.echo(dump_json([asdict(found) for found in checks]))
    elif checks:
        Console().print(_check_table(workflow, checks))
    else:
        _note(f"no stored session of workflow {workflow.name!r}")
    incompatible = sum(found.verdict == "incompatible" for found in checks)
    unreadable = sum(found.verdict == "unreadable" for found in checks)
    if unreadable:
        _note(f"{unreadable} session(s) could not be read: `stepvault verify` says more")
    if incompatible:
        typer.echo(
            f"error: {incompatible} of {len(checks)} session(s) of workflow "
            f"{workflow.name!r} do not fit this code",
            err=True,
        )
        raise typer.Exit(1)


def send(
    session_id: SessionArgument,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The event's name.")],
    payload: Annotated[
        str | None, typer.Option("--payload", help="The event's payload, as JSON.")
    ] = None,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Send an event to a session; a step waiting for it goes on. Early events are kept."""
    validate_session_id(session_id)
    value = _parse_json(payload, "--payload")
    asyncio.run(_send(session_id, name, value, store))
    if json_output:
        typer.echo(dump_json({"session_id": session_id, "event": name, "sent": True}))
    else:
        _note(
            f"sent event {name!r} to session {session_id}; a runner waiting on it goes on "
            f"(if none is, `stepvault resume {session_id}` runs it)"
        )


def fork(
    session_id: SessionArgument,
    from_step: Annotated[
        str, typer.Option("--from-step", help="The first step the new session runs.")
    ],
    store: StoreOption = DEFAULT_STORE,
    workflow: WorkflowFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Copy a session up to a step into a new session (not run yet); print the new id."""
    validate_session_id(session_id)
    new_id = asyncio.run(_fork(session_id, from_step, store, workflow or []))
    if json_output:
        typer.echo(
            dump_json({"session_id": new_id, "forked_from": session_id, "from_step": from_step})
        )
        return
    typer.echo(new_id)
    _note(f"forked; run it with: stepvault resume {new_id}")


def skip(
    session_id: SessionArgument,
    output: Annotated[
        str, typer.Option("--output", help="The output to record for the skipped step, as JSON.")
    ],
    store: StoreOption = DEFAULT_STORE,
    workflow: WorkflowFileOption = None,
    json_output: JsonOption = False,
) -> None:
    """Give a failed or parked session's step an output, then run the rest; print the result."""
    validate_session_id(session_id)
    value = _parse_json(output, "--output")
    result = asyncio.run(_skip(session_id, value, store, workflow or []))
    if json_output:
        typer.echo(dump_json({"session_id": session_id, "status": "completed", "output": result}))
    else:
        typer.echo(dump_json(result))


def cancel(session_id: SessionArgument, store: StoreOption = DEFAULT_STORE) -> None:
    """Cancel a session for good: no resume runs it again."""
    validate_session_id(session_id)
    asyncio.run(_cancel(session_id, store))
    _note(f"session {session_id} cancelled")


# -- inside the event loop ------------------------------------------------------------


def _runner(store_url: str) -> Runner:
    # No background sweep: removing expired sessions is `stepvault cleanup`'s job.
    return Runner(open_cli_store(store_url), cleanup_interval=None)


async def _check(workflow: Workflow, store_url: str) -> list[SessionCheck]:
    async with _runner(store_url) as runner:
        return await runner.check(workflow)


async def _send(session_id: str, name: str, payload: Any, store_url: str) -> None:
    async with _runner(store_url) as runner:
        await runner.send_event(session_id, name, payload)


async def _cancel(session_id: str, store_url: str) -> None:
    async with _runner(store_url) as runner:
        await runner.cancel(session_id)


async def _with_workflow(runner: Runner, session_id: str, given_files: list[Path]) -> None:
    """Register the session's workflow: from ``--workflow`` files, else its recorded file."""
    files = WorkflowFiles()
    given = workflows_from_files(files, given_files) if given_files else None
    session = check_resumable(await runner.store.load(session_id), session_id)
    runner.register(workflow_for_session(files, session, given))


async def _fork(session_id: str, from_step: str, store_url: str, files: list[Path]) -> str:
    async with _runner(store_url) as runner:
        await _with_workflow(runner, session_id, files)
        return await runner.fork(session_id, from_step=from_step)


async def _skip(session_id: str, output: Any, store_url: str, files: list[Path]) -> Any:
    async with _runner(store_url) as runner:
        await _with_workflow(runner, session_id, files)
        return await runner.skip(session_id, output)


# -- printing -------------------------------------------------------------------------


def _check_table(workflow: Workflow, checks: list[SessionCheck]) -> Table:
    table = Table(title=f"sessions of {workflow.name} under version {workflow.version}")
    table.add_column("session", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("what happens", overflow="fold")
    for found in checks:
        verdict = "will re-run" if found.verdict == "reruns" else found.verdict
        table.add_row(
            found.session_id,
            found.status or "?",
            Text(verdict, style=_STYLES[found.verdict]),
            found.step or "",
            Text(found.detail),
        )
    return table


def _note(message: str) -> None:
    typer.echo(one_line(message), err=True)


def _parse_json(text: str | None, option: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc}); a string needs quotes, e.g. {option} '\"text\"'",
            param_hint=f"'{option}'",
        ) from None
