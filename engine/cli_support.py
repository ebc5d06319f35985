"""Helpers for the command line: shared options, opening the store, loading
workflow files and showing step progress.

Only the command-line modules import this one; like them it may use typer and
rich, and the engine proper never imports any of them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .crypto import KeyRing
from .errors import EngineError, SessionExpiredError, SessionNotFoundError
from .models import Session
from .runner import StepEvent
from .stores import STORE_URLS, Store, open_store
from .values import to_standard_json
from .workflow import Workflow

DEFAULT_STORE = "./sessions"

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="STEPVAULT_STORE",
        metavar="URL",
        help=f"Where sessions live: {STORE_URLS}.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON result on stdout and no progress.")
]


def open_cli_store(url: str) -> Store:
    """Open the store a command names, with the keys the environment gives.

    ``SESSION_ENCRYPTION_KEY`` is the active key and ``SESSION_ENCRYPTION_OLD_KEYS``
    the keys that only read (``crypto.KeyRing.from_env``), for every kind of store.
    """
    return open_store(url, encryption_key=KeyRing.from_env())


class WorkflowFileError(EngineError):
    """Raised when a workflow file is missing, fails to import, or lacks the workflow asked for."""


# -- workflow files ---------------------------------------------------------------


def split_target(target: str) -> tuple[Path, str | None]:
    """Split ``FILE[:WORKFLOW]`` into the file and the optional workflow selector."""
    if Path(target).is_file():  # a file whose name holds a colon
        return Path(target), None
    head, colon, tail = target.rpartition(":")
    if colon and head and tail and "/" not in tail and "\\" not in tail:
        return Path(head), tail
    return Path(target), None


class WorkflowFiles:
    """Import workflow files by path, each at most once per command."""

    def __init__(self) -> None:
        self._modules: dict[Path, ModuleType] = {}

    def load(self, path: Path) -> dict[str, Workflow]:
        """Return the workflows ``path`` declares, keyed by the attribute holding each.

        Raises:
            WorkflowFileError: the file is missing or raises while it is imported.
        """
        module = self._import(path)
        found: dict[str, Workflow] = {}
        for attribute, value in vars(module).items():
            if isinstance(value, Workflow) and all(value is not w for w in found.values()):
                found[attribute] = value
        return found

    def select(self, path: Path, selector: str | None) -> Workflow:
        """Pick one workflow of ``path`` by attribute or ``name``; alone, it needs none.

        Raises:
            WorkflowFileError: no workflow matches, or several do and none was named.
        """
        found = self.load(path)
        if selector is not None:
            for attribute, workflow in found.items():
                if selector in (attribute, workflow.name):
                    return workflow
            raise WorkflowFileError(
                f"{path} declares no workflow {selector!r}; it declares {_describe(found)}"
            )
        if len(found) == 1:
            return next(iter(found.values()))
        raise WorkflowFileError(
            f"{path} declares {_describe(found)}; "
            + ("name one as FILE:WORKFLOW" if found else "declare one with Workflow(...)")
        )

    def _import(self, path: Path) -> ModuleType:
        resolved = path.expanduser().resolve()
        cached = self._modules.get(resolved)
        if cached is not None:
            return cached
        if not resolved.exists():
            raise WorkflowFileError(f"workflow file {str(path)!r} not found")
        if not resolved.is_file():
            raise WorkflowFileError(f"workflow file {str(path)!r} is not a file")
        # A fresh name per import: two files called flows.py never collide, and the
        # module is in sys.modules while it runs (dataclasses and pydantic need that,
        # and Workflow.source reads the file path back from it).
        stem = re.sub(r"\W", "_", resolved.stem)
        name = f"stepvault_workflow_{stem}_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(name, resolved)
        if spec is None or spec.loader is None:
            raise WorkflowFileError(f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        folder = str(resolved.parent)
        if folder not in sys.path:
            sys.path.append(folder)  # so the file can import its neighbours
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise WorkflowFileError(
                f"importing {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
        self._modules[resolved] = module
        return module


def _describe(found: dict[str, Workflow]) -> str:
    if not found:
        return "no workflow"
    names = ", ".join(f"{attr} (name {wf.name!r})" for attr, wf in found.items())
    return f"{len(found)} workflows: {names}" if len(found) > 1 else f"one workflow: {names}"


def workflows_from_files(files: WorkflowFiles, paths: Iterable[Path]) -> dict[str, Workflow]:
    """Return every workflow the given files declare, keyed by workflow name.

    Raises:
        WorkflowFileError: two different workflows share a name.
    """
    by_name: dict[str, Workflow] = {}
    for path in paths:
        for workflow in files.load(path).values():
            known = by_name.setdefault(workflow.name, workflow)
            if known is not workflow:
                raise WorkflowFileError(
                    f"two workflows are named {workflow.name!r} ({known.source} and {path})"
                )
    return by_name


def workflow_for_session(
    files: WorkflowFiles, session: Session, given: dict[str, Workflow] | None
) -> Workflow:
    """Find the code of ``session``'s workflow: among ``given``, else in its stored source.

    Raises:
        WorkflowFileError: the workflow cannot be found.
    """
    name = session.workflow or ""
    if given is not None:
        if name not in given:
            raise WorkflowFileError(
                f"session {session.id} runs workflow {name!r}, which no --workflow file declares"
            )
        return given[name]
    source = session.workflow_source
    if source is None:
        raise WorkflowFileError(
            f"session {session.id} recorded no workflow file; pass --workflow FILE"
        )
    if not Path(source).is_file():
        raise WorkflowFileError(
            f"session {session.id}: its workflow file {source!r} is missing; pass --workflow FILE"
        )
    for workflow in files.load(Path(source)).values():
        if workflow.name == name:
            return workflow
    raise WorkflowFileError(f"session {session.id}: {source} no longer declares workflow {name!r}")


def check_resumable(session: Session | None, session_id: str) -> Session:
    """Return the session if it exists and has not expired.

    Raises:
        SessionNotFoundError, SessionExpiredError.
    """
    if session is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    if session.is_expired():
        raise SessionExpiredError(f"session {session_id} expired at {session.expires_at}")
    return session


# -- values -----------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """Turn a step output (pydantic models included) into standard JSON data."""
    return to_standard_json(value)


def dump_json(value: Any, *, indent: int | None = 2) -> str:
    """Render a value as JSON text for stdout."""
    return json.dumps(to_plain(value), indent=indent, ensure_ascii=False)


def one_line(message: object) -> str:
    """Collapse a message onto one line: the CLI prints one line per error."""
    return " ".join(str(message).split())


# -- outcomes and progress ----------------------------------------------------------


@dataclass
class Outcome:
    """How one session ended for this command."""

    session_id: str
    workflow: str | None
    status: str
    output: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Tell whether the session finished (or is in another runner's hands)."""
        return self.status in ("completed", "busy")

    def as_json(self, *, with_workflow: bool = False) -> dict[str, Any]:
        """Return the object ``--json`` prints for this session."""
        data: dict[str, Any] = {
            "session_id": self.session_id,
            "status": self.status,
            "output": to_plain(self.output),
        }
        if with_workflow:
            data["workflow"] = self.workflow
        if self.error is not None:
            data["error"] = self.error
        return data


