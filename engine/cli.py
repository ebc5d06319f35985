"""The ``stepvault`` command: run workflow files and resume their sessions.

Errors print one line (``error: ...``) on stderr and exit non-zero: 1 for what
the engine reports, 2 for bad usage, 130 when interrupted. Progress and notes go
to stderr; results go to stdout, so ``stepvault run flow.py > out.json`` works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from . import cli_security, cli_sessions, cli_stores, cli_ui, cli_workflows
from .cli_support import (
    DEFAULT_STORE,
    JsonOption,
    Outcome,
    StepProgress,
    StoreOption,
    WorkflowFiles,
    check_resumable,
    dump_json,
    one_line,
    open_cli_store,
    split_target,
    summary_table,
    workflow_for_session,
    workflows_from_files,
)
from .errors import EngineError, SessionBusyError, StepFailedError
from .log import configure_logging
from .models import UNFINISHED, Session, utcnow
from .runner import Runner
from .stores import Store, validate_session_id
from .workflow import Workflow

MAX_TTL = 100 * 365 * 24 * 3600.0
"""Longer TTLs overflow a datetime; nobody means them."""

_T = TypeVar("_T")


class _OneLineErrors(TyperGroup):
    """Report usage and engine errors as one line on stderr, never as a traceback."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(
                args=argv or ["--help"],
                prog_name=prog_name or "stepvault",
                complete_var=complete_var,
                standalone_mode=False,  # we print the errors, one line each
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except typer.TyperException as exc:  # bad usage: unknown option, missing argument...
            context = getattr(exc, "ctx", None)
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            _fail(exc.format_message() + where, exc.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        except EngineError as exc:
            _fail(str(exc), 1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


app = typer.Typer(
    name="stepvault",
    cls=_OneLineErrors,
    help="Run durable workflows and resume them after a crash or a Ctrl-C.",
    epilog="Engine log level: STEPVAULT_LOG_LEVEL (default ERROR).",
    add_completion=True,
    pretty_exceptions_enable=False,
)

WorkflowFilesOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--workflow",
        help="A file declaring the workflows to resume (repeatable); "
        "default: each session's recorded file.",
    ),
]


def _check_ttl(value: float | None) -> float | None:
    if value is not None and not (value > 0 and math.isfinite(value) and value <= MAX_TTL):
        raise typer.BadParameter("must be a number of seconds above 0 and below 100 years")
    return value


@app.command()
def run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="FILE[:WORKFLOW]",
            help="A Python file and, if it declares several, the workflow's attribute or name.",
        ),
    ],
    input: Annotated[
        str | None, typer.Option("--input", help="The workflow's input, as JSON.")
    ] = None,
    store: StoreOption = DEFAULT_STORE,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl", help="Seconds the session lives without activity.", callback=_check_ttl
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Run a workflow in a new session, with a progress bar; print its output as JSON."""
    value = _parse_input(input)
    path, selector = split_target(target)
    workflow = WorkflowFiles().select(path, selector)
    view = _view(json_output)
    outcome = _run_to_end(view, store, _run(workflow, value, store_url=store, ttl=ttl, view=view))
    _report(outcome, store, as_json=json_output)


@app.command()
def resume(
    session_id: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="The session to resume.")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Resume every unexpired, unfinished session.")
    ] = False,
    store: StoreOption = DEFAULT_STORE,
    workflow: WorkflowFilesOption = None,
    from_step: Annotated[
        str | None,
        typer.Option(
            "--from-step",
            help="Run the session again from this step, in place (its history is kept).",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Continue sessions from their last completed step; completed steps never run again."""
    if session_id is not None and every:
        raise typer.BadParameter("give a session ID or --all, not both", param_hint="ID")
    if session_id is None and not every:
        raise typer.BadParameter("give a session ID, or --all for every one", param_hint="ID")
    if from_step is not None and every:
        raise typer.BadParameter("--from-step needs one session ID", param_hint="'--from-step'")
    view = _view(json_output)
    files = workflow or []
    if session_id is not None:
        validate_session_id(session_id)
        coro = _resume_one(
            session_id, store_url=store, given_files=files, view=view, from_step=from_step
        )
        _report(_run_to_end(view, store, coro), store, as_json=json_output)
        return
    outcomes = _run_to_end(view, store, _resume_all(store_url=store, given_files=files, view=view))
    _report_many(outcomes, as_json=json_output)


