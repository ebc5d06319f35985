"""Runner: executes workflows, checkpoints after each step, resumes after a crash."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from . import events
from .errors import (
    EngineError,
    InvalidArgumentError,
    SessionBusyError,
    SessionCancelledError,
    SessionExistsError,
    SessionExpiredError,
    WorkflowMismatchError,
)
from .log import get_logger
from .models import UNFINISHED, Event, Session, SessionInfo, TtlPolicy, to_seconds, utcnow
from .operations import Operations
from .sessions import ContextLike, MetadataLike, SessionManager
from .steps import StepEvent
from .stores.base import DEFAULT_LEASE_TTL, Store, list_pages, validate_session_id
from .values import to_json
from .versioning import SessionCheck
from .workflow import Workflow

__all__ = ["DEFAULT_RUNNER_TTL", "Runner", "RunnerHook", "SessionCheck", "StepEvent"]

_log = get_logger()

DEFAULT_RUNNER_TTL = 7 * 24 * 3600.0
"""Workflow sessions may wait on people or outages: a week, unless told otherwise."""


class RunnerHook(Protocol):
    """Called synchronously for every step event; keep it quick (a progress bar, a metric)."""

    def __call__(self, event: StepEvent, /) -> None: ...


class Runner(Operations):
    """Run workflows durably over a store.

    Use it as an async context manager: leaving it cancels the steps in flight
    (their sessions stay resumable from their last checkpoint) and closes the store.

    Args:
        store: where sessions live.
        workflows: the workflows this runner may resume; ``run``/``start`` add theirs.
        default_ttl: a session's TTL when ``run``/``start`` get none.
        max_sessions: most unexpired sessions in the store (None: unlimited).
        cleanup_interval: seconds between sweeps of expired sessions (None: off).
        ttl_policy: ``"sliding"`` (each checkpoint extends the expiry) or ``"fixed"``.
        max_concurrency: most sessions this runner drives at once (waiting ones
            do not count).
        lease_ttl: seconds a lease lasts; a heartbeat renews it every third of that.
        max_takeovers: how many runners in a row may die holding a session before it
            is parked as failed (a crash loop), instead of crashing runner after runner.
        poll_interval: how often a session waiting for an event here looks for one
            sent from elsewhere (events sent through this runner wake it at once).
        inline_wait: sleeps no longer than this (seconds) are slept in place; longer
            ones suspend the session (status ``waiting``) and let go of it.
        hooks: callables told about every step event.
    """

    def __init__(
        self,
        store: Store,
        workflows: Iterable[Workflow] = (),
        *,
        default_ttl: float | timedelta = DEFAULT_RUNNER_TTL,
        max_sessions: int | None = None,
        cleanup_interval: float | timedelta | None = 300,
        ttl_policy: TtlPolicy = "sliding",
        max_concurrency: int = 64,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        max_takeovers: int = 10,
        poll_interval: float | timedelta = 1.0,
        inline_wait: float | timedelta = 1.0,
        hooks: Sequence[RunnerHook] = (),
    ) -> None:
        if max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__(
            SessionManager(
                store,
                default_ttl=default_ttl,
                max_sessions=max_sessions,
                cleanup_interval=cleanup_interval,
                ttl_policy=ttl_policy,
            ),
            owner=str(uuid.uuid4()),
            lease_ttl=to_seconds(lease_ttl),
            max_takeovers=max_takeovers,
            max_concurrency=max_concurrency,
            poll_interval=to_seconds(poll_interval),
            inline_wait=to_seconds(inline_wait),
            hooks=hooks,
        )
        for workflow in workflows:
            self.register(workflow)

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- starting and waiting ---------------------------------------------------

    async def run(
        self,
        workflow: Workflow,
        input: Any = None,
        *,
        ttl: float | timedelta | None = None,
        metadata: MetadataLike = None,
        context: ContextLike = None,
        session_id: str | None = None,
    ) -> Any:
        """Run a workflow to the end and return the last step's output."""
        started = await self.start(
            workflow, input, ttl=ttl, metadata=metadata, context=context, session_id=session_id
        )
        return await self.wait(started)

    async def start(
        self,
        workflow: Workflow,
        input: Any = None,
        *,
        ttl: float | timedelta | None = None,
        metadata: MetadataLike = None,
        context: ContextLike = None,
        session_id: str | None = None,
    ) -> str:
        """Create a session for ``workflow`` and start running it; return its id at once.

        ``session_id`` is an idempotency key: if that session exists it is returned
        (and resumed if unfinished) and no completed step runs again.
        """
        self.register(workflow)
        if session_id is not None:
            existing = await self.store.load(validate_session_id(session_id))
            if existing is not None:
                return self._adopt(workflow, existing)
        session = self.sessions.new_session(
            context, ttl=ttl, metadata=metadata, session_id=session_id
        )
        session.workflow = workflow.name
        stamp = workflow.stamp
        session.workflow_version = stamp.version
        session.workflow_fingerprint = stamp.fingerprint
        session.workflow_shape = list(stamp.shape)  # the stamp is shared: never the same list
        session.workflow_source = workflow.source
        session.input = to_json(input, f"the input of workflow {workflow.name!r}")
        try:
            await self.sessions.insert_session(session)
        except SessionExistsError:  # created concurrently under the same key
            existing = await self.store.load(session.id)
            if existing is None:
                raise
            return self._adopt(workflow, existing)
        self._spawn(session.id, retry_failed=False)
        return session.id

    def _adopt(self, workflow: Workflow, existing: Session) -> str:
        if existing.workflow != workflow.name:
            raise WorkflowMismatchError(
                f"session {existing.id} belongs to workflow {existing.workflow!r}, "
                f"not {workflow.name!r}"
            )
        if (
            existing.status in UNFINISHED
            and not existing.is_expired()
            and existing.id not in self._tasks
        ):
            self._spawn(existing.id, retry_failed=False)
        return existing.id

    async def wait(self, session_id: str) -> Any:
        """Return the session's final output, running it here if nobody is.

        A session waiting for an event or a sleep is waited for, however long.

        Raises:
            StepFailedError: a step failed after its retries (or the session is parked).
            SerializationError: a step returned something that is not JSON.
            SessionCancelledError, SessionExpiredError, SessionNotFoundError.
        """
        task = self._tasks.get(validate_session_id(session_id)) or self._spawn(
            session_id, retry_failed=False
        )
        return await self._outcome(session_id, task)

    async def resume(self, session_id: str) -> Any:
        """Continue a session from its last completed step and return its final output.

        A completed session returns its output without running anything; a failed
        or parked one retries the step that failed, with a fresh retry budget.
        """
        task = self._tasks.get(validate_session_id(session_id)) or self._spawn(
            session_id, retry_failed=True
        )
        return await self._outcome(session_id, task)

    async def resume_all(self) -> list[str]:
        """Start every unexpired, unfinished session of a registered workflow that can go on.

        A session waiting for an event or a sleep is started once the event is in
        its inbox or the time is up; one parked for an operator, never. Returns at
        once with the ids scheduled; ``wait`` on each for its result. At most
        ``max_concurrency`` run at once; the rest wait in ``backlog`` (an id each,
        not a task). A session another runner holds is left to it (its ``wait``
        here raises ``SessionBusyError``).
        """
        now = utcnow()
        started: list[str] = []
        async for page in list_pages(self.store, unfinished=True):
            ready = [row.id for row in page if await self._resumable(row, now)]
            self._schedule(ready)  # work starts after the first page, not after the last
            started += ready
        return started

    async def _resumable(self, row: SessionInfo, now: datetime) -> bool:
        """Tell whether ``resume_all`` should run the row's session now."""
        if row.problem is not None:
            _log.warning("resume.unreadable", session_id=row.id, problem=row.problem)
            return False
        if row.status not in UNFINISHED or row.is_expired(now):
            return False
        if row.workflow not in self._workflows:
            return False
        if row.status != "waiting":
            return True
        try:
            session = await self._load(row.id)
        except EngineError as exc:
            _log.warning("resume.unreadable", session_id=row.id, problem=str(exc))
            return False
        return events.ready(session, now)

    async def send_event(self, session_id: str, name: str, payload: Any = None) -> None:
        """Store an event in a session's inbox durably; a step waiting for it goes on.

        The event waits in the inbox until a step takes it with
        ``ctx.wait_for_event(name)``, so one sent early is not lost. If this runner
        knows the session's workflow and the session waits, it resumes it.

        Raises:
            SessionBusyError: another runner holds the session and the store cannot
                take events without the lease (see ``engine.events``).
            InvalidArgumentError: the session is completed, or ``name`` is empty.
            SessionCancelledError, SessionExpiredError, SessionNotFoundError.
            SerializationError: ``payload`` is not JSON.
        """
        session = await self._load(validate_session_id(session_id))
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"an event name must be a non-empty string, got {name!r}")
        if session.is_expired():
            raise SessionExpiredError(f"session {session_id} expired at {session.expires_at}")
        if session.status == "cancelled":
            raise SessionCancelledError(f"session {session_id} was cancelled")
        if session.status == "completed":
            raise InvalidArgumentError(
                f"session {session_id} is completed: no step will take event {name!r}"
            )
        event = Event(
            id=str(uuid.uuid4()),
            name=name,
            payload=to_json(payload, f"the payload of event {name!r}"),
            sent_at=utcnow(),
        )
        deadline = time.monotonic() + 1.0
        while True:
            try:
                await events.deliver(
                    self.store,
                    session_id,
                    event,
                    holder=self._writers.get(session_id),
                    acquire=self._try_acquire,
                )
                break
            except SessionBusyError:
                # Our own task may be between letting go of the lease and watching.
                if session_id not in self._tasks or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        _log.info("event.sent", session_id=session_id, name=name)
        wakeup = self._wakeups.get(session_id)
        if wakeup is not None:
            wakeup.set()
        elif (
            session_id not in self._tasks
            and session.status == "waiting"
            and not events.parked(session)
            and session.workflow in self._workflows
        ):
            self._spawn(session_id, retry_failed=False)

    @property
    def active(self) -> int:
        """Return how many sessions this runner is running or watching (a wait) now."""
        return len(self._tasks)

    @property
    def backlog(self) -> int:
        """Return how many sessions ``resume_all`` scheduled that wait for a free slot."""
        return len(self._backlog)

    async def close(self) -> None:
        """Cancel the steps in flight, then close the session manager and the store."""
        self._closing = True  # for good: a resume_all still walking starts nothing more
        self._backlog.clear()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._backlog.clear()
        await self.sessions.close()
