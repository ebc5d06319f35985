"""Declaring workflows: the step decorator, its validation, step order and fingerprints."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from engine import StepContext, Workflow, WorkflowDefinitionError


class Page(BaseModel):
    """A typed step output, used to check that output types shape the fingerprint."""

    url: str


def _three_steps(workflow: Workflow) -> None:
    """Declare the same three steps, in the same order, on ``workflow``."""

    @workflow.step
    def fetch(ctx: StepContext, query: str) -> list[str]:
        return [query]

    @workflow.step
    def parse(ctx: StepContext, pages: list[str]) -> Page:
        return Page(url=pages[0])

    @workflow.step
    def report(ctx: StepContext, page: Page) -> dict[str, str]:
        return {"url": page.url}


def test_bare_decorator_declares_a_step_with_default_options() -> None:
    wf = Workflow("bare")

    @wf.step
    def only(ctx: StepContext, value: int) -> int:
        return value

    (step,) = wf.steps
    assert step.name == "only"
    assert step.fn is only
    assert step.retries == 0
    assert step.timeout is None
    assert step.is_async is False


def test_decorator_with_options_records_them() -> None:
    wf = Workflow("options")

    @wf.step(name="fetch-pages", retries=3, timeout=timedelta(seconds=2), retry_on=KeyError)
    async def fetch(ctx: StepContext, value: int) -> int:
        return value

    (step,) = wf.steps
    assert step.name == "fetch-pages"
    assert step.retries == 3
    assert step.timeout == 2.0
    assert step.retry_on == (KeyError,)
    assert step.is_async is True


def test_decorated_functions_stay_callable_directly() -> None:
    wf = Workflow("direct")

    @wf.step
    def double(ctx: StepContext, value: int) -> int:
        return value * 2

    @wf.step(retries=2)
    def triple(ctx: StepContext, value: int) -> int:
        return value * 3

    assert double(None, 4) == 8  # type: ignore[arg-type]  # no runner: ctx is unused
    assert triple(None, 4) == 12  # type: ignore[arg-type]


async def test_decorated_async_function_stays_awaitable_directly() -> None:
    wf = Workflow("direct-async")

    @wf.step(timeout=5)
    async def double(ctx: StepContext, value: int) -> int:
        return value * 2

    assert await double(None, 21) == 42  # type: ignore[arg-type]


def test_steps_keep_declaration_order() -> None:
    wf = Workflow("order")

    @wf.step
    def zulu(ctx: StepContext, value: int) -> int:
        return value

    @wf.step
    def alpha(ctx: StepContext, value: int) -> int:
        return value

    @wf.step(name="mike")
    def named(ctx: StepContext, value: int) -> int:
        return value

    assert wf.step_names == ["zulu", "alpha", "mike"]
    assert [step.name for step in wf.steps] == ["zulu", "alpha", "mike"]
    assert wf.index("alpha") == 1
    with pytest.raises(WorkflowDefinitionError, match="no step 'absent'"):
        wf.index("absent")


def test_duplicate_step_name_is_rejected_at_declaration() -> None:
    wf = Workflow("dupes")

    @wf.step
    def fetch(ctx: StepContext, value: int) -> int:
        return value

    with pytest.raises(WorkflowDefinitionError, match="fetch"):

        @wf.step(name="fetch")
        def other(ctx: StepContext, value: int) -> int:
            return value

    assert wf.step_names == ["fetch"]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"retries": -1}, id="negative-retries"),
        pytest.param({"retries": 1.5}, id="fractional-retries"),
        pytest.param({"retries": True}, id="bool-retries"),
        pytest.param({"retry_on": ValueError("not a type")}, id="retry-on-instance"),
        pytest.param({"retry_on": int}, id="retry-on-non-exception-type"),
        pytest.param({"retry_on": (KeyError, str)}, id="retry-on-mixed-tuple"),
        pytest.param({"retry_on": ()}, id="retry-on-empty"),
        pytest.param({"timeout": 0}, id="zero-timeout"),
        pytest.param({"timeout": -2.5}, id="negative-timeout"),
        pytest.param({"timeout": timedelta(0)}, id="zero-timedelta-timeout"),
        pytest.param({"backoff": -1}, id="negative-backoff"),
    ],
)
def test_bad_step_options_are_rejected_at_declaration(options: dict[str, Any]) -> None:
    wf = Workflow("bad-options")

    with pytest.raises(WorkflowDefinitionError):
        wf.step(**options)

    assert wf.steps == ()


def _no_args() -> int:
    return 1


def _ctx_only(ctx: StepContext) -> int:
    return 1


def _three_required(ctx: StepContext, value: int, extra: int) -> int:
    return value + extra


def _keyword_only_value(ctx: StepContext, *, value: int) -> int:
    return value


@pytest.mark.parametrize(
    "fn", [_no_args, _ctx_only, _three_required, _keyword_only_value], ids=lambda fn: fn.__name__
)
def test_function_not_taking_ctx_and_value_is_rejected(fn: Any) -> None:
    wf = Workflow("bad-signature")

    with pytest.raises(WorkflowDefinitionError, match="two positional arguments"):
        wf.step(fn)

    assert wf.steps == ()


def test_function_with_optional_extra_parameters_is_accepted() -> None:
    wf = Workflow("extras")

    @wf.step
    def flexible(ctx: StepContext, value: int, scale: int = 2, *rest: int) -> int:
        return value * scale

    assert wf.step_names == ["flexible"]


def test_workflow_needs_a_name() -> None:
    with pytest.raises(WorkflowDefinitionError):
        Workflow("")


def test_fingerprint_is_stable_for_the_same_shape() -> None:
    # Given two workflows declaring the same steps, in separate objects
    first, second = Workflow("shape"), Workflow("shape", version="2")
    _three_steps(first)
    _three_steps(second)

    # Then their fingerprints agree, and reading it twice gives the same value
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint == first.fingerprint


def test_fingerprint_ignores_options_bodies_and_parameter_types() -> None:
    # Given the reference shape
    reference = Workflow("shape")
    _three_steps(reference)

    # When the same steps get other options, other bodies and other input annotations
    changed = Workflow("shape")

    @changed.step(retries=5, timeout=3)
    async def fetch(ctx: StepContext, query: object) -> list[str]:
        return [str(query), "more"]

    @changed.step(retry_on=KeyError)
    def parse(ctx: StepContext, pages: Any) -> Page:
        return Page(url="elsewhere")

    @changed.step
    def report(ctx: StepContext, page: Any) -> dict[str, str]:
        return {}

    # Then the fingerprint does not change: stored sessions still fit
    assert changed.fingerprint == reference.fingerprint


def test_fingerprint_changes_when_a_step_is_added() -> None:
    reference, grown = Workflow("shape"), Workflow("shape")
    _three_steps(reference)
    _three_steps(grown)

    @grown.step
    def archive(ctx: StepContext, value: dict[str, str]) -> None:
        return None

    assert grown.fingerprint != reference.fingerprint


def test_the_stamp_follows_steps_added_and_a_version_set_after_it_was_read() -> None:
    # Given a workflow whose stamp was read once (runs read it)
    workflow = Workflow("shape")
    _three_steps(workflow)
    before = workflow.stamp

    # When a step is added, then the version is set
    @workflow.step
    def archive(ctx: StepContext, value: dict[str, str]) -> None:
        return None

    grown = workflow.stamp
    workflow.version = "2"

    # Then each read gives the workflow as it is now
    assert [name for name, _ in grown.shape] == [*workflow.step_names]
    assert len(before.shape) == 3
    assert grown.fingerprint != before.fingerprint
    assert (workflow.stamp.version, workflow.stamp.fingerprint) == ("2", grown.fingerprint)
    # And the shape handed out is a copy: changing it changes no later stamp
    workflow.shape.append(("extra", "int"))
    assert workflow.stamp.shape == grown.shape


def test_fingerprint_changes_when_a_step_is_renamed() -> None:
    reference, renamed = Workflow("shape"), Workflow("shape")
    _three_steps(reference)

    @renamed.step
    def fetch(ctx: StepContext, query: str) -> list[str]:
        return [query]

    @renamed.step(name="parse_pages")
    def parse(ctx: StepContext, pages: list[str]) -> Page:
        return Page(url=pages[0])

    @renamed.step
    def report(ctx: StepContext, page: Page) -> dict[str, str]:
        return {"url": page.url}

    assert renamed.fingerprint != reference.fingerprint


def test_fingerprint_changes_when_steps_are_reordered() -> None:
    reference, swapped = Workflow("shape"), Workflow("shape")

    @reference.step
    def one(ctx: StepContext, value: int) -> int:
        return value

    @reference.step
    def two(ctx: StepContext, value: int) -> int:
        return value

    swapped.step(two)
    swapped.step(one)

    assert swapped.fingerprint != reference.fingerprint


@pytest.mark.parametrize("new_type", [list[int], Page, dict[str, str], str, None], ids=repr)
def test_fingerprint_changes_when_a_return_type_changes(new_type: Any) -> None:
    reference = Workflow("shape")

    @reference.step
    def fetch(ctx: StepContext, query: str) -> list[str]:
        return [query]

    retyped = Workflow("shape")

    def fetch_again(ctx: StepContext, query: str) -> Any:
        return [query]

    fetch_again.__annotations__["return"] = new_type
    retyped.step(name="fetch")(fetch_again)

    assert retyped.fingerprint != reference.fingerprint


def test_source_points_at_the_declaring_file() -> None:
    wf = Workflow("sourced")
    assert wf.source is None  # nothing declared yet: nothing to import again

    _three_steps(wf)

    assert wf.source is not None
    assert Path(wf.source).resolve() == Path(__file__).resolve()
