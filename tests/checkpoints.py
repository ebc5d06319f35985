"""Sessions and checkpoints for the reliability suites. A helper, not a test module.

The checkpoints look like what a runner commits for a step (an output, state set
and removed, a tool result), with sizes that vary, so journals grow and compact.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from engine import Checkpoint, Session, ToolResult
from engine.models import utcnow


def new_session() -> Session:
    """Return a valid, unsaved session with some state (one hour TTL)."""
    now = utcnow()
    return Session(
        id=str(uuid.uuid4()),
        created_at=now,
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        ttl=3600.0,
        state={"seed": "s" * 300},
    )


def next_checkpoint(session: Session, index: int) -> Checkpoint:
    """Return checkpoint ``index`` for ``session``: the step's output, state and tool result."""
    now = utcnow()
    name = f"step-{index}"
    return Checkpoint(
        revision=session.revision + 1,
        status="running",
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        step=name,
        output={"index": index, "pad": "é" * (40 + 30 * (index % 4))},
        state_set={f"k{index % 3}": index, f"grow-{index}": "g" * 60},
        state_unset=[f"k{(index + 1) % 3}"],
        tool_results=[
            ToolResult(name=name, output=index, started_at=now, finished_at=now, duration=0.0)
        ],
        attempts={name: 1},
    )


def applied(session: Session, checkpoint: Checkpoint) -> Session:
    """Return a copy of ``session`` with ``checkpoint`` applied: what the store must load."""
    after = session.model_copy(deep=True)
    after.apply(checkpoint)
    return after