def summary_table(outcomes: list[Outcome]) -> Table:
    """Build the table ``resume --all`` ends with."""
    table = Table(title="resumed sessions")
    table.add_column("session", no_wrap=True)
    table.add_column("workflow")
    table.add_column("status")
    table.add_column("output or error", overflow="fold")
    for outcome in outcomes:
        detail = (
            outcome.error if outcome.error is not None else dump_json(outcome.output, indent=None)
        )
        style = "green" if outcome.status == "completed" else "red"
        table.add_row(
            outcome.session_id,
            outcome.workflow or "?",
            Text(outcome.status, style=style),
            Text(_shorten(detail, 120)),
        )
    return table


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class _Track:
    task: TaskID
    workflow: str
    total: int
    done: int = 0
    step: str | None = None


@dataclass
class StepProgress:
    """A runner hook that draws one progress bar per session on stderr.

    It also remembers how far each session got, so an interrupted command can say
    where to resume. With ``console=None`` (``--json``) it draws nothing.
    """

    console: Console | None
    _progress: Progress | None = field(default=None, init=False)
    _tracks: dict[str, _Track] = field(default_factory=dict, init=False)

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def note(self, message: str, style: str | None = None) -> None:
        """Print a line above the bars (nothing with ``--json``)."""
        if self.console is not None:
            self.console.print(Text(message, style=style or ""), soft_wrap=True)

    def watch(self, session_id: str, workflow: str, total: int, done: int) -> None:
        """Add a bar for a session about to run, with ``done`` steps already behind it."""
        if session_id in self._tracks:
            return
        task = TaskID(-1)
        if self.console is not None:
            if self._progress is None:  # started with the first bar: no blank bar on errors
                self._progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                )
                self._progress.start()
            task = self._progress.add_task(
                f"{session_id[:8]} {workflow}", total=total, completed=done
            )
        self._tracks[session_id] = _Track(task, workflow, total, done)

    def done(self, session_id: str) -> int:
        """Return how many steps of the session are committed, as far as this hook saw."""
        track = self._tracks.get(session_id)
        return 0 if track is None else track.done

    def total(self, session_id: str) -> int:
        """Return the session's step count, 0 if unknown."""
        track = self._tracks.get(session_id)
        return 0 if track is None else track.total

    def __call__(self, event: StepEvent) -> None:
        self.watch(event.session_id, event.workflow, event.total, event.index)
        track = self._tracks[event.session_id]
        track.step = event.step
        if event.kind == "committed":
            track.done = max(track.done, event.index + 1)
            self.note(f"✓ {event.session_id[:8]} {event.step} ({event.duration or 0:.2f}s)")
        elif event.kind == "failed":
            self.note(
                f"✗ {event.session_id[:8]} {event.step} attempt {event.attempt}: {event.error}",
                "red",
            )
        else:
            track.done = max(track.done, event.index)
        if self._progress is not None:
            label = f"{event.session_id[:8]} {event.workflow}: {event.step}"
            self._progress.update(track.task, completed=track.done, description=label)

    def unfinished(self) -> list[tuple[str, int, int]]:
        """Return ``(session id, steps done, steps in all)`` for each session not yet done."""
        return [
            (session_id, track.done, track.total)
            for session_id, track in self._tracks.items()
            if track.done < track.total
        ]
