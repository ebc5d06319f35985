"""Code-change safety: does a stored session still fit its workflow's current code?

Each session records its workflow's version and shape (step names, order, output
types). A change is compatible when every completed step is still there, in its
place, and its stored output still fits the step's return type: steps appended,
steps after the cursor changed, bodies rewritten. Anything else is incompatible,
and resuming raises ``WorkflowMismatchError`` saying what changed. Registered
migrations upgrade old versions' state before the next step runs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from .errors import WorkflowMismatchError
from .events import parked
from .models import Session
from .values import state_changes
from .workflow import Workflow

Verdict = Literal["safe", "reruns", "incompatible", "unreadable"]


@dataclass(frozen=True, slots=True)
class SessionCheck:
    """What resuming one session under a workflow's current code would do.

    ``safe``: nothing done runs again. ``reruns``: ``step`` runs again from its
    start (it failed, or it was in progress and changed). ``incompatible``:
    resuming raises ``WorkflowMismatchError``; ``detail`` says what changed.
    """

    session_id: str
    status: str | None
    verdict: Verdict
    step: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class Assessment:
    """A session checked against a workflow, with its completed outputs restored."""

    check: SessionCheck
    outputs: dict[str, Any] = field(default_factory=dict)


def assess(session: Session, workflow: Workflow) -> Assessment:
    """Check ``session`` against ``workflow``'s current steps (see ``SessionCheck``)."""

    def verdict(kind: Verdict, step: str | None, detail: str) -> SessionCheck:
        return SessionCheck(session.id, session.status, kind, step, detail)

    if session.workflow != workflow.name:
        detail = f"it belongs to workflow {session.workflow!r}, not {workflow.name!r}"
        return Assessment(verdict("incompatible", None, detail))
    names = workflow.step_names
    outputs: dict[str, Any] = {}
    for position, name in enumerate(session.steps_done):
        if position >= len(names) or names[position] != name:
            detail = _misplaced(name, position, names, workflow)
            return Assessment(verdict("incompatible", name, detail))
        step = workflow.steps[position]
        try:
            outputs[name] = step.output_adapter.validate_python(session.outputs.get(name))
        except ValidationError:
            was = _recorded_type(session, position)
            detail = (
                f"completed step {name!r} now returns {step.output_type}"
                + (f" (it returned {was})" if was and was != step.output_type else "")
                + ": its stored output does not fit"
            )
            return Assessment(verdict("incompatible", name, detail))
    migrating = workflow.migration_path(session.workflow_version)
    note = f"; its state migrates from version {session.workflow_version}" if migrating else ""
    if session.status == "completed":
        return Assessment(verdict("safe", None, "completed: nothing runs" + note), outputs)
    if session.cursor >= len(names):
        last = session.steps_done[-1] if session.steps_done else None
        detail = f"no step left to run: it completes with the output of {last!r}" + note
        return Assessment(verdict("safe", None, detail), outputs)
    kind, current, detail = _next_step(session, workflow)
    return Assessment(verdict(kind, current, detail + note), outputs)


def _next_step(session: Session, workflow: Workflow) -> tuple[Verdict, str, str]:
    current = workflow.step_names[session.cursor]
    shape = session.workflow_shape or []
    was = shape[session.cursor] if session.cursor < len(shape) else None
    changed = was is not None and tuple(was) != workflow.stamp.shape[session.cursor]
    in_step = was[0] if was is not None else current
    recorded = sum(1 for entry in session.journal.values() if entry.step == in_step)
    tried = session.attempts.get(in_step, 0) - session.retry_base.get(in_step, 0)
    if changed and (recorded or tried > 0 or session.status in ("waiting", "failed")):
        return (
            "reruns",
            current,
            f"it was in step {in_step!r}, which changed: {current!r} runs from its start "
            "and what the old step recorded is not replayed",
        )
    if session.status == "failed" or parked(session):
        how = "parked" if parked(session) else "failed"
        return (
            "reruns",
            current,
            f"step {current!r} {how} ({session.error}); resuming runs it again",
        )
    if tried > 0:
        return (
            "reruns",
            current,
            f"step {current!r} has {tried} failed attempt(s): the next attempt runs on resume",
        )
    if session.status == "waiting" and session.wait is not None:
        what = f"event {session.wait.event!r}" if session.wait.kind == "event" else "a sleep"
        return (
            "safe",
            current,
            f"waits in step {current!r} for {what}; its {recorded} recorded call(s) are replayed",
        )
    return "safe", current, f"continues at step {current!r}"


def _misplaced(name: str, position: int, names: list[str], workflow: Workflow) -> str:
    if name not in names:
        return f"completed step {name!r} (step {position + 1}) was renamed or removed"
    return (
        f"completed step {name!r} moved from step {position + 1} to step {workflow.index(name) + 1}"
    )


def _recorded_type(session: Session, position: int) -> str | None:
    shape = session.workflow_shape or []
    return shape[position][1] if position < len(shape) else None


def migrate(session: Session, workflow: Workflow) -> tuple[dict[str, Any], list[str]] | None:
    """Run the migrations from the session's version; return the state delta, if any.

    Raises:
        WorkflowMismatchError: a migration raised or did not return a dict.
    """
    path = workflow.migration_path(session.workflow_version)
    if not path:
        return None
    state = copy.deepcopy(session.state)
    for migration in path:
        what = f"migration from version {migration.from_version} to {migration.to_version}"
        try:
            state = migration.fn(state)
        except Exception as exc:
            raise WorkflowMismatchError(
                f"session {session.id}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise WorkflowMismatchError(
                f"session {session.id}: {what} returned {type(state).__name__}, not a dict"
            )
    return state_changes(session.state, state, what)


def rewind_state(session: Session, steps: list[str]) -> dict[str, Any]:
    """Return the session's state as it was before ``steps`` (the last completed ones) ran."""
    state = copy.deepcopy(session.state)
    for name in reversed(steps):
        undo = session.undo.get(name)
        if undo is not None:
            for key in undo.remove:
                state.pop(key, None)
            state.update(copy.deepcopy(undo.restore))
    return state
