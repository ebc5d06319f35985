"""Declaring workflows: ordered step functions, their options and their context."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

import structlog
from pydantic import TypeAdapter

from .errors import InvalidArgumentError, WorkflowDefinitionError
from .log import get_logger
from .models import SessionContext, SessionMetadata, WorkflowStamp, to_seconds

FailurePolicy = Literal["fail", "park"]
"""What a step that still fails after its retries does to its session: mark it
``failed``, or ``park`` it (status ``waiting``) until an operator resumes, skips or
cancels it."""
FAILURE_POLICIES: tuple[str, ...] = ("fail", "park")

_P = ParamSpec("_P")
_R = TypeVar("_R")


class StepRecorder(Protocol):
    """The runner's side of ``ctx.tool``, ``ctx.wait_for_event`` and ``ctx.sleep``."""

    async def tool(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run or replay one journaled call."""
        ...

    async def wait_for_event(self, name: str, timeout: float | None) -> Any:  # noqa: ASYNC109
        """Return the payload of the next event named ``name``, suspending until it comes."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep durably: the end time survives a restart."""
        ...


class StepContext:
    """What a running step can see and change.

    ``state`` is the session's state: changes made to it are committed atomically
    with the step's output, and discarded if the attempt fails.

    ``tool``, ``wait_for_event`` and ``sleep`` are journaled: each finished call is
    committed at once, and when the step runs again (after a crash, a retry or a
    wait) it gets the recorded result instead of calling again. They are
    coroutines, for async steps.
    """

    __slots__ = (
        "_log",
        "_recorder",
        "_stopped",
        "attempt",
        "context",
        "idempotency_key",
        "input",
        "metadata",
        "outputs",
        "session_id",
        "state",
        "step",
        "workflow",
    )

    def __init__(
        self,
        *,
        session_id: str,
        workflow: str,
        step: str,
        attempt: int,
        state: dict[str, Any],
        input: Any,
        outputs: Mapping[str, Any],
        metadata: SessionMetadata,
        context: SessionContext,
        log: structlog.stdlib.BoundLogger | None = None,
        recorder: StepRecorder | None = None,
    ) -> None:
        self._recorder = recorder
        self._stopped = False
        self.session_id = session_id
        self.workflow = workflow
        self.step = step
        self.attempt = attempt
        self.state = state
        self.input = input
        self.outputs = outputs
        self.metadata = metadata
        self.context = context
        self.idempotency_key = f"{session_id}:{step}"
        self._log = log

    def __repr__(self) -> str:
        return f"StepContext({self.session_id!r}, step={self.step!r}, attempt={self.attempt})"

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """The engine's logger, with this attempt's session, workflow, step and attempt bound.

        Bound on first use: most steps never log, and binding costs on every attempt.
        """
        if self._log is None:
            self._log = get_logger(
                session_id=self.session_id,
                workflow=self.workflow,
                step=self.step,
                attempt=self.attempt,
            )
        return self._log

    @property
    def cancelled(self) -> bool:
        """Tell whether this attempt was cancelled or timed out.

        An async step is stopped by ``asyncio`` cancellation; a sync step runs in a
        thread Python cannot stop, so a long one should check this and return early.
        """
        return self._stopped

    def mark_cancelled(self) -> None:
        """Set ``cancelled``; the runner calls it when it stops or times out the attempt."""
        self._stopped = True  # one store: atomic, and read by the step's own thread

    def _journal(self) -> StepRecorder:
        if self._recorder is None:
            raise InvalidArgumentError(
                f"step {self.step!r}: ctx.tool, ctx.wait_for_event and ctx.sleep work only "
                "inside a step a Runner runs"
            )
        return self._recorder

    @overload
    async def tool(
        self, name: str, fn: Callable[_P, Awaitable[_R]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R: ...

    @overload
    async def tool(
        self, name: str, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _R: ...

    async def tool(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` as a recorded tool call, at most once per call.

        The call is recorded as a ToolResult named ``name`` (input digest, output,
        duration, error). Its result is committed as soon as it returns, so if the
        step runs again, the same call (same name, same arguments, same position
        among such calls) returns the recorded result without calling ``fn``. The
        result comes back as ``fn``'s return annotation (JSON data without one), the
        first time as on a replay. Arguments and result must be JSON-serializable.
        A sync ``fn`` runs in a worker thread. A call that raises is recorded and
        raised; it runs again when the step is retried.
        """
        return await self._journal().tool(name, fn, args, kwargs)

    async def wait_for_event(
        self,
        name: str,
        *,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 (the contract's name; it is durable)
    ) -> Any:
        """Return the payload of the next event named ``name`` sent to this session.

        An event already sent (even before the step began) is taken at once. If none
        is there, the session is suspended durably (status ``waiting``) and this
        step runs again from its start when the event arrives: its journaled calls
        are replayed, and this wait returns the payload.

        Raises:
            StepTimeoutError: ``timeout`` seconds passed (counted from the first
                time this wait was reached, across restarts) without the event.
        """
        seconds = None if timeout is None else to_seconds(timeout)
        return await self._journal().wait_for_event(name, seconds)

    async def sleep(self, seconds: float | timedelta) -> None:
        """Sleep durably: after a restart the step sleeps only for what is left.

        A long sleep suspends the session (status ``waiting``, no worker held) and
        runs the step again from its start when it ends.
        """
        await self._journal().sleep(to_seconds(seconds))


StepFn = TypeVar("StepFn", bound=Callable[[StepContext, Any], Any])


@dataclass(frozen=True)
class Step:
    """One declared step and its options, validated once at decoration time."""

    name: str
    fn: Callable[[StepContext, Any], Any]
    retries: int = 0
    timeout: float | None = None
    backoff: float = 0.5
    max_backoff: float = 30.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    on_failure: FailurePolicy | None = None
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.fn))

    @cached_property
    def _hints(self) -> dict[str, Any]:
        # Resolved lazily: with `from __future__ import annotations` a step may name a
        # class defined further down its module.
        try:
            return typing.get_type_hints(self.fn)
        except Exception as exc:
            raise WorkflowDefinitionError(
                f"step {self.name!r}: cannot resolve its type annotations: {exc}"
            ) from exc

    @cached_property
    def output_adapter(self) -> TypeAdapter[Any]:
        """Validate stored JSON back into the step's declared return type."""
        return TypeAdapter(self._hints.get("return", Any))

    @cached_property
    def input_adapter(self) -> TypeAdapter[Any]:
        """Validate stored JSON back into the type of the step's ``value`` parameter."""
        params = list(inspect.signature(self.fn).parameters)
        return TypeAdapter(self._hints.get(params[1], Any) if len(params) > 1 else Any)

    @property
    def output_type(self) -> str:
        """Name the declared return type, for the workflow's fingerprint."""
        hint = self._hints.get("return", Any)
        return hint.__name__ if isinstance(hint, type) else repr(hint)


MigrationFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Migration:
    """Upgrades the state of sessions started under ``from_version`` to ``to_version``."""

    from_version: str
    to_version: str
    fn: MigrationFn


def _check_policy(on_failure: object) -> None:
    if on_failure not in FAILURE_POLICIES:
        raise WorkflowDefinitionError(
            f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}"
        )


class Workflow:
    """A named, versioned, ordered list of steps.

    Example::

        wf = Workflow("report", version="1")

        @wf.step
        async def fetch(ctx: StepContext, query: str) -> list[str]: ...

    Args:
        name: what sessions record to find this workflow again.
        version: recorded in each session; migrations upgrade old versions' state.
        on_failure: ``"fail"`` (default) or ``"park"``, for steps that set none.
    """

    def __init__(
        self, name: str, *, version: str = "1", on_failure: FailurePolicy = "fail"
    ) -> None:
        if not name or not isinstance(name, str):
            raise WorkflowDefinitionError("a workflow needs a non-empty name")
        _check_policy(on_failure)
        self.name = name
        self.version = str(version)
        self.on_failure: FailurePolicy = on_failure
        self._steps: tuple[Step, ...] = ()
        self._positions: dict[str, int] = {}
        self._migrations: dict[str, Migration] = {}
        self._stamp: tuple[tuple[Step, ...], str, WorkflowStamp] | None = None

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, version={self.version!r}, steps={self.step_names})"

    @property
    def steps(self) -> tuple[Step, ...]:
        """Return the steps in the order they run (read on every step: never copied)."""
        return self._steps

    @property
    def step_names(self) -> list[str]:
        """Return the step names in the order they run."""
        return [step.name for step in self._steps]

    @property
    def source(self) -> str | None:
        """Return the file declaring this workflow, so a command line can import it again."""
        if not self._steps:
            return None
        module = sys.modules.get(self._steps[0].fn.__module__)
        file = getattr(module, "__file__", None)
        return os.path.abspath(file) if file else None

    @property
    def shape(self) -> list[tuple[str, str]]:
        """Return ``(name, output type)`` per step, in order: what sessions must still fit."""
        return list(self.stamp.shape)

    @property
    def fingerprint(self) -> str:
        """Hash the step list (names, order, output types): it changes when the shape does."""
        return self.stamp.fingerprint

    @property
    def stamp(self) -> WorkflowStamp:
        """Return the version and shape a session records when this code runs it.

        Made once per step list and version: every run and resume asks for it, and
        it costs a pass over the steps (a 10,000-step workflow is not rare).
        """
        made = self._stamp
        if made is not None and made[0] is self._steps and made[1] == self.version:
            return made[2]
        shape = [(step.name, step.output_type) for step in self._steps]
        fingerprint = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
        stamp = WorkflowStamp(version=self.version, fingerprint=fingerprint, shape=shape)
        self._stamp = (self._steps, self.version, stamp)
        return stamp

    def failure_policy(self, step: Step) -> FailurePolicy:
        """Return what a failure of ``step`` does: its own policy, else the workflow's."""
        return step.on_failure or self.on_failure

    def migration(
        self, *, from_version: str, to_version: str | None = None
    ) -> Callable[[MigrationFn], MigrationFn]:
        """Register a function upgrading the state of sessions started under an old version.

        The function gets a copy of the session's state and returns the new state.
        On resume, a session recorded under ``from_version`` goes through every
        migration from its version on, in a chain, before its next step runs.

        Args:
            from_version: the version whose sessions the function upgrades.
            to_version: the version it upgrades them to (default: this workflow's).

        Raises:
            WorkflowDefinitionError: a second migration from the same version, or one
                from a version to itself.
        """
        source, target = str(from_version), str(to_version or self.version)
        if source == target:
            raise WorkflowDefinitionError(f"a migration from version {source} to itself")
        if source in self._migrations:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} already has a migration from version {source}"
            )

        def register(fn: MigrationFn) -> MigrationFn:
            if not callable(fn):
                raise WorkflowDefinitionError(f"migration from version {source} is not callable")
            self._migrations[source] = Migration(source, target, fn)
            return fn

        return register

    def migration_path(self, version: str | None) -> list[Migration]:
        """Return the migrations that lead a session from ``version`` on, in order."""
        path: list[Migration] = []
        seen: set[str] = set()
        while version is not None and version != self.version and version not in seen:
            seen.add(version)
            found = self._migrations.get(version)
            if found is None:
                break
            path.append(found)
            version = found.to_version
        return path

    def index(self, step_name: str) -> int:
        """Return the position of a step by name."""
        position = self._positions.get(step_name)
        if position is not None:
            return position
        raise WorkflowDefinitionError(f"workflow {self.name!r} has no step {step_name!r}")

    @overload
    def step(self, fn: StepFn, /) -> StepFn: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | timedelta | None = None,
        backoff: float | timedelta = 0.5,
        max_backoff: float | timedelta = 30.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        on_failure: FailurePolicy | None = None,
    ) -> Callable[[StepFn], StepFn]: ...

    def step(
        self,
        fn: Callable[[StepContext, Any], Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | timedelta | None = None,
        backoff: float | timedelta = 0.5,
        max_backoff: float | timedelta = 30.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        on_failure: FailurePolicy | None = None,
    ) -> Any:
        """Declare a step, bare (``@wf.step``) or with options (``@wf.step(retries=3)``).

        Args:
            name: the step's name; defaults to the function's name.
            retries: how many times to retry after a failed attempt (0: one attempt).
            timeout: the limit for one attempt, in seconds or as a timedelta.
            backoff: the first wait between attempts; it doubles, with jitter.
            max_backoff: the longest wait between attempts.
            retry_on: the exception types worth retrying; others fail at once.
            on_failure: ``"fail"`` or ``"park"`` once retries are spent (default: the
                workflow's policy).

        Raises:
            WorkflowDefinitionError: a duplicate name, a bad option, or a function
                that does not take ``(ctx, value)``.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise WorkflowDefinitionError(f"retries must be a whole number >= 0, got {retries!r}")
        retry_types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        if not retry_types or not all(
            isinstance(kind, type) and issubclass(kind, BaseException) for kind in retry_types
        ):
            raise WorkflowDefinitionError(f"retry_on must be exception types, got {retry_on!r}")
        if on_failure is not None:
            _check_policy(on_failure)
        try:
            timeout_s = None if timeout is None else to_seconds(timeout)
            backoff_s, max_backoff_s = to_seconds(backoff), to_seconds(max_backoff)
        except InvalidArgumentError as exc:
            raise WorkflowDefinitionError(f"bad step option: {exc}") from None

        def register(func: StepFn) -> StepFn:
            step = Step(
                name or func.__name__,
                func,
                retries=retries,
                timeout=timeout_s,
                backoff=backoff_s,
                max_backoff=max_backoff_s,
                retry_on=retry_types,
                on_failure=on_failure,
            )
            self._add(step)
            return func

        return register if fn is None else register(fn)

    def _add(self, step: Step) -> None:
        if not callable(step.fn):
            raise WorkflowDefinitionError(f"step {step.name!r} is not callable")
        try:
            inspect.signature(step.fn).bind(None, None)
        except TypeError:
            raise WorkflowDefinitionError(
                f"step {step.name!r} must accept two positional arguments (ctx, value)"
            ) from None
        if step.name in self._positions:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} already has a step named {step.name!r}"
            )
        self._positions[step.name] = len(self._steps)
        self._steps = (*self._steps, step)
