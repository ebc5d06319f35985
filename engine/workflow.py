"""Declaring workflows: ordered step functions, their options and their context."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar, overload

import structlog
from pydantic import TypeAdapter

from .errors import InvalidArgumentError, WorkflowDefinitionError
from .models import SessionContext, SessionMetadata, to_seconds


class StepContext:
    """What a running step can see and change.

    ``state`` is the session's state: changes made to it are committed atomically
    with the step's output, and discarded if the attempt fails.
    """

    __slots__ = (
        "attempt",
        "context",
        "idempotency_key",
        "input",
        "log",
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
        log: structlog.stdlib.BoundLogger,
    ) -> None:
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
        self.log = log

    def __repr__(self) -> str:
        return f"StepContext({self.session_id!r}, step={self.step!r}, attempt={self.attempt})"


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


class Workflow:
    """A named, versioned, ordered list of steps.

    Example::

        wf = Workflow("report", version="1")

        @wf.step
        async def fetch(ctx: StepContext, query: str) -> list[str]: ...
    """

    def __init__(self, name: str, *, version: str = "1") -> None:
        if not name or not isinstance(name, str):
            raise WorkflowDefinitionError("a workflow needs a non-empty name")
        self.name = name
        self.version = str(version)
        self._steps: list[Step] = []

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, version={self.version!r}, steps={self.step_names})"

    @property
    def steps(self) -> tuple[Step, ...]:
        """Return the steps in the order they run."""
        return tuple(self._steps)

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
    def fingerprint(self) -> str:
        """Hash the step list (names, order, output types): it changes when the shape does."""
        shape = [[step.name, step.output_type] for step in self._steps]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def index(self, step_name: str) -> int:
        """Return the position of a step by name."""
        for position, step in enumerate(self._steps):
            if step.name == step_name:
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
    ) -> Any:
        """Declare a step, bare (``@wf.step``) or with options (``@wf.step(retries=3)``).

        Args:
            name: the step's name; defaults to the function's name.
            retries: how many times to retry after a failed attempt (0: one attempt).
            timeout: the limit for one attempt, in seconds or as a timedelta.
            backoff: the first wait between attempts; it doubles, with jitter.
            max_backoff: the longest wait between attempts.
            retry_on: the exception types worth retrying; others fail at once.

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
        if step.name in self.step_names:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} already has a step named {step.name!r}"
            )
        self._steps.append(step)
