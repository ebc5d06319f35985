"""The embedding examples run as documented: a FastAPI app, an asyncio worker, a LangGraph graph.

The FastAPI app runs in-process with its lifespan (httpx's ASGI transport); the
worker and the graph run in real processes, killed and restarted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

if not os.environ.get("CI"):  # CI installs the test extra: there, a missing package fails
    pytest.importorskip("fastapi")
    pytest.importorskip("langgraph")

import httpx

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", WORKFLOWS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # FastAPI reads the models' annotations through it
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STEPVAULT_", "SESSION_"))}
    return {**base, **extra}


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- FastAPI ---------------------------------------------------------------------------------


@asynccontextmanager
async def _serving(store: Path) -> AsyncIterator[tuple[Any, Any]]:
    """Run the app's lifespan (startup: resume_all) and a client talking to it."""
    app = _load("fastapi_app").create_app(str(store))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client,
    ):
        yield app, client


async def _status_becomes(client: Any, session_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = (await client.get(f"/sessions/{session_id}")).json()
        if body["status"] == status:
            return body
        assert time.monotonic() < deadline, f"session stayed {body}"
        await asyncio.sleep(0.01)


async def test_fastapi_app_starts_waits_for_an_event_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    store = tmp_path / "sessions"
    # Given: the service is up and a claim is submitted
    async with _serving(store) as (app, client):
        assert app.state.resumed == []
        started = await client.post(
            "/workflows/expense/sessions", json={"input": {"employee": "ana", "amount": 120}}
        )
        assert started.status_code == 202
        session_id = started.json()["session_id"]

        # Then: it runs in the background until it waits for a decision
        waiting = await _status_becomes(client, session_id, "waiting")
        assert waiting["waiting_for"] == "decision"
        assert waiting["steps_done"] == ["submit"]

    # When: the service restarts (shutdown closed the runner) and the decision comes
    async with _serving(store) as (app, client):
        sent = await client.post(
            f"/sessions/{session_id}/events/decision",
            json={"payload": {"approved": True, "by": "li"}},
        )
        assert sent.status_code == 202

        # Then: the new process finishes the claim
        done = await _status_becomes(client, session_id, "completed")
    assert done["output"] == {"employee": "ana", "paid": 120}
    assert done["steps_done"] == ["submit", "decide", "pay"]


async def test_fastapi_app_answers_errors_with_status_codes(tmp_path: Path) -> None:
    async with _serving(tmp_path / "sessions") as (_, client):
        unknown_workflow = await client.post("/workflows/nope/sessions", json={"input": 1})
        unknown_session = await client.get("/sessions/0b6c1a0e-1d2e-4f3a-8b4c-5d6e7f8a9b0c")
        malformed = await client.post("/sessions/not-a-uuid/events/decision", json={})
        bad = await client.post("/workflows/expense/sessions", json={"input": {"amount": -1}})
        failed = await _status_becomes(client, bad.json()["session_id"], "failed")

    assert unknown_workflow.status_code == 404
    assert "no workflow named 'nope'" in unknown_workflow.json()["error"]
    assert unknown_session.status_code == 404
    assert malformed.status_code == 404
    assert "positive amount" in failed["error"]


# -- the asyncio worker ------------------------------------------------------------------------


def test_worker_killed_mid_job_finishes_every_job_after_a_restart(tmp_path: Path) -> None:
    # Given: four jobs in the inbox and a worker whose counting step is slow
    inbox, outbox, store = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "sessions"
    inbox.mkdir()
    texts = {f"job{n}": " ".join(["word"] * n + ["longest-word"]) for n in range(1, 5)}
    for name, text in texts.items():
        (inbox / f"{name}.json").write_text(json.dumps({"text": text}))
    command = [sys.executable, str(WORKFLOWS / "worker.py"), str(inbox), str(outbox)]
    command += ["--store", str(store)]
    slow = subprocess.Popen(command, env=_env(STEPVAULT_WORKER_DELAY="30"), cwd=tmp_path)
    try:
        _wait_until(lambda: not list(inbox.glob("*.json")), "the worker to take every job")
    finally:
        # When: it is killed with jobs in flight
        os.kill(slow.pid, signal.SIGKILL)
        slow.wait()
    assert len(list(outbox.glob("*.json"))) < len(texts)

    # Then: a new worker finishes them all, and stops cleanly on SIGTERM
    fast = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        _wait_until(lambda: len(list(outbox.glob("*.json"))) == len(texts), "every result")
    finally:
        fast.send_signal(signal.SIGTERM)
        output, _ = fast.communicate(timeout=60)
    assert fast.returncode == 0
    assert "worker: resumed 4 unfinished job(s)" in output
    for name, text in texts.items():
        result = json.loads((outbox / f"{name}.json").read_text())
        assert result == {"job": name, "words": len(text.split()), "longest": "longest-word"}


# -- the LangGraph graph ---------------------------------------------------------------------------


def test_langgraph_example_waits_for_review_across_processes(tmp_path: Path) -> None:
    script = str(WORKFLOWS / "langgraph_graph.py")

    def step(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, script, *args],
            cwd=tmp_path,
            env=_env(STEPVAULT_STORE=str(tmp_path / "sessions")),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    # Given: a thread started in one process stops for review
    first = step("start", "durable workflows")
    assert first["waiting_for_review"] == "Draft 1: why durable workflows matter, take 1"

    # When: later processes answer it
    second = step("answer", "revise")
    third = step("answer", "approve")

    # Then: each picked up where the last left off
    assert second["drafts"] == [first["drafts"][0], second["waiting_for_review"]]
    assert third["verdict"] == "approve"
    assert third["waiting_for_review"] is None
    assert len(third["drafts"]) == 2
    assert (tmp_path / "sessions" / third["session_id"]).is_dir()
