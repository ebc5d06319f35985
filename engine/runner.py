"""Runner: executes workflows, checkpoints after each step, resumes after a crash."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import pydantic_core
import tenacity as _t
from pydantic import ValidationError

from .errors import (
    EngineError,
    InvalidArgumentError,
    LeaseLostError,
    SerializationError,
    SessionBusyError,
    SessionCancelledError,
    SessionExistsError,
    SessionExpiredError,
    SessionNotFoundError,
    StepFailedError,
    StepTimeoutError,
    WorkflowDefinitionError,
    WorkflowMismatchError,
)
from .log import get_logger
from .models import (
    UNFINISHED,
    Checkpoint,
    Session,
    SessionStatus,
    ToolResult,
    TtlPolicy,
    to_seconds,
    utcnow,
)
from .sessions import ContextLike, MetadataLike, SessionManager
from .stores.base import DEFAULT_LEASE_TTL, Lease, Store, validate_session_id
from .workflow import Step, StepContext, Workflow

_log = get_logger()

DEFAULT_RUNNER_TTL = 7 * 24 * 3600.0
"""Workflow sessions may wait on people or outages: a week, unless told otherwise."""


@dataclass(frozen=True, slots=True)
class StepEvent:
    """What a hook hears about a step: it started, committed, or an attempt failed."""

    kind: Literal["started", "committed", "failed"]
    session_id: str
    workflow: str
    step: str
    index: int
    total: int
    attempt: int
    duration: float | None = None
    error: str | None = None


class _CommitFailedError(Exception):
    """Carries a store failure out of tenacity's retry loop, which must not retry it."""

    def __init__(self, store_error: EngineError) -> None:
        super().__init__(str(store_error))
        self.store_error = store_error


class RunnerHook(Protocol):
    """Called synchronously for every step event; keep it quick (a progress bar, a metric)."""

    def __call__(self, event: StepEvent, /) -> None: ...


