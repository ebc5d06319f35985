"""SessionManager: the session API of the original spec, on top of any Store."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from .crypto import Shredding
from .errors import (
    EngineError,
    InvalidArgumentError,
    SessionExpiredError,
    SessionLimitError,
    SessionNotFoundError,
    StorageError,
)
from .log import get_logger
from .models import (
    CleanupResult,
    Session,
    SessionContext,
    SessionInfo,
    SessionMetadata,
    SessionMetrics,
    TtlPolicy,
    to_seconds,
    utcnow,
)
from .stores.base import Store, count_unexpired, list_pages, validate_session_id

_log = get_logger()

ContextLike = SessionContext | Mapping[str, Any] | None
MetadataLike = SessionMetadata | Mapping[str, Any] | None


class SessionManager:
    """Create, find, update, expire and measure sessions.

    Args:
        store: where sessions live.
        default_ttl: seconds (or a timedelta) a session lives without activity.
        max_sessions: most unexpired sessions the store may hold; None for no limit.
        cleanup_interval: seconds between background sweeps of expired sessions;
            None or 0 turns the sweep off (``perform_cleanup`` still works).
        ttl_policy: ``"sliding"`` (each update or checkpoint extends the expiry)
            or ``"fixed"`` (a session expires ``ttl`` after its creation).
    """

    def __init__(
        self,
        store: Store,
        *,
        default_ttl: float | timedelta = 3600,
        max_sessions: int | None = None,
        cleanup_interval: float | timedelta | None = 300,
        ttl_policy: TtlPolicy = "sliding",
    ) -> None:
        if max_sessions is not None and max_sessions < 1:
            raise InvalidArgumentError(f"max_sessions must be at least 1, got {max_sessions}")
        if ttl_policy not in ("sliding", "fixed"):
            raise InvalidArgumentError(
                f"ttl_policy must be 'sliding' or 'fixed', got {ttl_policy!r}"
            )
        self.store = store
        self.default_ttl = to_seconds(default_ttl)
        self.max_sessions = max_sessions
        self.cleanup_interval = to_seconds(cleanup_interval) if cleanup_interval else None
        self.ttl_policy: TtlPolicy = ttl_policy
        self._cleanup_task: asyncio.Task[None] | None = None
        self._cleanup_stopped = False
        self._closed = False

    async def __aenter__(self) -> SessionManager:
        self._start_cleanup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- creating and finding -------------------------------------------------

    def new_session(
        self,
        context: ContextLike = None,
        *,
        ttl: float | timedelta | None = None,
        metadata: MetadataLike = None,
        session_id: str | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Session:
        """Build a session in memory, validated but not yet stored."""
        now = utcnow()
        seconds = self.default_ttl if ttl is None else to_seconds(ttl)
        try:
            session = Session(
                id=str(uuid.uuid4()) if session_id is None else validate_session_id(session_id),
                context=SessionContext.model_validate(context or {}),
                metadata=SessionMetadata.model_validate(metadata or {}),
                state=dict(state or {}),
                created_at=now,
                last_activity=now,
                expires_at=now,
                ttl=seconds,
                ttl_policy=self.ttl_policy,
            )
        except ValidationError as exc:
            raise EngineError(f"invalid session: {exc}") from None
        session.touch(now)
        return session

    async def insert_session(self, session: Session) -> Session:
        """Store a session built by ``new_session``, enforcing ``max_sessions``."""
        self._start_cleanup()
        if self.max_sessions is not None:
            live = await count_unexpired(self.store, utcnow())
            if live >= self.max_sessions:
                raise SessionLimitError(
                    f"cannot create session: {live} unexpired sessions, limit {self.max_sessions}"
                )
        await self.store.create(session)
        _log.info("session.created", session_id=session.id, ttl=session.ttl)
        return session

    async def create_session(
        self,
        context: ContextLike = None,
        *,
        ttl: float | timedelta | None = None,
        metadata: MetadataLike = None,
        session_id: str | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create and store a session.

        Raises:
            SessionLimitError: ``max_sessions`` unexpired sessions already exist.
            SessionExistsError: ``session_id`` is already stored.
        """
        session = self.new_session(
            context, ttl=ttl, metadata=metadata, session_id=session_id, state=state
        )
        return await self.insert_session(session)

    async def get_session(self, session_id: str) -> Session | None:
        """Return the session, or None if the id is malformed, unknown or expired.

        Raises:
            CorruptSessionError: the stored session is damaged; it is never hidden.
        """
        try:
            validate_session_id(session_id)
        except EngineError:
            return None
        self._start_cleanup()
        session = await self.store.load(session_id)
        if session is None or session.is_expired():
            return None
        return session

    async def update_session(self, session: Session) -> None:
        """Save a changed session, recording activity (and sliding its expiry).

        Raises:
            SessionExpiredError: the session expired before this update.
            SessionNotFoundError: the session was removed.
            SessionBusyError: a runner is running the session right now.
        """
        if session.is_expired():
            raise SessionExpiredError(f"session {session.id} has expired")
        session.touch()
        await self.store.save(session)

    async def remove_session(self, session_id: str, *, shred: bool = False) -> bool:
        """Remove a session; return whether it existed.

        With ``shred``, the session's data key is destroyed first, so that any copy
        of its records left behind (a backup, a lost disk) can never be decrypted.

        Raises:
            EngineError: ``shred`` on a store that cannot shred, or on a session
                stored in clear (nothing is removed then).
        """
        session_id = validate_session_id(session_id)
        if not shred:
            return await self.store.delete(session_id)
        if not isinstance(self.store, Shredding):
            raise EngineError(f"{type(self.store).__name__} cannot shred sessions")
        return await self.store.shred(session_id)

    async def get_all_sessions(self) -> list[Session]:
        """Return every stored session, expired ones not yet cleaned up included."""
        sessions = []
        for row in await self.store.list():
            session = await self.store.load(row.id)
            if session is not None:
                sessions.append(session)
        return sessions

    async def get_active_sessions(self) -> list[Session]:
        """Return every unexpired session, whatever its status."""
        now = utcnow()
        return [s for s in await self.get_all_sessions() if not s.is_expired(now)]

    @contextlib.asynccontextmanager
    async def use_session(self, session_id: str) -> AsyncIterator[Session]:
        """Lend a live session for a block of work, and save it if the block succeeds.

        Raises:
            SessionNotFoundError: the id is malformed, unknown or expired.
        """
        session = await self.get_session(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} not found or expired")
        session.touch()
        yield session
        await self.update_session(session)

    # -- expiry and analytics -------------------------------------------------

    async def perform_cleanup(self) -> CleanupResult:
        """Remove every expired session; unreadable ones are kept and reported."""
        started = time.perf_counter()
        now = utcnow()
        cleaned, skipped = 0, dict[str, str]()
        # Keyset pages (deleting cannot shift them), of the sessions that may have expired.
        async for page in list_pages(self.store, expired_at=now):
            for row in page:
                cleaned += await self._clean(row, now, skipped)
        result = CleanupResult(
            cleaned_sessions=cleaned, duration=time.perf_counter() - started, skipped=skipped
        )
        if cleaned or skipped:
            _log.info("cleanup.done", cleaned=cleaned, skipped=len(skipped))
        return result

    async def _clean(self, row: SessionInfo, now: datetime, skipped: dict[str, str]) -> int:
        """Delete the row's session if it is expired; return how many were deleted (0 or 1)."""
        if row.problem is not None:
            skipped[row.id] = row.problem
            return 0
        if not row.is_expired(now):
            return 0
        # Read it first: a listing may come from clear columns only (SQL stores), and a
        # session that is damaged, locked by a key, or refreshed since the listing must
        # not be deleted.
        try:
            session = await self.store.load(row.id)
        except StorageError as exc:
            skipped[row.id] = str(exc)
            return 0
        if session is None or not session.is_expired(now):
            return 0
        return int(await self.store.delete(row.id))

    async def collect_metrics(self) -> SessionMetrics:
        """Count sessions, active sessions, average duration and tool usage."""
        now = utcnow()
        total = active = unreadable = 0
        durations: list[float] = []
        tools: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        async for page in list_pages(self.store):
            for row in page:
                session = None if row.problem else await self.store.load(row.id)
                if session is None:
                    unreadable += 1
                    continue
                total += 1
                active += not session.is_expired(now)
                statuses[session.status] += 1
                durations.append((session.last_activity - session.created_at).total_seconds())
                tools.update(result.name for result in session.tool_history)
        return SessionMetrics(
            total_sessions=total,
            active_sessions=active,
            average_session_duration=sum(durations) / len(durations) if durations else 0.0,
            tool_usage_stats=dict(tools),
            status_counts=dict(statuses),
            unreadable_sessions=unreadable,
            collected_at=now,
        )

    # -- lifecycle --------------------------------------------------------------

    def _start_cleanup(self) -> None:
        if self.cleanup_interval and self._cleanup_task is None and not self._cleanup_stopped:
            self._cleanup_task = asyncio.get_running_loop().create_task(
                self._cleanup_forever(self.cleanup_interval), name="stepvault-cleanup"
            )

    async def _cleanup_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.perform_cleanup()
            except EngineError as exc:  # keep sweeping: the next pass may succeed
                _log.warning("cleanup.failed", error=str(exc))

    def stop_cleanup(self) -> None:
        """Stop the background sweep; the manager keeps working otherwise."""
        self._cleanup_stopped = True
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Shut down gracefully: stop the sweep, then close the store. Idempotent."""
        if self._closed:
            return
        self._closed = self._cleanup_stopped = True
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.store.close()
