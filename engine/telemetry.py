"""OpenTelemetry tracing for runners: one span per session run, one per step attempt.

Plug it in as a hook; it needs the ``otel`` extra (``pip install 'stepvault[otel]'``)::

    from engine.telemetry import TracingHook

    async with Runner(store, workflows=[wf], hooks=[TracingHook()]) as runner:
        await runner.run(wf, "input")

A session run is the time a runner drives one session, from its first step
attempt to the moment the runner lets go of it (completed, failed, cancelled or
stopped); its span is a child of whatever span was current where the session was
started or resumed (a web request, a job). Each step attempt is a child span of
its session run, current while the step runs, so spans the step's own code opens
(an HTTP call, a query) nest under it. Attributes: ``stepvault.session_id``,
``stepvault.workflow``, ``stepvault.step``, ``stepvault.attempt`` (namespaced, as
OpenTelemetry asks of libraries).
"""

from __future__ import annotations

import asyncio
import functools
from contextvars import Token
from dataclasses import dataclass

from .integrations import MissingExtraError
from .runner import StepEvent

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
except ImportError as exc:
    raise MissingExtraError.naming("otel", "engine.telemetry", exc) from exc

__all__ = ["ATTEMPT", "SESSION_ID", "STEP", "WORKFLOW", "TracingHook"]

SESSION_ID = "stepvault.session_id"
WORKFLOW = "stepvault.workflow"
STEP = "stepvault.step"
ATTEMPT = "stepvault.attempt"
STEP_INDEX = "stepvault.step_index"
OUTCOME = "stepvault.outcome"


@dataclass
class _Run:
    """One session run as traced: its span, the attempt in flight, the task driving it."""

    span: Span
    task: asyncio.Task[object] | None
    attempt: Span | None = None
    token: Token[Context] | None = None


class TracingHook:
    """A runner hook that traces session runs and step attempts with OpenTelemetry.

    Args:
        tracer_provider: where spans go; default: the global provider.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("stepvault", tracer_provider=tracer_provider)
        self._runs: dict[str, _Run] = {}

    def __call__(self, event: StepEvent) -> None:
        """Open, close or annotate spans for one step event."""
        run = self._runs.get(event.session_id) or self._open(event)
        if event.kind == "started":
            self._end_attempt(run, outcome="interrupted")  # one that stopped unheard of
            run.attempt = self._tracer.start_span(
                f"step {event.step}",
                context=trace.set_span_in_context(run.span),
                attributes={
                    SESSION_ID: event.session_id,
                    WORKFLOW: event.workflow,
                    STEP: event.step,
                    ATTEMPT: event.attempt,
                    STEP_INDEX: event.index,
                },
            )
            if run.task is not None and asyncio.current_task() is run.task:
                run.token = otel_context.attach(trace.set_span_in_context(run.attempt))
        elif event.kind == "committed":
            self._end_attempt(run, outcome="committed", ok=True)
            if run.task is None and event.index == event.total - 1:
                self._close(event.session_id, run, None)  # no task to tell us: last step
        elif event.kind == "failed":
            self._end_attempt(run, outcome="failed", error=event.error)
        else:  # retrying: the next attempt starts after a delay
            run.span.add_event(
                "step.retrying",
                {STEP: event.step, ATTEMPT: event.attempt, "stepvault.delay": event.delay or 0.0},
            )

    def _open(self, event: StepEvent) -> _Run:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # called outside an event loop
            task = None
        span = self._tracer.start_span(
            f"session {event.workflow}",
            attributes={
                SESSION_ID: event.session_id,
                WORKFLOW: event.workflow,
                STEP_INDEX: event.index,  # where this run started
            },
        )
        run = self._runs[event.session_id] = _Run(span, task)
        if task is not None:
            # The runner drives each session in its own task: when it ends, so does the run.
            task.add_done_callback(functools.partial(self._close, event.session_id, run))
        return run

    def _end_attempt(
        self, run: _Run, *, outcome: str, ok: bool = False, error: str | None = None
    ) -> None:
        attempt, token = run.attempt, run.token
        run.attempt = run.token = None
        if token is not None and asyncio.current_task() is run.task:
            otel_context.detach(token)
        if attempt is None:
            return
        attempt.set_attribute(OUTCOME, outcome)
        if ok:
            attempt.set_status(Status(StatusCode.OK))
        elif error is not None:
            attempt.set_status(Status(StatusCode.ERROR, error))
        attempt.end()

    def _close(self, session_id: str, run: _Run, task: asyncio.Task[object] | None) -> None:
        if self._runs.get(session_id) is run:
            del self._runs[session_id]
        error: BaseException | None = None
        if task is not None and task.cancelled():
            outcome = "cancelled"
        elif task is not None and task.exception() is not None:
            error = task.exception()
            outcome = "failed"
        else:
            outcome = "finished"
        self._end_attempt(run, outcome=outcome, error=None if error is None else str(error))
        run.span.set_attribute(OUTCOME, outcome)
        if error is not None:
            run.span.record_exception(error)
            run.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        elif outcome == "finished":
            run.span.set_status(Status(StatusCode.OK))
        run.span.end()