# -- what the commands do, inside the event loop -----------------------------------


async def _run(
    workflow: Workflow, value: Any, *, store_url: str, ttl: float | None, view: StepProgress
) -> Outcome:
    async with _runner(store_url, view) as runner:
        session_id = await runner.start(workflow, value, ttl=ttl)
        view.watch(session_id, workflow.name, len(workflow.steps), 0)
        view.note(f"session {session_id} started (workflow {workflow.name} v{workflow.version})")
        return await _finish(runner, session_id, workflow.name)


async def _resume_one(
    session_id: str,
    *,
    store_url: str,
    given_files: list[Path],
    view: StepProgress,
    from_step: str | None = None,
) -> Outcome:
    files = WorkflowFiles()
    given = workflows_from_files(files, given_files) if given_files else None
    async with _runner(store_url, view) as runner:
        session = check_resumable(await runner.store.load(session_id), session_id)
        workflow = workflow_for_session(files, session, given)
        runner.register(workflow)
        if from_step is not None:
            view.watch(session.id, workflow.name, len(workflow.steps), workflow.index(from_step))
            view.note(f"session {session.id}: running again from step {from_step}")
            try:
                output = await runner.restart(session.id, from_step=from_step)
            except StepFailedError as exc:
                return Outcome(session.id, workflow.name, "failed", error=str(exc))
            return Outcome(session.id, workflow.name, "completed", output)
        view.watch(session.id, workflow.name, len(workflow.steps), session.cursor)
        view.note(f"session {session.id} {session.status} (workflow {workflow.name})")
        return await _finish(runner, session.id, workflow.name, retry_failed=True)


async def _resume_all(
    *, store_url: str, given_files: list[Path], view: StepProgress
) -> list[Outcome]:
    files = WorkflowFiles()
    given = workflows_from_files(files, given_files) if given_files else None
    async with _runner(store_url, view) as runner:
        sessions = {session.id: session for session in await _unfinished(runner.store)}
        chosen: dict[str, Workflow] = {}
        for session in sessions.values():
            if given is None or session.workflow in given:
                chosen[session.id] = workflow_for_session(files, session, given)
                runner.register(chosen[session.id])
        others = sorted({s.workflow or "?" for s in sessions.values() if s.id not in chosen})
        if others:
            _warn(f"left alone: sessions of workflows no --workflow file declares: {others}")
        ids = await runner.resume_all()
        if ids:
            view.note(f"resuming {len(ids)} session(s)")
        for session_id in ids:
            if session_id in chosen:
                workflow = chosen[session_id]
                done = sessions[session_id].cursor
                view.watch(session_id, workflow.name, len(workflow.steps), done)
        names = {i: chosen[i].name if i in chosen else None for i in ids}
        return list(await asyncio.gather(*(_settle(runner, i, names[i]) for i in ids)))


async def _unfinished(store: Store) -> list[Session]:
    """Load every unexpired, unfinished, readable session; warn about unreadable ones."""
    now = utcnow()
    found = []
    for row in await store.list():
        if row.problem is not None:
            _warn(f"session {row.id} is unreadable and left alone: {row.problem}")
        elif row.status in UNFINISHED and not row.is_expired(now) and row.workflow:
            try:
                session = await store.load(row.id)
            except EngineError as exc:
                _warn(f"session {row.id} is unreadable and left alone: {exc}")
                continue
            if session is not None:
                found.append(session)
    return found


async def _finish(
    runner: Runner, session_id: str, workflow: str | None, *, retry_failed: bool = False
) -> Outcome:
    """Wait for one session (retrying a failed one if asked); a failed step is an outcome."""
    try:
        if retry_failed:
            output = await runner.resume(session_id)
        else:
            output = await runner.wait(session_id)
    except StepFailedError as exc:
        return Outcome(session_id, workflow, "failed", error=str(exc))
    return Outcome(session_id, workflow, "completed", output)


