"""Running one step: attempts with retries and timeouts, then its checkpoint.

Every attempt is a ToolResult in the session's history, committed when it ends, so
the attempt count survives a restart. Tenacity drives the retries (backoff doubling
from ``backoff``, with jitter, up to ``max_backoff``); a step that still fails is
marked ``failed`` or parked for an operator, as its failure policy says.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, cast

import tenacity as _t

from .errors import EngineError, SerializationError, StepFailedError, StepTimeoutError
from .journal import InFlight, SessionWriter, StepJournal, Suspended
from .log import enabled, get_logger
from .models import StateUndo, ToolResult, Wait, utcnow
from .values import digest, state_changes, to_json
from .workflow import Step, StepContext, Workflow

_log = get_logger()

EventKind = Literal["started", "committed", "failed", "retrying"]


@dataclass(frozen=True, slots=True)
class StepEvent:
    """What a hook hears about a step.

    ``started``: an attempt began. ``committed``: the step's checkpoint is durable.
    ``failed``: an attempt failed (``error``). ``retrying``: the next attempt starts
    in ``delay`` seconds.
    """

    kind: EventKind
    session_id: str
    workflow: str
    step: str
    index: int
    total: int
    attempt: int
    duration: float | None = None
    error: str | None = None
    delay: float | None = None


Emit = Callable[[StepEvent], None]


class _CommitFailedError(Exception):
    """Carries a store failure out of tenacity's retry loop, which must not retry it."""

    def __init__(self, store_error: EngineError) -> None:
        super().__init__(str(store_error))
        self.store_error = store_error


# Never retried, whatever retry_on says: pauses, stops, and errors of the engine itself.
_NEVER_RETRIED = (_CommitFailedError, Suspended, asyncio.CancelledError, SerializationError)


async def run_step(
    writer: SessionWriter,
    workflow: Workflow,
    index: int,
    value: Any,
    outputs: Mapping[str, Any],
    *,
    emit: Emit | None,
    inline_wait: float,
) -> Any:
    """Run step ``index`` of ``workflow`` to its committed output.

    Raises:
        StepFailedError: it still failed after its retries (the session is now
            ``failed``, or ``waiting`` for an operator if parked).
        SerializationError: a value it made is not JSON; its checkpoint is not written.
        Suspended: it waits for an event or a long sleep (already committed).
    """
    run = _StepRun(writer, workflow, index, value, outputs, emit, inline_wait)
    return await run.commit(await run.attempts())


@dataclass(slots=True)
class _Success:
    """A successful attempt, until its checkpoint is committed."""

    ctx: StepContext
    output: Any
    started_at: datetime
    duration: float


