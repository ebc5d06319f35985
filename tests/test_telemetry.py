"""OpenTelemetry tracing: a span per session run and per step attempt.

Spans go to the SDK's in-memory exporter through a provider made for each test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the test extra: there, a missing package fails
    pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from engine import FileStore, Runner, StepContext, StepFailedError, Workflow
from engine.telemetry import ATTEMPT, SESSION_ID, STEP, WORKFLOW, TracingHook


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Collect finished spans in memory."""
    collected = InMemorySpanExporter()
    yield collected
    collected.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider that exports to ``exporter``, shut down after the test."""
    made = TracerProvider()
    made.add_span_processor(SimpleSpanProcessor(exporter))
    yield made
    made.shutdown()


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_session_run_and_step_attempts_are_nested_spans(
    tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Given: a workflow whose second step fails once, and whose steps open spans of their own
    wf = Workflow("traced")
    tracer = provider.get_tracer("app")
    failures = [RuntimeError("flaky network")]

    @wf.step
    async def fetch(ctx: StepContext, query: str) -> str:
        with tracer.start_as_current_span("http GET"):
            return query.upper()

    @wf.step(retries=1, backoff=0.01)
    def store(ctx: StepContext, page: str) -> int:  # sync: runs in a worker thread
        with tracer.start_as_current_span("db INSERT"):
            if failures:
                raise failures.pop()
            return len(page)

    # When: it runs inside a request span, with the tracing hook
    async with Runner(FileStore(tmp_path), workflows=[wf], hooks=[TracingHook(provider)]) as runner:
        with tracer.start_as_current_span("POST /reports") as request:
            session_id = await runner.start(wf, "query")
            assert await runner.wait(session_id) == 5

    # Then: one session span under the request, one span per attempt under it
    spans = exporter.get_finished_spans()
    (session,) = _by_name(spans, "session traced")
    assert session.parent is not None
    assert session.parent.span_id == request.get_span_context().span_id
    assert session.attributes is not None
    assert session.attributes[SESSION_ID] == session_id
    assert session.attributes[WORKFLOW] == "traced"
    assert session.status.status_code is StatusCode.OK
    attempts = [span for span in spans if span.name.startswith("step ")]
    assert [(s.name, (s.attributes or {})[ATTEMPT]) for s in attempts] == [
        ("step fetch", 1),
        ("step store", 1),
        ("step store", 2),
    ]
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == session.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes[SESSION_ID] == session_id
        assert attempt.attributes[WORKFLOW] == "traced"
        assert attempt.attributes[STEP] == attempt.name.removeprefix("step ")
    statuses = [s.status.status_code for s in attempts]
    assert statuses == [StatusCode.OK, StatusCode.ERROR, StatusCode.OK]
    assert "flaky network" in (attempts[1].status.description or "")
    assert [e.name for e in session.events] == ["step.retrying"]
    # The steps' own spans nest under the attempt that ran them, async or in a thread.
    (http,) = _by_name(spans, "http GET")
    assert http.parent is not None
    assert http.parent.span_id == attempts[0].context.span_id
    inserts = _by_name(spans, "db INSERT")
    assert [s.parent.span_id for s in inserts if s.parent] == [
        attempts[1].context.span_id,
        attempts[2].context.span_id,
    ]


async def test_a_failed_session_run_ends_its_span_with_the_error(
    tmp_path: Path, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Given: a workflow whose only step always fails
    wf = Workflow("doomed")

    @wf.step
    async def explode(ctx: StepContext, value: int) -> int:
        raise ValueError(f"cannot handle {value}")

    # When
    async with Runner(FileStore(tmp_path), workflows=[wf], hooks=[TracingHook(provider)]) as runner:
        with pytest.raises(StepFailedError):
            await runner.run(wf, 7)

    # Then: the attempt and the run are both errors, the run records the exception
    spans = exporter.get_finished_spans()
    (attempt,) = _by_name(spans, "step explode")
    (session,) = _by_name(spans, "session doomed")
    assert attempt.status.status_code is StatusCode.ERROR
    assert "cannot handle 7" in (attempt.status.description or "")
    assert session.status.status_code is StatusCode.ERROR
    assert [e.name for e in session.events] == ["exception"]
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached here


def test_without_opentelemetry_the_import_error_names_the_extra() -> None:
    # Given: a Python where opentelemetry cannot be imported
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "import engine\n"
        "try:\n"
        "    import engine.telemetry\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    # When
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    # Then
    assert result.stdout.startswith("MissingExtraError ")
    assert "pip install 'stepvault[otel]'" in result.stdout
