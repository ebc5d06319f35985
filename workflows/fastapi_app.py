"""stepvault inside a FastAPI service: start workflows, read their status, send events.

The app's lifespan opens one Runner for the process, resumes every session an
earlier process left unfinished, and closes the runner on shutdown (steps in
flight are cancelled and stay resumable). Workflows run in the background of
the event loop; requests only start them, read them and send them events.

Run it (``pip install 'stepvault[fastapi]' uvicorn``), from the repository root::

    STEPVAULT_STORE=./sessions uvicorn workflows.fastapi_app:app

    curl -X POST localhost:8000/workflows/expense/sessions \\
         -H 'content-type: application/json' -d '{"input": {"employee": "ana", "amount": 120}}'
    curl localhost:8000/sessions/<id>            # status "waiting": it waits for a decision
    curl -X POST localhost:8000/sessions/<id>/events/decision \\
         -H 'content-type: application/json' -d '{"payload": {"approved": true, "by": "li"}}'
    curl localhost:8000/sessions/<id>            # status "completed", with the output
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from engine import (
    EngineError,
    InvalidArgumentError,
    InvalidSessionIdError,
    Runner,
    SessionBusyError,
    SessionCancelledError,
    SessionExpiredError,
    SessionNotFoundError,
    StepContext,
    Workflow,
    open_store,
)

# -- the workflow this service runs -----------------------------------------------------

expense = Workflow("expense", version="1")


@expense.step
async def submit(ctx: StepContext, claim: dict[str, Any]) -> dict[str, Any]:
    """Check the claim; the session's state keeps who asked for how much."""
    if claim.get("amount", 0) <= 0:
        raise ValueError("an expense claim needs a positive amount")
    ctx.state["claim"] = claim
    return claim


@expense.step
async def decide(ctx: StepContext, claim: dict[str, Any]) -> dict[str, Any]:
    """Wait (durably: across restarts, for up to two weeks) for someone's decision."""
    decision = await ctx.wait_for_event("decision", timeout=14 * 24 * 3600)
    return {**claim, "approved": bool(decision.get("approved")), "by": decision.get("by")}


@expense.step
def pay(ctx: StepContext, claim: dict[str, Any]) -> dict[str, Any]:
    """Pay an approved claim (a real service would call its payments API here)."""
    return {"employee": claim["employee"], "paid": claim["amount"] if claim["approved"] else 0}


WORKFLOWS = {workflow.name: workflow for workflow in [expense]}

# -- the web API ---------------------------------------------------------------------------


class StartRequest(BaseModel):
    """What starting a workflow takes."""

    input: Any = None
    session_id: str | None = Field(default=None, description="an idempotency key (a UUIDv4)")
    ttl: float | None = Field(default=None, description="seconds the session lives idle")
    tags: list[str] = Field(default_factory=list)


class EventRequest(BaseModel):
    """What sending an event takes."""

    payload: Any = None


_STATUS_CODES: list[tuple[type[EngineError], int]] = [
    (InvalidSessionIdError, 404),
    (SessionNotFoundError, 404),
    (SessionExpiredError, 410),
    (SessionCancelledError, 409),
    (SessionBusyError, 409),
    (InvalidArgumentError, 409),
]


def create_app(store_url: str | None = None, workflows: Iterable[Workflow] = ()) -> FastAPI:
    """Build the service over the store at ``store_url`` (default: ``STEPVAULT_STORE``)."""
    known = {**WORKFLOWS, **{workflow.name: workflow for workflow in workflows}}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = store_url or os.environ.get("STEPVAULT_STORE", "./sessions")
        async with Runner(open_store(url), workflows=known.values()) as runner:
            app.state.runner = runner
            app.state.resumed = await runner.resume_all()  # what a crash or deploy left
            yield
        # Leaving the block closed the runner: steps in flight stopped, resumable.

    app = FastAPI(title="stepvault workflows", lifespan=lifespan)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        code = next((c for kind, c in _STATUS_CODES if isinstance(exc, kind)), 500)
        return JSONResponse({"error": str(exc)}, status_code=code)

    @app.post("/workflows/{name}/sessions", status_code=202)
    async def start(name: str, body: StartRequest, request: Request) -> dict[str, str]:
        """Start a workflow in a new session; it runs in the background."""
        workflow = known.get(name)
        if workflow is None:
            raise SessionNotFoundError(f"no workflow named {name!r}: try {sorted(known)}")
        runner: Runner = request.app.state.runner
        session_id = await runner.start(
            workflow,
            body.input,
            session_id=body.session_id,
            ttl=body.ttl,
            metadata={"origin": "http", "tags": body.tags},
        )
        return {"session_id": session_id}

    @app.get("/sessions/{session_id}")
    async def status(session_id: str, request: Request) -> dict[str, Any]:
        """Say where a session is: its status, steps done, output or error, what it waits for."""
        runner: Runner = request.app.state.runner
        session = await runner.sessions.get_session(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id} not found or expired")
        last = session.steps_done[-1] if session.steps_done else None
        return {
            "session_id": session.id,
            "workflow": session.workflow,
            "status": session.status,
            "steps_done": session.steps_done,
            "waiting_for": session.wait.event if session.wait else None,
            "output": session.outputs.get(last) if session.status == "completed" else None,
            "error": session.error,
        }

    @app.post("/sessions/{session_id}/events/{name}", status_code=202)
    async def send(
        session_id: str, name: str, body: EventRequest, request: Request
    ) -> dict[str, str]:
        """Send an event; a step waiting for it goes on (one sent early is kept)."""
        runner: Runner = request.app.state.runner
        await runner.send_event(session_id, name, body.payload)
        return {"session_id": session_id, "event": name}

    return app


app = create_app()
