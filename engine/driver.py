"""Driving sessions: leases and heartbeats, the step loop, and sleeping through waits.

``Driver`` is the machinery under ``Runner``: it holds a session's lease while it
runs steps, lets go of it while the session waits (for an event, a long sleep), and
takes it again when the wait is over. The public methods live on ``Runner`` and
the operator's actions (cancel, fork, restart, skip, check) on ``Operations``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import events, versioning
from .errors import (
    EngineError,
    LeaseLostError,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
    StepFailedError,
    WorkflowDefinitionError,
    WorkflowMismatchError,
)
from .journal import SessionWriter, Suspended
from .log import get_logger
from .models import UNFINISHED, Session, utcnow
from .sessions import SessionManager
from .steps import StepEvent, run_step
from .stores.base import Lease, Store
from .values import restore
from .workflow import Workflow

_log = get_logger()


class Driver:
    """Run sessions of registered workflows under leases, one task per session."""

    def __init__(
        self,
        sessions: SessionManager,
        *,
        owner: str,
        lease_ttl: float,
        max_takeovers: int,
        max_concurrency: int,
        poll_interval: float,
        inline_wait: float,
        hooks: Sequence[Callable[[StepEvent], None]],
    ) -> None:
        self.sessions = sessions
        self.store: Store = sessions.store
        self.owner = owner
        self.lease_ttl = lease_ttl
        self.max_takeovers = max_takeovers
        self.poll_interval = poll_interval
        self.inline_wait = inline_wait
        self.hooks = tuple(hooks)
        self._workflows: dict[str, Workflow] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._writers: dict[str, SessionWriter] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._slots = asyncio.Semaphore(max_concurrency)
        self._max_concurrency = max_concurrency
        self._backlog: dict[str, None] = {}  # an ordered set: scheduled, no task yet
        self._closing = False

    def register(self, workflow: Workflow) -> None:
        """Make a workflow resumable by this runner."""
        known = self._workflows.get(workflow.name)
        if known is not None and known is not workflow:
            raise WorkflowDefinitionError(
                f"two different workflows are named {workflow.name!r} in this runner"
            )
        if not workflow.steps:
            raise WorkflowDefinitionError(f"workflow {workflow.name!r} has no steps")
        self._workflows[workflow.name] = workflow

    async def _outcome(self, session_id: str, task: asyncio.Task[Any]) -> Any:
        """Await a session's task without letting our caller's cancellation stop it."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if task.cancelled() and (waiter is None or not waiter.cancelling()):
                # The session was stopped (cancel() or the runner closing), not us.
                raise SessionCancelledError(f"session {session_id} was cancelled") from None
            raise

    def _spawn(self, session_id: str, *, retry_failed: bool) -> asyncio.Task[Any]:
        if self._closing:
            raise EngineError(f"this runner is closed: session {session_id} was not started")
        task = asyncio.get_running_loop().create_task(
            self._drive(session_id, retry_failed=retry_failed), name=f"stepvault-{session_id}"
        )
        self._tasks[session_id] = task
        self._backlog.pop(session_id, None)  # started ahead of its turn (``wait``)
        task.add_done_callback(lambda done: self._forget(session_id, done))
        return task

    def _schedule(self, session_ids: Iterable[str]) -> None:
        """Run these sessions as slots free up: a task each only once one is near.

        ``resume_all`` over 100,000 stored sessions must not hold 100,000 tasks (and
        their sessions) in memory; a backlog of ids costs a string each.
        """
        if self._closing:
            return
        self._backlog.update(dict.fromkeys(i for i in session_ids if i not in self._tasks))
        self._feed()

    def _feed(self) -> None:
        if self._closing:  # close() is cancelling what runs: start nothing more
            return
        # A session suspended in ``_watch`` keeps its task but frees its slot.
        while self._backlog and len(self._tasks) - len(self._wakeups) < self._max_concurrency:
            self._spawn(next(iter(self._backlog)), retry_failed=False)

    def _forget(self, session_id: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(session_id) is task:
            del self._tasks[session_id]
        self._feed()
        # Read the outcome, so one nobody waits for is not reported as never retrieved.
        if not task.cancelled() and task.exception() is not None:
            _log.debug("session.stopped", session_id=session_id, error=str(task.exception()))

    async def _acquire(self, session_id: str) -> Lease:
        lease = await self._try_acquire(session_id)
        if lease is None:
            raise SessionBusyError(f"session {session_id} is being run by another runner")
        return lease

    async def _try_acquire(self, session_id: str) -> Lease | None:
        """Take the session's lease, or None; a cancelled call never keeps a lease."""
        taking = asyncio.ensure_future(
            self.store.acquire(session_id, self.owner, ttl=self.lease_ttl)
        )
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            # The store may have taken the lease just as we were cancelled (a file
            # store's lock is taken in a thread that cannot be stopped): give it back.
            with contextlib.suppress(Exception):
                lease = await taking
                if lease is not None:
                    await self.store.release(lease)
            raise

    async def _load(self, session_id: str) -> Session:
        session = await self.store.load(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        return session

    async def _drive(self, session_id: str, *, retry_failed: bool) -> Any:
        """Run a session to its end, letting go of it while it waits."""
        waited = False
        while True:
            async with self._slots:
                lease = await self._try_acquire(session_id)
                if lease is not None:
                    try:
                        return await self._hold(lease, retry_failed=retry_failed)
                    except Suspended:
                        pass
                elif not waited:
                    raise SessionBusyError(f"session {session_id} is being run by another runner")
            if lease is None:  # someone (a sender, another runner) has it for now
                await asyncio.sleep(self.poll_interval)
            else:
                await self._watch(session_id)
            retry_failed, waited = False, True

    async def _hold(self, lease: Lease, *, retry_failed: bool) -> Any:
        """Run a session under ``lease`` until it ends or suspends; then let go of it."""
        session_id = lease.session_id
        lost: list[LeaseLostError] = []
        heartbeat = asyncio.get_running_loop().create_task(
            self._heartbeat(lease, asyncio.current_task(), lost)
        )
        writer: SessionWriter | None = None
        try:
            # Reread: the last owner may have moved on.
            writer = SessionWriter(self.store, lease, await self._load(session_id))
            self._writers[session_id] = writer
            if lease.takeovers > self.max_takeovers and writer.session.status in UNFINISHED:
                await self._park_crash_loop(writer)
            return await self._continue(writer, retry_failed=retry_failed)
        except asyncio.CancelledError:
            if lost:  # cancelled by our heartbeat, not by a caller
                raise lost[0] from None
            raise
        finally:
            if writer is not None:
                if self._writers.get(session_id) is writer:
                    del self._writers[session_id]
                await writer.drain()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self.store.release(lease)

    async def _watch(self, session_id: str) -> None:
        """Return once a suspended session may go on: its event came or its time is up."""
        wakeup = self._wakeups[session_id] = asyncio.Event()
        self._feed()  # this session's slot is free while it waits
        try:
            while True:
                wakeup.clear()
                session = await self._load(session_id)
                now = utcnow()
                if session.status != "waiting" or events.ready(session, now):
                    return
                if events.parked(session):
                    return  # parked meanwhile: the next pass says so
                wait = session.wait
                # Events may come from other processes: look again now and then.
                delay = self.poll_interval if wait is None or wait.kind == "event" else None
                if wait is not None and wait.until is not None:
                    left = max((wait.until - now).total_seconds(), 0.0)
                    delay = left if delay is None else min(delay, left)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await wakeup.wait()
        finally:
            if self._wakeups.get(session_id) is wakeup:
                del self._wakeups[session_id]

    async def _heartbeat(
        self, lease: Lease, driver: asyncio.Task[Any] | None, lost: list[LeaseLostError]
    ) -> None:
        """Renew the lease every third of its TTL; stop the session if it was lost."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                await self.store.renew(lease, ttl=self.lease_ttl)
            except LeaseLostError as exc:
                _log.error("lease.lost", session_id=lease.session_id, error=str(exc))
                lost.append(exc)
                if driver is not None:
                    driver.cancel()
                return
            except EngineError as exc:  # a passing storage fault: try again next beat
                _log.warning("lease.renew_failed", session_id=lease.session_id, error=str(exc))

    async def _park_crash_loop(self, writer: SessionWriter) -> None:
        session = writer.session
        reason = (
            f"taken over {writer.lease.takeovers} times: every runner that ran it stopped "
            "without letting go (a crash loop?); fix the cause, then resume it"
        )
        await writer.commit(status="failed", error=reason)
        workflow = self._workflows.get(session.workflow or "")
        names = workflow.step_names if workflow else []
        in_flight = names[session.cursor] if session.cursor < len(names) else ""
        raise StepFailedError(
            f"session {session.id} parked as failed: {reason}",
            session_id=session.id,
            step=in_flight,
        )

    def _workflow(self, session: Session) -> Workflow:
        workflow = self._workflows.get(session.workflow or "")
        if workflow is None:
            raise WorkflowMismatchError(
                f"session {session.id}: workflow {session.workflow!r} is not registered "
                "with this runner"
            )
        return workflow

    def _fitting(self, session: Session) -> versioning.Assessment:
        """Check the session against its workflow's code; raise if it no longer fits."""
        workflow = self._workflow(session)
        assessment = versioning.assess(session, workflow)
        if assessment.check.verdict == "incompatible":
            raise WorkflowMismatchError(
                f"session {session.id} does not fit workflow {workflow.name!r} version "
                f"{workflow.version}: {assessment.check.detail}"
            )
        return assessment

    async def _continue(self, writer: SessionWriter, *, retry_failed: bool) -> Any:
        session = writer.session
        if session.status == "cancelled":
            raise SessionCancelledError(f"session {session.id} was cancelled")
        if session.is_expired():
            raise SessionExpiredError(f"session {session.id} expired at {session.expires_at}")
        workflow = self._workflow(session)
        outputs = self._fitting(session).outputs
        steps = workflow.steps
        stopped = session.status == "failed" or events.parked(session)
        if stopped and not retry_failed:
            how = "is parked" if events.parked(session) else "failed"
            raise StepFailedError(
                f"session {session.id} {how}: {session.error}; resume it to retry",
                session_id=session.id,
                step=steps[session.cursor].name if session.cursor < len(steps) else "",
            )
        if session.status == "completed":
            return outputs[session.steps_done[-1]] if session.steps_done else None
        wait = session.wait
        if wait is not None and not stopped and not events.ready(session, utcnow()):
            raise Suspended(wait)
        await self._prepare(writer, workflow, fresh_budget=stopped)
        value = (
            outputs[session.steps_done[-1]]
            if session.steps_done
            else restore(steps[0].input_adapter, session.input, session.id, "input")
        )
        for index in range(session.cursor, len(steps)):
            value = await run_step(
                writer,
                workflow,
                index,
                value,
                outputs,
                emit=self._emit if self.hooks else None,
                inline_wait=self.inline_wait,
            )
            outputs[steps[index].name] = value
        if writer.session.status != "completed":  # steps after the cursor were removed
            await writer.commit(status="completed")
        return value

    async def _prepare(
        self, writer: SessionWriter, workflow: Workflow, *, fresh_budget: bool
    ) -> None:
        """Mark the session running: a fresh retry budget if asked, migrations, new stamp."""
        session = writer.session
        changes: dict[str, Any] = {}
        if fresh_budget and session.cursor < len(workflow.steps):
            # Attempt numbers keep counting, so the history reads in order.
            failed = workflow.steps[session.cursor].name
            changes["retry_base"] = {failed: session.attempts.get(failed, 0)}
        delta = versioning.migrate(session, workflow)
        if delta is not None:
            changes["state_set"], changes["state_unset"] = delta
            _log.info("session.migrated", session_id=session.id, to_version=workflow.version)
        stamp = workflow.stamp
        if (session.workflow_version, session.workflow_fingerprint) != (
            stamp.version,
            stamp.fingerprint,
        ) or session.workflow_shape is None:
            changes["stamp"] = stamp
        if changes or session.status != "running":
            await writer.commit(status="running", **changes)

    def _emit(self, event: StepEvent) -> None:
        for hook in self.hooks:
            try:
                hook(event)
            except Exception as exc:  # a broken progress bar must not fail the workflow
                _log.warning("hook.failed", hook=repr(hook), error=str(exc))