class _StepRun:
    """One step of one session, from its first attempt to its checkpoint."""

    def __init__(
        self,
        writer: SessionWriter,
        workflow: Workflow,
        index: int,
        value: Any,
        outputs: Mapping[str, Any],
        emit: Emit | None,
        inline_wait: float,
    ) -> None:
        self.writer = writer
        self.session = writer.session
        self.workflow = workflow
        self.index = index
        self.step = workflow.steps[index]
        self.value = value
        self.outputs = outputs
        self.emit = emit
        self.inline_wait = inline_wait
        self.attempt = self.session.attempts.get(self.step.name, 0)
        self.input_digest = digest(value, f"the input of step {self.step.name!r}")
        self.last_error: BaseException | None = None

    def tell(self, kind: EventKind, **fields: Any) -> None:
        """Tell the hooks, if there are any (most runs have none: build nothing)."""
        if self.emit is None:
            return
        self.emit(
            StepEvent(
                kind=kind,
                session_id=self.session.id,
                workflow=self.workflow.name,
                step=self.step.name,
                index=self.index,
                total=len(self.workflow.steps),
                attempt=self.attempt,
                **fields,
            )
        )

    async def attempts(self) -> _Success:
        """Make attempts until one succeeds or the budget is spent (then fail or park)."""
        step, session = self.step, self.session
        used = self.attempt - session.retry_base.get(step.name, 0)
        remaining = step.retries + 1 - used
        try:
            if remaining <= 0:  # the budget was spent before a crash: do not loop forever
                raise StepFailedError(
                    f"step {step.name!r} used all {step.retries + 1} attempts",
                    session_id=session.id,
                    step=step.name,
                )
            if remaining == 1:  # one attempt left (a bare step): nothing to retry
                return await self.attempt_once()
            async for trial in self.retrying(remaining):
                with trial:
                    done = await self.attempt_once()
            return done  # the loop ends only after an attempt succeeded
        except _CommitFailedError as exc:
            raise exc.store_error from None  # the store failed, not the step: not retried
        except SerializationError:
            raise  # a value the engine cannot store: fix the code; the session keeps its place
        except Exception as exc:
            await self.give_up(exc)

    def retrying(self, attempts: int) -> _t.AsyncRetrying:
        """Return tenacity's loop for ``attempts`` more attempts of this step."""
        step = self.step

        def before_sleep(state: _t.RetryCallState) -> None:
            delay = state.next_action.sleep if state.next_action else 0.0
            self.tell("retrying", delay=delay)

        return _t.AsyncRetrying(
            stop=_t.stop_after_attempt(attempts),
            wait=_t.wait_exponential_jitter(
                multiplier=step.backoff, max=step.max_backoff, jitter=step.backoff
            ),
            retry=_t.retry_if_exception_type(step.retry_on)
            & _t.retry_if_not_exception_type(_NEVER_RETRIED),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def attempt_once(self) -> _Success:
        """Run one attempt; a failed one is committed (the count survives a crash) and raised."""
        step, session, writer = self.step, self.session, self.writer
        self.attempt += 1
        started_at, started = utcnow(), time.perf_counter()
        writer.in_flight = InFlight(step.name, self.attempt, self.input_digest, started_at, started)
        self.tell("started")
        ctx = StepContext(
            session_id=session.id,
            workflow=self.workflow.name,
            step=step.name,
            attempt=self.attempt,
            state=copy.deepcopy(session.state) if session.state else {},
            input=self.value,
            outputs=self.outputs,
            metadata=session.metadata,
            context=session.context,
            recorder=StepJournal(writer, step.name, self.attempt, inline_wait=self.inline_wait),
        )
        if enabled(logging.DEBUG):
            ctx.log.debug("step.started")
        try:
            output = await call_step(step, ctx, self.value)
        except Suspended:
            writer.in_flight = None
            raise
        except Exception as exc:
            self.last_error = exc
            writer.in_flight = None
            duration = time.perf_counter() - started
            error = f"{type(exc).__name__}: {exc}"
            failed = self.record(started_at, duration, error)
            try:
                await writer.commit(
                    status="running", attempts={step.name: self.attempt}, tool_results=[failed]
                )
            except EngineError as store_error:
                raise _CommitFailedError(store_error) from store_error
            ctx.log.warning("step.failed", error=error, duration_ms=_ms(duration))
            self.tell("failed", duration=duration, error=error)
            raise
        writer.in_flight = None
        return _Success(ctx, output, started_at, time.perf_counter() - started)

    async def commit(self, done: _Success) -> Any:
        """Commit the step's checkpoint: output, state delta and its undo, the attempt."""
        step, before = self.step, self.session.state
        stored_output = to_json(done.output, f"the output of step {step.name!r}")
        state_set, state_unset = state_changes(before, done.ctx.state, f"step {step.name!r}")
        undo = None  # most steps change no state: nothing to take back
        if state_set or state_unset:
            undo = StateUndo(
                restore={k: before[k] for k in [*state_set, *state_unset] if k in before},
                remove=[k for k in state_set if k not in before],
            )
        await self.writer.commit(
            status="completed" if self.index == len(self.workflow.steps) - 1 else "running",
            step=step.name,
            output=stored_output,
            state_set=state_set,
            state_unset=state_unset,
            undo=undo,
            attempts={step.name: self.attempt},
            tool_results=[self.record(done.started_at, done.duration, None)],
        )
        if enabled(logging.INFO):
            _log.info(
                "step.committed",
                session_id=self.session.id,
                workflow=self.workflow.name,
                step=step.name,
                attempt=self.attempt,
                duration_ms=_ms(done.duration),
            )
        self.tell("committed", duration=done.duration)
        return done.output

    async def give_up(self, exc: Exception) -> NoReturn:
        """Fail or park the session after the step's last attempt, then raise."""
        step, session, writer = self.step, self.session, self.writer
        error = f"step {step.name!r}: {type(exc).__name__}: {exc}"
        message = (
            f"session {session.id}: step {step.name!r} failed after {self.attempt} "
            f"attempt(s): {exc}"
        )
        if self.workflow.failure_policy(step) == "park":
            wait = Wait(kind="operator", step=step.name, reason=error)
            await writer.commit(status="waiting", error=error, wait=wait)
            message += (
                "; parked: an operator may resume it, skip the step with an output, or cancel it"
            )
        else:
            await writer.commit(status="failed", error=error)
        raise StepFailedError(message, session_id=session.id, step=step.name) from (
            self.last_error or exc
        )

    def record(self, started_at: datetime, duration: float, error: str | None) -> ToolResult:
        """Return the ToolResult of the current attempt."""
        return ToolResult(
            name=self.step.name,
            step=self.step.name,
            attempt=self.attempt,
            input_digest=self.input_digest,
            error=error,
            started_at=started_at,
            finished_at=utcnow(),
            duration=round(duration, 6),  # the clock says no more; fewer bytes stored
        )


async def call_step(step: Step, ctx: StepContext, value: Any) -> Any:
    """Run one attempt: async steps on the loop, sync steps in a worker thread."""
    try:
        if step.timeout is None:  # most steps: no timer to arm
            return await _attempt(step, ctx, value)
        timer = asyncio.timeout(step.timeout)
        try:
            async with timer:
                return await _attempt(step, ctx, value)
        except TimeoutError:
            if not timer.expired():
                raise  # the step's own TimeoutError, not our limit
            ctx.mark_cancelled()  # a sync step still runs in its thread: tell it to stop
            raise StepTimeoutError(
                f"step {step.name!r} attempt {ctx.attempt} timed out after {step.timeout}s"
            ) from None
    except asyncio.CancelledError:
        ctx.mark_cancelled()
        raise


def _attempt(step: Step, ctx: StepContext, value: Any) -> Awaitable[Any]:
    if step.is_async:
        return cast(Awaitable[Any], step.fn(ctx, value))
    return asyncio.to_thread(step.fn, ctx, value)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
