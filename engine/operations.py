"""What an operator does to a session: cancel, fork, restart from a step, skip, check.

These sit between the driving machinery (``Driver``) and the everyday API
(``Runner``), which inherits them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import ValidationError

from . import events, versioning
from .driver import Driver
from .errors import (
    EngineError,
    InvalidArgumentError,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    WorkflowDefinitionError,
)
from .journal import SessionWriter
from .log import get_logger
from .models import Session, StateUndo, ToolResult, utcnow
from .stores.base import validate_session_id
from .values import to_json
from .versioning import SessionCheck
from .workflow import Workflow

_log = get_logger()


class Operations(Driver):
    """The operator's actions on stored sessions; ``Runner`` inherits them."""

    async def cancel(self, session_id: str) -> None:
        """Stop a session: cancel its running step here, and mark it cancelled for good.

        The attempt it stopped is recorded in the tool history; ``resume_all`` never
        picks a cancelled session up again.

        Raises:
            SessionBusyError: another runner is running it.
        """
        self._backlog.pop(validate_session_id(session_id), None)  # never to start now
        task = self._tasks.get(session_id)
        writer = self._writers.get(session_id)
        stopped = writer.in_flight if writer is not None else None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lease = await self._acquire(session_id)
        try:
            writer = SessionWriter(self.store, lease, await self._load(session_id))
            if writer.session.status not in ("completed", "cancelled"):
                records = []
                if stopped is not None:
                    records.append(
                        ToolResult(
                            name=stopped.step,
                            step=stopped.step,
                            attempt=stopped.attempt,
                            input_digest=stopped.input_digest,
                            error="cancelled",
                            started_at=stopped.started_at,
                            finished_at=utcnow(),
                            duration=round(time.perf_counter() - stopped.started, 6),
                        )
                    )
                await writer.commit(status="cancelled", error="cancelled", tool_results=records)
                _log.info("session.cancelled", session_id=session_id)
        finally:
            await self.store.release(lease)

    async def fork(self, session_id: str, *, from_step: str) -> str:
        """Copy a session up to ``from_step`` into a new session; return the new id.

        The new session keeps the outputs of the steps before ``from_step`` and the
        state as it was before ``from_step`` first ran; it has not run yet:
        ``resume`` or ``wait`` runs it from ``from_step``. The original is untouched.

        Raises:
            InvalidArgumentError: the workflow has no such step, or the session has
                not reached it.
            WorkflowMismatchError: the workflow is not registered here, or the
                session no longer fits it.
            SessionExpiredError, SessionNotFoundError, SessionLimitError.
        """
        source = await self._load(validate_session_id(session_id))
        if source.is_expired():
            raise SessionExpiredError(f"session {session_id} expired at {source.expires_at}")
        index = self._rewind_point(source, from_step)
        kept = source.steps_done[:index]
        fork = self.sessions.new_session(source.context, ttl=source.ttl, metadata=source.metadata)
        fork.ttl_policy = source.ttl_policy
        fork.touch()
        fork.workflow = source.workflow
        fork.workflow_version = source.workflow_version
        fork.workflow_fingerprint = source.workflow_fingerprint
        fork.workflow_shape = source.workflow_shape
        fork.workflow_source = source.workflow_source
        fork.input = source.input
        fork.steps_done = kept
        fork.outputs = {name: source.outputs[name] for name in kept}
        fork.undo = {name: source.undo[name] for name in kept if name in source.undo}
        fork.state = versioning.rewind_state(source, source.steps_done[index:])
        fork.forked_from = source.id
        await self.sessions.insert_session(fork)
        _log.info("session.forked", session_id=fork.id, source=source.id, from_step=from_step)
        return fork.id

    async def restart(self, session_id: str, *, from_step: str) -> Any:
        """Run a session again from ``from_step``, in place; return its final output.

        The steps from ``from_step`` on run again, with fresh retry budgets, on the
        state as it was before ``from_step`` first ran. The tool history keeps
        everything that happened before. Events their earlier runs took are spent.

        Raises:
            SessionBusyError: a runner is running it.
            InvalidArgumentError: no such step, or the session has not reached it.
            SessionCancelledError, SessionExpiredError, SessionNotFoundError,
            WorkflowMismatchError, and what ``resume`` raises.
        """
        if validate_session_id(session_id) in self._tasks:
            raise SessionBusyError(f"session {session_id} is running here; cancel it first")
        session = await self._load(session_id)
        if session.status == "cancelled":
            raise SessionCancelledError(f"session {session_id} was cancelled; fork it instead")
        if session.is_expired():
            raise SessionExpiredError(f"session {session_id} expired at {session.expires_at}")
        index = self._rewind_point(session, from_step)
        undone = session.steps_done[index:]
        session.state = versioning.rewind_state(session, undone)
        session.steps_done = session.steps_done[:index]
        for name in undone:
            session.outputs.pop(name, None)
            session.undo.pop(name, None)
        for name in self._workflow(session).step_names[index:]:
            session.retry_base[name] = session.attempts.get(name, 0)
        session.journal = {}
        session.wait = None
        session.error = None
        session.status = "pending"
        # Replaced whole: the store refuses while anyone holds the lease, or if the
        # session changed since we read it.
        await self.sessions.update_session(session)
        _log.info("session.restarted", session_id=session_id, from_step=from_step)
        return await self._outcome(session_id, self._spawn(session_id, retry_failed=False))

    async def skip(self, session_id: str, output: Any) -> Any:
        """Complete the step a failed or parked session stopped at with ``output``.

        The operator's way past a step that cannot succeed: ``output`` is checked
        against the step's return type and committed as its output (recorded in
        the tool history as a ``skip``), then the session goes on; returns its
        final output.

        Raises:
            InvalidArgumentError: the session is not failed or parked, or ``output``
                does not fit the step's return type.
            SessionBusyError, SessionExpiredError, SessionNotFoundError,
            WorkflowMismatchError, and what ``resume`` raises.
        """
        lease = await self._acquire(validate_session_id(session_id))
        try:
            writer = SessionWriter(self.store, lease, await self._load(session_id))
            session = writer.session
            if session.status != "failed" and not events.parked(session):
                raise InvalidArgumentError(
                    f"session {session_id} is {session.status}: only the step of a failed "
                    "or parked session can be skipped"
                )
            if session.is_expired():
                raise SessionExpiredError(f"session {session_id} expired at {session.expires_at}")
            self._fitting(session)
            workflow = self._workflow(session)
            step = workflow.steps[session.cursor]
            try:
                typed = step.output_adapter.validate_python(output)
            except ValidationError as exc:
                raise InvalidArgumentError(
                    f"the output given for step {step.name!r} does not fit its return type "
                    f"{step.output_type}: {exc.errors(include_url=False)}"
                ) from None
            stored = to_json(typed, f"the output given for step {step.name!r}")
            now = utcnow()
            record = ToolResult(
                name=step.name,
                kind="skip",
                step=step.name,
                attempt=session.attempts.get(step.name, 0),
                output=stored,
                started_at=now,
                finished_at=now,
                duration=0.0,
            )
            last = session.cursor == len(workflow.steps) - 1
            await writer.commit(
                status="completed" if last else "running",
                step=step.name,
                output=stored,
                undo=StateUndo(),
                tool_results=[record],
            )
            _log.info("step.skipped", session_id=session_id, step=step.name)
        finally:
            await self.store.release(lease)
        task = self._tasks.get(session_id) or self._spawn(session_id, retry_failed=False)
        return await self._outcome(session_id, task)

    async def check(self, workflow: Workflow) -> list[SessionCheck]:
        """Tell what resuming each stored session of ``workflow`` under this code would do.

        Covers every unexpired session of the workflow except cancelled ones, and
        every unreadable session (its workflow cannot be told). Nothing is changed.
        """
        now = utcnow()
        checks = []
        for row in await self.store.list():
            if row.problem is not None:
                checks.append(SessionCheck(row.id, None, "unreadable", None, row.problem))
                continue
            if row.workflow != workflow.name or row.is_expired(now) or row.status == "cancelled":
                continue
            try:
                session = await self._load(row.id)
            except EngineError as exc:
                checks.append(SessionCheck(row.id, row.status, "unreadable", None, str(exc)))
                continue
            checks.append(versioning.assess(session, workflow).check)
        return checks

    def _rewind_point(self, session: Session, from_step: str) -> int:
        """Return where ``from_step`` sits, if the session has reached it."""
        self._fitting(session)
        workflow = self._workflow(session)
        try:
            index = workflow.index(from_step)
        except WorkflowDefinitionError:
            raise InvalidArgumentError(
                f"workflow {workflow.name!r} has no step {from_step!r}; "
                f"its steps are {workflow.step_names}"
            ) from None
        if index > session.cursor:
            raise InvalidArgumentError(
                f"session {session.id} has not reached step {from_step!r} yet "
                f"(it has completed {session.cursor} of {len(workflow.steps)} steps)"
            )
        return index
