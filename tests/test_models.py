"""The plain data: TTL arithmetic, replaying checkpoints, listing rows."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from engine import Checkpoint, EngineError, Session, SessionInfo, ToolResult
from engine.models import to_seconds

MakeSession = Callable[..., Session]
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def checkpoint(revision: int, **changes: Any) -> Checkpoint:
    values: dict[str, Any] = {
        "revision": revision,
        "status": "running",
        "last_activity": at(revision),
        "expires_at": at(revision + 100),
    }
    values.update(changes)
    return Checkpoint(**values)


def result(name: str, error: str | None = None) -> ToolResult:
    return ToolResult(name=name, error=error, started_at=T0, finished_at=T0, duration=0.0)


@pytest.mark.parametrize(
    ("value", "seconds"), [(5, 5.0), (0.25, 0.25), (timedelta(minutes=2), 120.0)]
)
def test_to_seconds_accepts_seconds_and_timedeltas(
    value: float | timedelta, seconds: float
) -> None:
    assert to_seconds(value) == seconds


@pytest.mark.parametrize("value", [0, -1, timedelta(0), timedelta(seconds=-3), float("nan")])
def test_to_seconds_refuses_durations_that_are_not_positive(value: float | timedelta) -> None:
    with pytest.raises(EngineError, match="positive"):
        to_seconds(value)


def test_a_session_needs_a_positive_ttl(make_session: MakeSession) -> None:
    with pytest.raises(ValidationError):
        make_session(ttl=0)


def test_a_sliding_session_expires_ttl_after_its_last_activity(make_session: MakeSession) -> None:
    session = make_session(created_at=T0, last_activity=T0, expires_at=at(60), ttl=60)

    session.touch(at(45))

    assert session.last_activity == at(45)
    assert session.expires_at == at(105)


def test_a_fixed_session_expires_ttl_after_its_creation(make_session: MakeSession) -> None:
    session = make_session(
        created_at=T0, last_activity=T0, expires_at=at(60), ttl=60, ttl_policy="fixed"
    )

    session.touch(at(45))

    assert session.last_activity == at(45)
    assert session.expires_at == at(60)


def test_a_session_is_expired_from_the_instant_it_expires(make_session: MakeSession) -> None:
    session = make_session(created_at=T0, last_activity=T0, expires_at=at(60), ttl=60)

    assert not session.is_expired(at(59.999))
    assert session.is_expired(at(60))
    assert session.is_expired(at(61))


def test_replaying_checkpoints_rebuilds_the_session(make_session: MakeSession) -> None:
    # Given a fresh session
    session = make_session(state={"keep": 1, "drop": 2})

    # When three checkpoints are applied: a step, a failed attempt, a final step
    session.apply(
        checkpoint(
            1,
            step="fetch",
            output=["a"],
            state_set={"pages": 1},
            state_unset=["drop", "never-there"],
            tool_results=[result("fetch")],
            attempts={"fetch": 1},
        )
    )
    session.apply(
        checkpoint(
            2,
            tool_results=[result("sum", error="ValueError: x")],
            attempts={"sum": 1},
            error="step 'sum': ValueError: x",
        )
    )
    session.apply(
        checkpoint(
            3,
            status="completed",
            step="sum",
            output={"n": 1},
            state_set={"pages": 2},
            tool_results=[result("sum")],
            attempts={"sum": 2},
        )
    )

    # Then it holds everything the checkpoints said, in order
    assert session.steps_done == ["fetch", "sum"]
    assert session.cursor == 2
    assert session.outputs == {"fetch": ["a"], "sum": {"n": 1}}
    assert session.state == {"keep": 1, "pages": 2}
    assert [(r.name, r.ok) for r in session.tool_history] == [
        ("fetch", True),
        ("sum", False),
        ("sum", True),
    ]
    assert session.attempts == {"fetch": 1, "sum": 2}
    assert session.status == "completed"
    assert session.error is None
    assert session.revision == 3
    assert session.last_activity == at(3)
    assert session.expires_at == at(103)


def test_a_checkpoint_cannot_be_changed_after_it_is_made() -> None:
    made = checkpoint(1)

    with pytest.raises(ValidationError):
        made.revision = 2


def test_context_and_metadata_keep_extra_keys_through_json(make_session: MakeSession) -> None:
    session = make_session(
        context={"user_id": "u", "region": "eu"},
        metadata={"user_agent": "cli/1.0", "tags": ["t"], "trace": {"id": "abc"}},
    )

    again = Session.model_validate_json(session.model_dump_json())

    assert again == session
    assert again.context.model_extra == {"region": "eu"}
    assert again.metadata.model_extra == {"trace": {"id": "abc"}}


def test_a_listing_row_summarises_its_session(make_session: MakeSession) -> None:
    session = make_session(
        created_at=T0,
        last_activity=at(5),
        expires_at=at(65),
        ttl=60,
        workflow="report",
        status="waiting",
        steps_done=["a", "b"],
    )

    row = SessionInfo.of(session)

    assert row == SessionInfo(
        id=session.id,
        status="waiting",
        workflow="report",
        expires_at=at(65),
        created_at=T0,
        last_activity=at(5),
        steps_done=2,
    )
    assert not row.is_expired(at(64))
    assert row.is_expired(at(65))


def test_an_unreadable_listing_row_never_counts_as_expired() -> None:
    row = SessionInfo(id="x", problem="checksum mismatch")

    assert not row.is_expired(at(10**9))
