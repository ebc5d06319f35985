"""Checked by ``mypy --strict tests/typing`` (see test_typing.py), never run by pytest.

The step decorator must hand back the function it was given, with its exact
signature: bare or with options, sync or async. ``assert_type`` on what calling the
decorated function returns fails the check if the decorator erased the type (to
``Any``, or to a loose ``Callable[[StepContext, Any], Any]``). Runner hooks, the
other callable users hand the engine, are checked at the end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, assert_type

from pydantic import BaseModel

from engine import MemoryStore, Runner, StepContext, StepEvent, Workflow

wf = Workflow("typing", version="1")


class Summary(BaseModel):
    pages: int


@wf.step
async def fetch(ctx: StepContext, query: str) -> list[str]:
    return [query]


@wf.step
def count(ctx: StepContext, pages: list[str]) -> int:
    return len(pages)


@wf.step(retries=3, timeout=30.0, retry_on=(ConnectionError, TimeoutError))
def summarize(ctx: StepContext, pages: int) -> Summary:
    ctx.state["pages"] = pages
    return Summary(pages=pages)


@wf.step(name="publish", timeout=timedelta(seconds=5), backoff=0.1, max_backoff=2)
async def publish(ctx: StepContext, summary: Summary) -> dict[str, int]:
    ctx.log.info("publishing", pages=summary.pages)
    return {"pages": summary.pages}


@wf.step
def with_defaults(ctx: StepContext, value: dict[str, int], scale: int = 2) -> float:
    return value["pages"] * scale / 3


async def call_them_directly(ctx: StepContext) -> None:
    """Each decorated function keeps its parameters and its return type."""
    pages = await fetch(ctx, "query")
    assert_type(pages, list[str])
    assert_type(count(ctx, pages), int)
    assert_type(summarize(ctx, 3), Summary)
    published = await publish(ctx, Summary(pages=3))
    assert_type(published, dict[str, int])
    assert_type(with_defaults(ctx, published), float)
    assert_type(with_defaults(ctx, published, scale=4), float)


# The decorated functions still fit the callable types a caller would name.
fetch_fn: Callable[[StepContext, str], Awaitable[list[str]]] = fetch
count_fn: Callable[[StepContext, list[str]], int] = count
summarize_fn: Callable[[StepContext, int], Summary] = summarize
publish_fn: Callable[[StepContext, Summary], Awaitable[dict[str, int]]] = publish


def read_context(ctx: StepContext) -> None:
    """The context's attributes keep their types."""
    assert_type(ctx.session_id, str)
    assert_type(ctx.step, str)
    assert_type(ctx.attempt, int)
    assert_type(ctx.idempotency_key, str)
    assert_type(ctx.state, dict[str, Any])


def progress(e: StepEvent) -> None:
    """A hook whose parameter is not named ``event``."""


heard: list[StepEvent] = []

# Any one-argument callable taking a StepEvent is a hook, whatever its parameter's name.
hooked = Runner(MemoryStore(), [wf], hooks=[progress, heard.append, lambda event: None])
