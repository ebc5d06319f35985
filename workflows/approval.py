"""Expense approval: a person approves each expense; the workflow waits for them durably.

From the command line, start a session; it checks the expense, then waits::

    stepvault run workflows/approval.py \\
        --input '{"id": "E-7", "employee": "ana", "amount": 180, "category": "travel"}'

and in another terminal, approve it (the first command then finishes)::

    stepvault send <SESSION ID> approval --payload '{"approved": true, "by": "lee"}'

Press Ctrl-C while it waits: the session stays ``waiting`` and holds no worker.
Send the event whenever you like, then ``stepvault resume --all`` finishes it.
Or run everything in one process (it approves its own expense)::

    python workflows/approval.py

What each step shows:

1. ``check_policy``: a journaled tool call (``ctx.tool``): the policy lookup is
   recorded and never made twice for this session, whatever restarts.
2. ``request_approval``: ``ctx.wait_for_event`` suspends the session until the
   ``approval`` event; after ``STEPVAULT_APPROVAL_TIMEOUT`` seconds (3 days by
   default) the expense is rejected as unanswered.
3. ``pay``: a flaky bank (the first ``STEPVAULT_BANK_FAILURES`` transfers fail,
   1 by default) is retried with backoff; if it stays down the session is
   parked for an operator: ``stepvault resume ID``, ``stepvault skip ID --output
   JSON`` or ``stepvault cancel ID``.
4. ``settle``: ``ctx.sleep`` waits durably for the transfer to settle
   (``STEPVAULT_SETTLE_SECONDS``, 2 by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Literal

from pydantic import BaseModel

from engine import FileStore, Runner, StepContext, StepTimeoutError, Workflow

wf = Workflow("approval", version="1")

APPROVAL_TIMEOUT = float(os.environ.get("STEPVAULT_APPROVAL_TIMEOUT", str(3 * 24 * 3600)))
SETTLE_SECONDS = float(os.environ.get("STEPVAULT_SETTLE_SECONDS", "2"))
DEFAULT_EXPENSE = {"id": "E-1", "employee": "ana", "amount": 180, "category": "travel"}
LIMITS = {"travel": 500, "meals": 60, "equipment": 1500}


class Expense(BaseModel):
    """What an employee claims."""

    id: str
    employee: str
    amount: int
    category: str


class Checked(BaseModel):
    """An expense and the policy it falls under."""

    expense: Expense
    limit: int
    within_policy: bool


class Decision(BaseModel):
    """What the approver said."""

    approved: bool
    by: str
    note: str = ""


class Reviewed(BaseModel):
    """An expense with its approver's decision."""

    expense: Expense
    decision: Decision


class Payment(BaseModel):
    """The outcome: paid (with the bank's reference) or rejected."""

    expense_id: str
    status: Literal["paid", "rejected"]
    amount: int = 0
    reference: str | None = None
    settled: bool = False
    decided_by: str


def lookup_limit(category: str) -> int:
    """The policy service: the most one expense of a category may cost."""
    return LIMITS.get(category, 0)


class Bank:
    """A stand-in for a payment API that fails the first few transfers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def transfer(self, employee: str, amount: int, idempotency_key: str) -> str:
        """Send money; raises ConnectionError while the bank is "down"."""
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"bank unreachable (call {self.calls})")
        return "TX-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:8]


BANK = Bank(int(os.environ.get("STEPVAULT_BANK_FAILURES", "1")))


@wf.step
async def check_policy(ctx: StepContext, expense: Expense | None) -> Checked:
    """Look the category's limit up (a recorded tool call)."""
    claim = expense or Expense.model_validate(DEFAULT_EXPENSE)
    limit = await ctx.tool("policy_lookup", lookup_limit, claim.category)
    return Checked(expense=claim, limit=limit, within_policy=claim.amount <= limit)


@wf.step
async def request_approval(ctx: StepContext, checked: Checked) -> Reviewed:
    """Wait for a person's decision: the session sleeps, durably, until it comes."""
    if not checked.within_policy:
        reason = f"over the {checked.limit} limit for {checked.expense.category}"
        refused = Decision(approved=False, by="policy", note=reason)
        return Reviewed(expense=checked.expense, decision=refused)
    try:
        payload = await ctx.wait_for_event("approval", timeout=APPROVAL_TIMEOUT)
    except StepTimeoutError:
        decision = Decision(approved=False, by="timeout", note="nobody answered in time")
    else:
        decision = Decision.model_validate(payload)
    ctx.state["decided_by"] = decision.by
    return Reviewed(expense=checked.expense, decision=decision)


@wf.step(retries=3, backoff=0.2, max_backoff=2.0, retry_on=ConnectionError, on_failure="park")
async def pay(ctx: StepContext, reviewed: Reviewed) -> Payment:
    """Pay an approved expense; retried while the bank is down, then parked."""
    expense, decision = reviewed.expense, reviewed.decision
    if not decision.approved:
        return Payment(expense_id=expense.id, status="rejected", decided_by=decision.by)
    reference = await ctx.tool(
        "bank_transfer", BANK.transfer, expense.employee, expense.amount, ctx.idempotency_key
    )
    return Payment(
        expense_id=expense.id,
        status="paid",
        amount=expense.amount,
        reference=reference,
        decided_by=decision.by,
    )


@wf.step
async def settle(ctx: StepContext, payment: Payment) -> Payment:
    """Wait (durably) for the transfer to settle."""
    if payment.status == "paid":
        await ctx.sleep(SETTLE_SECONDS)
        return payment.model_copy(update={"settled": True})
    return payment


async def main() -> None:
    """Run one expense through, approving it from this process at once.

    The event may come before the step waits for it: the session's inbox keeps it.
    """
    async with Runner(FileStore("./sessions"), workflows=[wf]) as runner:
        session_id = await runner.start(wf, DEFAULT_EXPENSE)
        print(f"session {session_id} started")
        await runner.send_event(session_id, "approval", {"approved": True, "by": "demo"})
        payment = await runner.wait(session_id)
    print(f"{payment.expense_id}: {payment.status} {payment.amount} ({payment.reference})")


if __name__ == "__main__":
    asyncio.run(main())