async def _settle(runner: Runner, session_id: str, workflow: str | None) -> Outcome:
    """Wait for one of many sessions; any engine error is that session's outcome."""
    try:
        return await _finish(runner, session_id, workflow)
    except SessionBusyError as exc:
        return Outcome(session_id, workflow, "busy", error=str(exc))
    except EngineError as exc:
        return Outcome(session_id, workflow, "error", error=str(exc))


def _runner(store_url: str, view: StepProgress) -> Runner:
    # No background sweep: removing expired sessions is `stepvault cleanup`'s job.
    return Runner(open_cli_store(store_url), cleanup_interval=None, hooks=[view])


# -- around the event loop ------------------------------------------------------------


def _view(as_json: bool) -> StepProgress:
    return StepProgress(None if as_json else Console(stderr=True))


def _run_to_end(view: StepProgress, store: str, coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro``; on Ctrl-C say where each session stopped and exit 130.

    ``asyncio.run`` turns the first Ctrl-C into a cancellation: leaving
    ``async with Runner`` cancels the step in flight and keeps its session resumable.
    """
    with view:
        try:
            return asyncio.run(coro)
        except KeyboardInterrupt:
            pass
    stopped = view.unfinished()
    if not stopped:
        _warn(f"interrupted; resume with: {_resume_hint(store, None)}")
    stored = _stored_progress(store, [session_id for session_id, _, _ in stopped])
    for session_id, seen, total in stopped:
        done = stored.get(session_id, seen)
        where = f"after step {done} of {total}" if done else f"before step 1 of {total}"
        _warn(
            f"interrupted: session {session_id} stopped {where}; "
            f"resume with: {_resume_hint(store, session_id)}"
        )
    raise typer.Exit(130)


def _stored_progress(store_url: str, session_ids: list[str]) -> dict[str, int]:
    """Read how many steps each session has committed: the store, not the progress
    bar, knows (a checkpoint can land just before the interrupt reaches its hook)."""

    async def read() -> dict[str, int]:
        store = open_cli_store(store_url)
        try:
            found = {}
            for session_id in session_ids:
                session = await store.load(session_id)
                if session is not None:
                    found[session_id] = session.cursor
            return found
        finally:
            await store.close()

    try:
        return asyncio.run(read())
    except (EngineError, KeyboardInterrupt):
        return {}  # the progress bar's count is the best we have


def _resume_hint(store: str, session_id: str | None) -> str:
    command = ["stepvault", "resume", session_id or "--all"]
    if store != DEFAULT_STORE:
        command += ["--store", store]
    return shlex.join(command)


def _report(outcome: Outcome, store: str, *, as_json: bool) -> None:
    if as_json:
        typer.echo(dump_json(outcome.as_json()))
    elif outcome.ok:
        typer.echo(dump_json(outcome.output))
    if not outcome.ok:
        hint = _resume_hint(store, outcome.session_id)
        _fail(f"{outcome.error}; resume with: {hint}", 1)


def _report_many(outcomes: list[Outcome], *, as_json: bool) -> None:
    if as_json:
        typer.echo(dump_json([outcome.as_json(with_workflow=True) for outcome in outcomes]))
    elif not outcomes:
        _warn("nothing to resume")
    else:
        Console().print(summary_table(outcomes))
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        _fail(f"{len(failed)} of {len(outcomes)} session(s) did not complete", 1)


def _warn(message: str) -> None:
    typer.echo(one_line(message), err=True)


def _parse_input(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(
            f"not valid JSON ({exc}); a string needs quotes, e.g. --input '\"text\"'",
            param_hint="'--input'",
        ) from None


def _configure_logs() -> None:
    level = os.environ.get("STEPVAULT_LOG_LEVEL", "ERROR").upper()
    known = logging.getLevelNamesMapping()
    configure_logging(level=level if level in known else "ERROR")


# Each topic module adds its commands to the app; a new topic adds one line here.
_COMMAND_GROUPS: list[Callable[[typer.Typer], None]] = [
    cli_sessions.register,
    cli_security.register,
    cli_workflows.register,
    cli_stores.register,
    cli_ui.register,
]
for _register in _COMMAND_GROUPS:
    _register(app)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the ``stepvault`` command: the console script's entry point."""
    _configure_logs()
    # `kill` and `docker stop` send SIGTERM: stop as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    app(prog_name="stepvault")


if __name__ == "__main__":
    main()
