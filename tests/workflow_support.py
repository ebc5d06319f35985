"""Helpers for the workflow-feature tests (retries, events, tools, fork...). Not a test module.

- ``Stores``: stores over one set of sessions, as successive processes see them.
- ``eventually``: poll a condition on the event loop until it holds, with a deadline.
- ``InboxStore``: a MemoryStore that also takes events without the lease, exactly
  as ``engine.events.EventInbox`` specifies: the reference the real stores follow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine import FileStore, MemoryStore, Session, SessionNotFoundError, Store
from engine.models import Checkpoint, Event
from engine.stores.base import Lease

QUICK_RETRY: dict[str, Any] = {"backoff": 0.001, "max_backoff": 0.005}
"""Step options keeping retry waits tiny (tenacity's jitter alone can add a second)."""


class Stores:
    """Open stores over one set of sessions: the MemoryStore again, or a new FileStore."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind = kind
        self.path = path
        self._memory = MemoryStore()
        self._opened: list[Store] = []

    def open(self) -> Store:
        """Return a store over the same sessions, as a restarted process would see them."""
        store: Store = (
            self._memory if self.kind == "memory" else FileStore(self.path, durability="none")
        )
        self._opened.append(store)
        return store

    async def load(self, session_id: str) -> Session:
        """Read a session through a fresh store; fail if it is not stored."""
        session = await self.open().load(session_id)
        assert session is not None, f"session {session_id} is not stored"
        return session

    async def close(self) -> None:
        """Close every store opened."""
        for store in self._opened:
            await store.close()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` (sync or async) until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {within}s"
        await asyncio.sleep(0.005)


class InboxStore(MemoryStore):
    """A MemoryStore with ``post_event``: events are taken even while a lease is held."""

    def __init__(self) -> None:
        super().__init__()
        self.posted: dict[str, list[Event]] = {}
        self._numbers: dict[str, int] = {}

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox outside any lease; return its number."""
        if await super().load(session_id) is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        posted = self.posted.setdefault(session_id, [])
        for earlier in posted:
            if earlier.id == event.id and earlier.seq is not None:
                return earlier.seq
        number = self._numbers[session_id] = self._numbers.get(session_id, 0) + 1
        posted.append(event.model_copy(update={"seq": number}))
        return number

    async def load(self, session_id: str) -> Session | None:
        """Return the session with the events posted past its ``inbox_seq`` in its inbox."""
        session = await super().load(session_id)
        if session is not None:
            fresh = [
                e
                for e in self.posted.get(session_id, [])
                if e.seq is not None and e.seq > session.inbox_seq
            ]
            session.inbox.extend(fresh)
        return session

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Commit, then forget the posted events the session has absorbed."""
        await super().commit(lease, checkpoint)
        if checkpoint.inbox_seq is not None:
            kept = self.posted.get(lease.session_id, [])
            self.posted[lease.session_id] = [
                e for e in kept if e.seq is not None and e.seq > checkpoint.inbox_seq
            ]

    async def delete(self, session_id: str) -> bool:
        """Remove a session and its posted events."""
        self.posted.pop(session_id, None)
        return await super().delete(session_id)
