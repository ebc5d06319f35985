"""The operator's actions from the dashboard: resume, cancel, send an event, remove.

They run through a ``Runner`` the server owns. ``resume`` runs the session in the
server's process, with the workflow code found as ``stepvault resume`` finds it
(the files given with ``--workflow``, else the file the session recorded); the
page then shows it advancing. Stopping the server leaves such a session
resumable from its last checkpoint, as any runner's stop does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli_support import (
    WorkflowFiles,
    check_resumable,
    workflow_for_session,
    workflows_from_files,
)
from ..errors import (
    EngineError,
    InvalidArgumentError,
    SessionBusyError,
    SessionCancelledError,
    SessionNotFoundError,
)
from ..log import get_logger
from ..runner import Runner
from ..stores import validate_session_id

_log = get_logger()

OWNER = "stepvault dashboard"


class Actions:
    """Carry out the dashboard's actions on the sessions of one runner's store."""

    def __init__(self, runner: Runner, workflow_files: Sequence[Path] = ()) -> None:
        self.runner = runner
        self._paths = list(workflow_files)
        self._files = WorkflowFiles()  # each file imported once, so a workflow stays one object
        self._running: set[asyncio.Task[Any]] = set()

    async def resume(self, session_id: str) -> None:
        """Continue a session here, in the background, from its last completed step.

        Raises:
            SessionNotFoundError, SessionExpiredError, SessionCancelledError.
            InvalidArgumentError: it is completed: there is nothing to resume.
            WorkflowFileError: its workflow's code cannot be found.
        """
        store = self.runner.store
        session = check_resumable(await store.load(validate_session_id(session_id)), session_id)
        if session.status == "completed":
            raise InvalidArgumentError(f"session {session_id} is completed: nothing to resume")
        if session.status == "cancelled":
            raise SessionCancelledError(f"session {session_id} was cancelled; it cannot resume")
        given = workflows_from_files(self._files, self._paths) if self._paths else None
        self.runner.register(workflow_for_session(self._files, session, given))
        if session_id not in self._running_ids():
            # Say now, not in a log, when another runner has it (a "running" session
            # may also be an orphan whose runner died: then the lease is free).
            lease = await store.acquire(session_id, OWNER)
            if lease is None:
                raise SessionBusyError(f"session {session_id} is being run by another runner")
            await store.release(lease)
        task = asyncio.get_running_loop().create_task(self._finish(session_id), name=session_id)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _running_ids(self) -> set[str]:
        return {task.get_name() for task in self._running if not task.done()}

    async def _finish(self, session_id: str) -> None:
        try:
            await self.runner.resume(session_id)
        except EngineError as exc:  # the page shows how it ended; the log says why
            _log.warning("dashboard.resume_ended", session_id=session_id, error=str(exc))
        except asyncio.CancelledError:
            pass  # the server is stopping: the session stays resumable

    async def cancel(self, session_id: str) -> None:
        """Stop a session for good.

        Raises:
            SessionBusyError: another runner is running it and holds it.
            SessionNotFoundError.
        """
        await self.runner.cancel(validate_session_id(session_id))

    async def send_event(self, session_id: str, name: str, payload: str) -> None:
        """Put an event in the session's inbox; ``payload`` is JSON text (blank: null).

        Raises:
            InvalidArgumentError: the payload is not JSON, or the session cannot take it.
            SessionBusyError, SessionCancelledError, SessionExpiredError, SessionNotFoundError.
        """
        try:
            value = json.loads(payload) if payload.strip() else None
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"the event's payload is not JSON: {exc}") from None
        await self.runner.send_event(validate_session_id(session_id), name.strip(), value)

    async def remove(self, session_id: str) -> None:
        """Remove a session and everything stored for it, unless a runner holds it.

        Raises:
            SessionBusyError: a runner is running it: cancel it first.
            SessionNotFoundError.
        """
        store = self.runner.store
        lease = await store.acquire(validate_session_id(session_id), OWNER)
        if lease is None:
            raise SessionBusyError(
                f"session {session_id} is being run right now; cancel it before removing it"
            )
        try:
            if not await store.delete(session_id):
                raise SessionNotFoundError(f"session {session_id} not found")
        finally:
            await store.release(lease)
