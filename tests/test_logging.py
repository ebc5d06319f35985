"""Structured logging: every step event says which session, workflow, step and attempt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine import FileStore, Runner, StepContext, Workflow, configure_logging

STEP_FIELDS = ("session_id", "workflow", "step", "attempt")


def _workflow() -> Workflow:
    wf = Workflow("logged")
    failures = [RuntimeError("once")]

    @wf.step(retries=1, backoff=0.01)
    async def fetch(ctx: StepContext, value: int) -> int:
        ctx.log.info("fetch.note", detail="from the step's own logger")
        if failures:
            raise failures.pop()
        return value + 1

    @wf.step
    def double(ctx: StepContext, value: int) -> int:  # sync: runs in a worker thread
        ctx.log.info("double.note")
        return value * 2

    return wf


async def test_json_logs_carry_session_workflow_step_and_attempt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: JSON logs at debug level
    configure_logging(json=True, level="DEBUG")
    wf = _workflow()

    # When: a workflow runs, one step failing once before it succeeds
    async with Runner(FileStore(tmp_path), workflows=[wf]) as runner:
        session_id = await runner.start(wf, 1)
        assert await runner.wait(session_id) == 4

    # Then: one JSON object per line; every step event and every line a step logged
    # through ctx.log names the session, the workflow, the step and the attempt
    lines = capsys.readouterr().err.splitlines()
    events: list[dict[str, Any]] = [json.loads(line) for line in lines]
    step_events = [e for e in events if e["event"].split(".")[0] in ("step", "fetch", "double")]
    assert [(e["event"], e.get("step"), e.get("attempt")) for e in step_events] == [
        ("step.started", "fetch", 1),
        ("fetch.note", "fetch", 1),
        ("step.failed", "fetch", 1),
        ("step.started", "fetch", 2),
        ("fetch.note", "fetch", 2),
        ("step.committed", "fetch", 2),
        ("step.started", "double", 1),
        ("double.note", "double", 1),
        ("step.committed", "double", 1),
    ]
    for event in step_events:
        assert {field: event.get(field) for field in STEP_FIELDS} == {
            "session_id": session_id,
            "workflow": "logged",
            "step": event["step"],
            "attempt": event["attempt"],
        }
        assert event["level"] in ("debug", "info", "warning")
        assert event["timestamp"].endswith("Z")
    assert all(e.get("session_id") == session_id for e in events), events


async def test_console_logs_are_one_readable_line_per_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: the console renderer (what a terminal gets)
    configure_logging(json=False, level="INFO")
    wf = _workflow()

    # When
    async with Runner(FileStore(tmp_path), workflows=[wf]) as runner:
        assert await runner.run(wf, 1) == 4

    # Then: key=value lines naming the event and its step, not JSON
    lines = capsys.readouterr().err.splitlines()
    committed = [line for line in lines if "step.committed" in line]
    assert len(committed) == 2
    for line, step in zip(committed, ["fetch", "double"], strict=True):
        assert f"step={step}" in line
        assert "workflow=logged" in line
        assert "attempt=" in line
        assert not line.lstrip().startswith("{")
