"""Checked by ``mypy --strict tests/typing`` (see test_typing.py), never run by pytest.

``ctx.tool`` hands back what the tool returns, sync or async, and checks the
arguments against the tool's signature; the other journaled calls keep their types.
"""

from __future__ import annotations

from typing import Any, assert_type

from pydantic import BaseModel

from engine import StepContext, Workflow

wf = Workflow("typing-tools", version="1", on_failure="park")


class Hit(BaseModel):
    title: str


def search(query: str, limit: int = 2) -> list[str]:
    return [query] * limit


async def fetch(url: str) -> Hit:
    return Hit(title=url)


@wf.step(retries=2, on_failure="fail")
async def research(ctx: StepContext, topic: str) -> Hit:
    found = await ctx.tool("search", search, topic, limit=3)
    assert_type(found, list[str])
    hit = await ctx.tool("fetch", fetch, found[0])
    assert_type(hit, Hit)
    decision = await ctx.wait_for_event("approval", timeout=60)
    assert_type(decision, Any)
    await ctx.sleep(1.5)
    assert_type(ctx.cancelled, bool)
    return hit


@wf.migration(from_version="0")
def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "upgraded": True}
