"""Sessions for the dashboard's tests, made by real workflow runs. Not a test module.

It is also a workflow file. ``pipeline``'s steps each wait until a file named after
the step appears in the folder its input names, so a test decides when each step
ends and watches the dashboard follow, from another process if it likes::

    stepvault run tests/ui_support.py:pipeline --input '{"gates": "DIR"}' --store STORE

- ``fill(folder)``: a FileStore holding one session of each kind the pages show.
- ``open_gate(gates, step)``: let a ``pipeline`` step finish.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine import FileStore, Runner, SessionManager, StepContext, Store, Workflow
from engine.models import Session, utcnow

HOSTILE = "<script>alert('stepvault')</script>"
"""Markup a session may hold as data: every page must show it as text."""
GATE_DEADLINE = 120.0
"""Seconds a pipeline step waits for its gate before failing (no process outlives a test)."""

invoice = Workflow("invoice", version="2")


@invoice.step(retries=2, backoff=0.05, max_backoff=0.1)
async def charge(ctx: StepContext, order: dict[str, Any]) -> int:
    """Charge the order; the bank times out on the first attempt of a flaky order."""
    if order.get("flaky") and ctx.attempt == 1:
        raise ConnectionError("bank timeout")
    amount = int(order["amount"])
    await ctx.tool("fraud_check", _fraud_check, amount)
    ctx.state["charged"] = amount
    ctx.state["note"] = order.get("note", "")
    return amount


def _fraud_check(amount: int) -> bool:
    return amount < 10_000


@invoice.step
def receipt(ctx: StepContext, amount: int) -> str:
    """Send the receipt; a negative amount is refused, with the order's note in the error."""
    if amount < 0:
        raise ValueError(f"refund refused: {ctx.state['note']}")
    return f"paid {amount}"


approval = Workflow("approval")


@approval.step
async def ask(ctx: StepContext, expense: str) -> dict[str, Any]:
    """Wait durably for a person's decision."""
    decision: dict[str, Any] = await ctx.wait_for_event("approve")
    return decision


@approval.step
def decide(ctx: StepContext, decision: dict[str, Any]) -> str:
    """Record the decision."""
    ctx.state["approved"] = bool(decision.get("approved"))
    return "approved" if decision.get("approved") else "rejected"


pipeline = Workflow("pipeline")


async def _gate(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    """Wait for this step's gate file, then pass the value on."""
    gate = Path(value["gates"]) / ctx.step
    deadline = time.monotonic() + GATE_DEADLINE
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        await asyncio.sleep(0.02)
    ctx.state[ctx.step] = "done"
    return value


@pipeline.step
async def extract(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    """The first gated step."""
    return await _gate(ctx, value)


@pipeline.step
async def transform(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    """The second gated step."""
    return await _gate(ctx, value)


@pipeline.step
async def load(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    """The last gated step."""
    return await _gate(ctx, value)


def open_gate(gates: Path, step: str) -> None:
    """Let the pipeline step named ``step`` finish."""
    gates.mkdir(parents=True, exist_ok=True)
    (gates / step).touch()


@dataclass(frozen=True)
class Filled:
    """The sessions ``fill`` stored, by what they show."""

    folder: Path
    completed: str  # invoice, retried once, tags urgent+vip, markup in metadata and state
    failed: str  # invoice, its receipt failed with markup in the error; tag refunds
    waiting: str  # approval, waiting for event "approve"
    cancelled: str  # pipeline, cancelled in its first step
    plain: str  # a SessionManager session, no workflow, expiring in a minute, tag analysis
    expired: str  # expired an hour ago, not cleaned up yet

    @property
    def all(self) -> set[str]:
        """Return every session id."""
        return {
            self.completed,
            self.failed,
            self.waiting,
            self.cancelled,
            self.plain,
            self.expired,
        }


async def wait_for_status(store: Store, session_id: str, status: str, within: float = 15) -> None:
    """Poll the store until the session has ``status``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        session = await store.load(session_id)
        if session is not None and session.status == status:
            return
        assert time.monotonic() < deadline, f"session {session_id} never became {status}"
        await asyncio.sleep(0.01)


async def fill(folder: Path) -> Filled:
    """Store one session of each kind, by running the workflows for real."""
    metadata = {"tags": ["urgent", "vip"], "origin": HOSTILE}
    async with Runner(FileStore(folder), workflows=[invoice, approval, pipeline]) as runner:
        order = {"amount": 42, "flaky": True, "note": HOSTILE}
        completed = await runner.start(invoice, order, metadata=metadata)
        refund = {"amount": -5, "note": HOSTILE}
        failed = await runner.start(invoice, refund, metadata={"tags": ["refunds"]})
        waiting = await runner.start(approval, "laptop", context={"user_id": "ana"})
        cancelled = await runner.start(pipeline, {"gates": str(folder.parent / "never")})
        assert await runner.wait(completed) == "paid 42"
        await wait_for_status(runner.store, failed, "failed")
        await wait_for_status(runner.store, waiting, "waiting")
        await wait_for_status(runner.store, cancelled, "running")
        await runner.cancel(cancelled)
    async with SessionManager(FileStore(folder), cleanup_interval=None) as manager:
        plain = await manager.create_session(
            {"user_id": "user123"}, ttl=60, metadata={"tags": ["analysis"]}
        )
    now = utcnow()
    expired = Session(
        id=str(uuid.uuid4()),
        created_at=now - timedelta(hours=2),
        last_activity=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
        ttl=3600,
    )
    store = FileStore(folder)
    await store.create(expired)
    await store.close()
    return Filled(folder, completed, failed, waiting, cancelled, plain.id, expired.id)