class Runner:
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
        max_concurrency: most sessions this runner drives at once.
        lease_ttl: seconds a lease lasts; a heartbeat renews it every third of that.
        max_takeovers: how many runners in a row may die holding a session before it
            is parked as failed (a crash loop), instead of crashing runner after runner.
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
        hooks: Sequence[RunnerHook] = (),
    ) -> None:
        if max_concurrency < 1:
            raise InvalidArgumentError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.sessions = SessionManager(
            store,
            default_ttl=default_ttl,
            max_sessions=max_sessions,
            cleanup_interval=cleanup_interval,
            ttl_policy=ttl_policy,
        )
        self.store = store
        self.owner = str(uuid.uuid4())
        self.lease_ttl = to_seconds(lease_ttl)
        self.max_takeovers = max_takeovers
        self.hooks = tuple(hooks)
        self._workflows: dict[str, Workflow] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._slots = asyncio.Semaphore(max_concurrency)
        for workflow in workflows:
            self.register(workflow)

    async def __aenter__(self) -> Runner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

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
        session.workflow_version = workflow.version
        session.workflow_fingerprint = workflow.fingerprint
        session.workflow_source = workflow.source
        session.input = _to_json(input, f"the input of workflow {workflow.name!r}")
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

        Raises:
            StepFailedError: a step failed after its retries.
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
        one retries the step that failed, with a fresh retry budget.
        """
        task = self._tasks.get(validate_session_id(session_id)) or self._spawn(
            session_id, retry_failed=True
        )
        return await self._outcome(session_id, task)

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

    async def resume_all(self) -> list[str]:
        """Start every unexpired, unfinished session of a registered workflow.

        Returns at once with the ids scheduled; ``wait`` on each for its result.
        A session another runner holds is left to it (its ``wait`` here raises
        ``SessionBusyError``).
        """
        now = utcnow()
        started = []
        for row in await self.store.list():
            if row.problem is not None:
                _log.warning("resume.unreadable", session_id=row.id, problem=row.problem)
            elif (
                row.status in UNFINISHED
                and not row.is_expired(now)
                and row.workflow in self._workflows
            ):
                if row.id not in self._tasks:
                    self._spawn(row.id, retry_failed=False)
                started.append(row.id)
        return started

    async def cancel(self, session_id: str) -> None:
        """Stop a session: cancel its running step here, and mark it cancelled for good.

        Raises:
            SessionBusyError: another runner is running it.
        """
        task = self._tasks.get(validate_session_id(session_id))
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lease = await self._acquire(session_id)
        try:
            session = await self._load(session_id)
            if session.status not in ("completed", "cancelled"):
                await self._set_status(lease, session, "cancelled", error="cancelled")
                _log.info("session.cancelled", session_id=session_id)
        finally:
            await self.store.release(lease)

    async def close(self) -> None:
        """Cancel the steps in flight, then close the session manager and the store."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sessions.close()

    # -- driving one session ----------------------------------------------------

    def _spawn(self, session_id: str, *, retry_failed: bool) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(
            self._drive(session_id, retry_failed=retry_failed), name=f"stepvault-{session_id}"
        )
        self._tasks[session_id] = task
        task.add_done_callback(lambda done: self._forget(session_id, done))
        return task

    def _forget(self, session_id: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(session_id) is task:
            del self._tasks[session_id]
        if not task.cancelled() and isinstance(task.exception(), SessionBusyError):
            _log.debug("session.busy", session_id=session_id)

    async def _acquire(self, session_id: str) -> Lease:
        lease = await self.store.acquire(session_id, self.owner, ttl=self.lease_ttl)
        if lease is None:
            raise SessionBusyError(f"session {session_id} is being run by another runner")
        return lease

    async def _load(self, session_id: str) -> Session:
        session = await self.store.load(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        return session

    async def _drive(self, session_id: str, *, retry_failed: bool) -> Any:
        async with self._slots:
            lease = await self._acquire(session_id)
            lost: list[LeaseLostError] = []
            heartbeat = asyncio.get_running_loop().create_task(
                self._heartbeat(lease, asyncio.current_task(), lost)
            )
            try:
                session = await self._load(session_id)  # reread: the last owner may have moved on
                if lease.takeovers > self.max_takeovers and session.status in UNFINISHED:
                    await self._park_crash_loop(lease, session)
                return await self._continue(lease, session, retry_failed=retry_failed)
            except asyncio.CancelledError:
                if lost:  # cancelled by our heartbeat, not by a caller
                    raise lost[0] from None
                raise
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                await self.store.release(lease)

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

    async def _park_crash_loop(self, lease: Lease, session: Session) -> None:
        reason = (
            f"taken over {lease.takeovers} times: every runner that ran it stopped "
            "without letting go (a crash loop?); fix the cause, then resume it"
        )
        await self._set_status(lease, session, "failed", error=reason)
        workflow = self._workflows.get(session.workflow or "")
        in_flight = workflow.step_names[session.cursor] if workflow else ""
        raise StepFailedError(
            f"session {session.id} parked as failed: {reason}",
            session_id=session.id,
            step=in_flight,
        )

    def _workflow_for(self, session: Session) -> Workflow:
        workflow = self._workflows.get(session.workflow or "")
        if workflow is None:
            raise WorkflowMismatchError(
                f"session {session.id}: workflow {session.workflow!r} is not registered "
                "with this runner"
            )
        done, names = session.steps_done, workflow.step_names
        if names[: len(done)] != done:
            raise WorkflowMismatchError(
                f"session {session.id}: completed steps {done} are not the first steps "
                f"of workflow {workflow.name!r} version {workflow.version} ({names})"
            )
        return workflow

    async def _continue(self, lease: Lease, session: Session, *, retry_failed: bool) -> Any:
        if session.status == "cancelled":
            raise SessionCancelledError(f"session {session.id} was cancelled")
        if session.is_expired():
            raise SessionExpiredError(f"session {session.id} expired at {session.expires_at}")
        workflow = self._workflow_for(session)
        steps = workflow.steps
        if session.status == "failed" and not retry_failed:
            raise StepFailedError(
                f"session {session.id} failed: {session.error}; resume it to retry",
                session_id=session.id,
                step=steps[session.cursor].name,
            )
        outputs = {
            name: _restore(steps[index].output_adapter, session.outputs[name], session.id, name)
            for index, name in enumerate(session.steps_done)
        }
        if session.status == "completed":
            return outputs[steps[-1].name] if outputs else None
        if session.status != "running":
            # A failed session gets a fresh retry budget for the step that failed;
            # attempt numbers keep counting, so the history reads in order.
            failed = steps[session.cursor].name
            fresh = {failed: session.attempts.get(failed, 0)} if session.status == "failed" else {}
            await self._commit(lease, session, status="running", retry_base=fresh)
        value = (
            outputs[session.steps_done[-1]]
            if session.steps_done
            else _restore(steps[0].input_adapter, session.input, session.id, "input")
        )
        for index in range(session.cursor, len(steps)):
            value = await self._run_step(lease, session, workflow, index, value, outputs)
            outputs[steps[index].name] = value
        return value

    async def _run_step(
        self,
        lease: Lease,
        session: Session,
        workflow: Workflow,
        index: int,
        value: Any,
        outputs: Mapping[str, Any],
    ) -> Any:
        step = workflow.steps[index]
        is_last = index == len(workflow.steps) - 1
        attempt = session.attempts.get(step.name, 0)
        remaining = step.retries + 1 - (attempt - session.retry_base.get(step.name, 0))
        digest = _digest(value, session.id, step.name)
        last_error: BaseException | None = None
        retrying = _t.AsyncRetrying(
            stop=_t.stop_after_attempt(max(remaining, 1)),
            wait=_t.wait_exponential_jitter(
                multiplier=step.backoff, max=step.max_backoff, jitter=step.backoff
            ),
            retry=_t.retry_if_exception_type(step.retry_on)
            & _t.retry_if_not_exception_type(_CommitFailedError),
            reraise=True,
        )
        try:
            if remaining <= 0:  # the budget was spent before a crash: do not loop forever
                raise StepFailedError(
                    f"step {step.name!r} used all {step.retries + 1} attempts",
                    session_id=session.id,
                    step=step.name,
                )
            async for trial in retrying:
                with trial:
                    attempt += 1
                    state = copy.deepcopy(session.state)
                    started_at, started = utcnow(), time.perf_counter()
                    self._emit("started", session, workflow, index, attempt)
                    log = _log.bind(
                        session_id=session.id,
                        workflow=workflow.name,
                        step=step.name,
                        attempt=attempt,
                    )
                    log.debug("step.started")
                    ctx = StepContext(
                        session_id=session.id,
                        workflow=workflow.name,
                        step=step.name,
                        attempt=attempt,
                        state=state,
                        input=value,
                        outputs=outputs,
                        metadata=session.metadata,
                        context=session.context,
                        log=log,
                    )
                    try:
                        output = await _call(step, ctx, value)
                    except Exception as exc:
                        last_error = exc
                        duration = time.perf_counter() - started
                        error = f"{type(exc).__name__}: {exc}"
                        try:
                            await self._commit(
                                lease,
                                session,
                                status="running",
                                attempts={step.name: attempt},
                                tool_results=[
                                    _result(step, attempt, digest, started_at, duration, error)
                                ],
                            )
                        except EngineError as store_error:
                            raise _CommitFailedError(store_error) from store_error
                        log.warning("step.failed", error=error, duration_ms=_ms(duration))
                        self._emit("failed", session, workflow, index, attempt, duration, error)
                        raise
        except _CommitFailedError as exc:
            raise exc.store_error from None  # the store failed, not the step: not retried
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            await self._set_status(lease, session, "failed", error=f"step {step.name!r}: {error}")
            raise StepFailedError(
                f"session {session.id}: step {step.name!r} failed after {attempt} "
                f"attempt(s): {error}",
                session_id=session.id,
                step=step.name,
            ) from (last_error or exc)

        duration = time.perf_counter() - started
        stored_output = _to_json(output, f"the output of step {step.name!r}")
        state_set, state_unset = _state_changes(session.state, ctx.state, step.name)
        await self._commit(
            lease,
            session,
            status="completed" if is_last else "running",
            step=step.name,
            output=stored_output,
            state_set=state_set,
            state_unset=state_unset,
            attempts={step.name: attempt},
            tool_results=[_result(step, attempt, digest, started_at, duration, None)],
        )
        _log.info(
            "step.committed",
            session_id=session.id,
            workflow=workflow.name,
            step=step.name,
            attempt=attempt,
            duration_ms=_ms(duration),
        )
        self._emit("committed", session, workflow, index, attempt, duration)
        return output

    async def _commit(self, lease: Lease, session: Session, **changes: Any) -> None:
        now = utcnow()
        checkpoint = Checkpoint(
            revision=session.revision + 1,
            last_activity=now,
            expires_at=session.expiry_after(now),
            **changes,
        )
        await self.store.commit(lease, checkpoint)
        session.apply(checkpoint)

    async def _set_status(
        self,
        lease: Lease,
        session: Session,
        status: SessionStatus,
        *,
        error: str | None = None,
    ) -> None:
        await self._commit(lease, session, status=status, error=error)

    def _emit(
        self,
        kind: Literal["started", "committed", "failed"],
        session: Session,
        workflow: Workflow,
        index: int,
        attempt: int,
        duration: float | None = None,
        error: str | None = None,
    ) -> None:
        if not self.hooks:
            return
        event = StepEvent(
            kind=kind,
            session_id=session.id,
            workflow=workflow.name,
            step=workflow.steps[index].name,
            index=index,
            total=len(workflow.steps),
            attempt=attempt,
            duration=duration,
            error=error,
        )
        for hook in self.hooks:
            try:
                hook(event)
            except Exception as exc:  # a broken progress bar must not fail the workflow
                _log.warning("hook.failed", hook=repr(hook), error=str(exc))


async def _call(step: Step, ctx: StepContext, value: Any) -> Any:
    """Run one attempt: async steps on the loop, sync steps in a worker thread."""
    try:
        async with asyncio.timeout(step.timeout):
            if step.is_async:
                return await step.fn(ctx, value)
            return await asyncio.to_thread(step.fn, ctx, value)
    except TimeoutError as exc:
        if isinstance(exc, StepTimeoutError):
            raise
        raise StepTimeoutError(
            f"step {step.name!r} attempt {ctx.attempt} timed out after {step.timeout}s"
        ) from None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _to_json(value: Any, what: str) -> Any:
    """Convert ``value`` to plain JSON data, or say clearly what cannot be stored."""
    try:
        return pydantic_core.to_jsonable_python(value)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from None


def _restore(adapter: Any, stored: Any, session_id: str, name: str) -> Any:
    try:
        return adapter.validate_python(stored)
    except ValidationError as exc:
        raise WorkflowMismatchError(
            f"session {session_id}: stored value of {name!r} no longer fits its type: {exc}"
        ) from None


def _digest(value: Any, session_id: str, step: str) -> str:
    data = pydantic_core.to_json(_to_json(value, f"the input of step {step!r}"))
    return hashlib.sha256(data).hexdigest()[:32]


def _state_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], step: str
) -> tuple[dict[str, Any], list[str]]:
    """Return the top-level keys a step set or removed, as JSON: the state's delta."""
    changed = {
        key: value for key, value in after.items() if key not in before or before[key] != value
    }
    removed = [key for key in before if key not in after]
    return _to_json(changed, f"the state set by step {step!r}"), removed


def _result(
    step: Step,
    attempt: int,
    digest: str,
    started_at: Any,
    duration: float,
    error: str | None,
) -> ToolResult:
    return ToolResult(
        name=step.name,
        step=step.name,
        attempt=attempt,
        input_digest=digest,
        error=error,
        started_at=started_at,
        finished_at=utcnow(),
        duration=duration,
    )
