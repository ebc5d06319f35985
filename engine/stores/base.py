"""The Store protocol every storage backend implements, and the policy they share."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeVar, cast, runtime_checkable

from .. import codec
from ..crypto import SEAL_OVERHEAD
from ..errors import InvalidArgumentError, InvalidSessionIdError, StorageError
from ..models import Checkpoint, Session, SessionInfo

Durability = Literal["fsync", "batch", "none"]
"""``fsync``: each commit durable before it returns. ``batch``: the same promise, with
concurrent commits sharing one sync (group commit). ``none``: no sync, tests only."""
DURABILITY_MODES: tuple[str, ...] = ("fsync", "batch", "none")


@dataclass(frozen=True, slots=True)
class Lease:
    """Proof that one runner owns a session; every checkpoint is committed under one.

    ``token`` fences commits: a store accepts a checkpoint only under the lease it
    handed out last. ``takeovers`` counts how many holders in a row stopped without
    releasing it (they crashed), so a runner can park a session that crashes every
    process that runs it instead of looping forever.
    """

    session_id: str
    owner: str
    token: int = 0
    takeovers: int = 0


DEFAULT_LEASE_TTL = 30.0
"""Seconds a lease lasts without a heartbeat where the store cannot see a holder die."""


@runtime_checkable
class Store(Protocol):
    """Storage primitives only: policy (TTL, limits, workflows) lives above the store.

    Every method validates the session id before it touches storage. ``commit`` is
    the hot path: one atomic, durable write whose cost depends on the checkpoint's
    size, never on the session's history.
    """

    async def create(self, session: Session) -> None:
        """Store a new session atomically; ``SessionExistsError`` if the id is taken."""
        ...

    async def load(self, session_id: str) -> Session | None:
        """Return the session, or None if unknown; ``CorruptSessionError`` if damaged."""
        ...

    async def save(self, session: Session) -> None:
        """Replace a stored session whole and bump ``session.revision``.

        ``SessionNotFoundError`` if it is gone, ``SessionBusyError`` while anyone
        holds its lease, ``StorageError`` (``check_fresh``) if ``session`` is a copy
        read before the stored session last changed.
        """
        ...

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Apply one checkpoint atomically and durably; ``LeaseLostError`` without the lease.

        Cancelled, it raises the cancellation only once nothing of the write is
        still running (it happened, or never will): the runner then reads the
        session again, and gives the lease back knowing no write can follow.
        """
        ...

    async def delete(self, session_id: str) -> bool:
        """Remove a session; return whether it existed."""
        ...

    async def list(self) -> list[SessionInfo]:
        """Return one row per stored session, unreadable ones with ``problem`` set."""
        ...

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Take the session's lease for ``ttl`` seconds, or None when another holds it."""
        ...

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Extend a lease by ``ttl`` seconds; ``LeaseLostError`` if it was taken over."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give a lease back; releasing a lease twice is harmless."""
        ...

    async def close(self) -> None:
        """Release every lease and resource; closing twice is harmless."""
        ...


_T = TypeVar("_T")

LIST_PAGE = 1000
"""Rows per page when the engine walks every stored session."""


@runtime_checkable
class PagedListing(Protocol):
    """A store that lists its sessions a page at a time, in id order.

    Walking 100,000 sessions with ``list()`` holds 100,000 rows at once and starts
    nothing before the last is read; page by page, memory stays one page and work
    starts after the first.
    """

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after`` (from the first if None)."""
        ...


@runtime_checkable
class UnfinishedListing(Protocol):
    """A store that can list the sessions that may be unfinished without the others.

    ``resume_all`` wants the unfinished sessions; in a store that has run for a
    while most are finished, and reading each to learn so is most of the walk.
    """

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> list[SessionInfo]:
        """Like ``list_page``, skipping sessions known to be finished.

        Every unfinished session is in some page; a finished one may be too (the
        caller checks each row's status).
        """
        ...


@runtime_checkable
class ExpiredListing(Protocol):
    """A store that can list the sessions that may have expired without the others.

    A cleanup sweep wants the expired sessions; reading every session to learn
    its expiry, sweep after sweep, is most of the sweep's work.
    """

    async def list_expired_page(
        self, now: datetime, after: str | None = None, limit: int = LIST_PAGE
    ) -> list[SessionInfo]:
        """Like ``list_page``, skipping sessions known not to be expired at ``now``.

        Every session expired by ``now`` is in some page; an unexpired one may be
        too (the caller checks each row's expiry).
        """
        ...


@runtime_checkable
class UnexpiredCount(Protocol):
    """A store that can count its unexpired sessions without reading every one.

    ``max_sessions`` counts them before every create; reading every session for
    each create makes creating the n-th session cost n reads.
    """

    async def count_unexpired(self, now: datetime) -> int:
        """Return how many sessions are not expired at ``now``, as a listing counts them.

        An unreadable session counts (its listing row has no expiry to have passed).
        """
        ...


async def count_unexpired(store: Store, now: datetime) -> int:
    """Count the sessions not expired at ``now``, by the store's own count if it has one."""
    if isinstance(store, UnexpiredCount):
        return await store.count_unexpired(now)
    live = 0
    async for page in list_pages(store):
        live += sum(1 for row in page if not row.is_expired(now))
    return live


async def to_the_end(work: Awaitable[_T]) -> _T:
    """Await ``work``; if cancelled meanwhile, let it finish first, then raise.

    A store raises a commit's cancellation only once nothing of it still runs (the
    writer then reads the session again): a thread cannot be stopped, and a
    statement abandoned mid-flight could still commit on the server, after the
    runner had moved on or another runner had taken the session.
    """
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # seen here: the caller gets the cancellation
        raise


INLINE_TURN = 0.002
"""Seconds of inline commits after which a store hands the event loop to its other tasks."""


class LoopTurns:
    """Hand the event loop to its other tasks now and then between inline commits.

    A commit on the loop's thread suspends nothing, so a session of steps that await
    nothing else would keep the loop to itself. Yielding after every commit costs a
    turn of the loop per step (about a tenth of the engine's time per step);
    yielding once ``INLINE_TURN`` has passed since the last yield keeps timers and
    other requests waiting no longer than that plus one step and its commit.
    """

    def __init__(self) -> None:
        self._due = 0.0

    async def maybe(self) -> None:
        """Yield to the loop if ``INLINE_TURN`` passed since the last time."""
        now = time.monotonic()
        if now >= self._due:
            self._due = now + INLINE_TURN
            await asyncio.sleep(0)


async def list_pages(
    store: Store,
    limit: int = LIST_PAGE,
    *,
    unfinished: bool = False,
    expired_at: datetime | None = None,
) -> AsyncIterator[list[SessionInfo]]:
    """Yield every stored session's row, a page at a time where the store can page.

    With ``unfinished``, a store that can skips the sessions it knows are finished;
    with ``expired_at``, the sessions it knows are not expired at that time.
    """
    if not isinstance(store, PagedListing):
        yield await store.list()
        return
    skip_finished = unfinished and isinstance(store, UnfinishedListing)
    skip_unexpired = expired_at is not None and isinstance(store, ExpiredListing)
    after: str | None = None
    while True:
        if skip_finished:
            page = await cast(UnfinishedListing, store).list_unfinished_page(after, limit)
        elif skip_unexpired:
            assert expired_at is not None  # checked above
            page = await cast(ExpiredListing, store).list_expired_page(expired_at, after, limit)
        else:
            page = await store.list_page(after, limit)
        if not page:  # only an empty page ends it: a store may return a short one
            return  # (a file store skips a session deleted while it read the page)
        yield page
        after = page[-1].id


_CANONICAL_UUID4 = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)


def is_session_id(name: str) -> bool:
    """Tell whether ``name`` is a canonical session id (a folder name, say)."""
    return _CANONICAL_UUID4.fullmatch(name) is not None


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a canonical UUIDv4 string, else raise.

    Runs before an id touches a path or a query, so ``../x`` never reaches storage.
    It runs on every commit too: one regular expression, no UUID object.
    """
    if isinstance(session_id, str) and _CANONICAL_UUID4.fullmatch(session_id):
        return session_id
    try:
        uuid.UUID(str(session_id)[:64])
    except ValueError:
        raise InvalidSessionIdError(
            f"invalid session id {str(session_id)[:64]!r}: not a UUID"
        ) from None
    raise InvalidSessionIdError(f"invalid session id {session_id!r}: expected a lowercase UUIDv4")


def new_session_body(session: Session, *, sealed: bool) -> bytes:
    """Encode a session about to be created, refusing bad data before storage is touched.

    A bad id, a value that is not JSON or a record too large creates nothing, not
    even a data key.
    """
    validate_session_id(session.id)
    body = codec.dump_json(session, f"session {session.id}")
    codec.check_record_size(session.revision, len(body) + (SEAL_OVERHEAD if sealed else 0))
    return body


def check_fresh(session_id: str, revision: int, stored_revision: int) -> None:
    """Refuse to ``save`` a copy of a session read before its latest change.

    ``revision`` is the copy's revision (the one it was read at). Replacing the
    session whole with a stale copy would silently erase the checkpoints
    committed since it was read, so completed steps would run again.

    Raises:
        StorageError: ``revision`` is not the stored revision.
    """
    if revision != stored_revision:
        raise StorageError(
            f"session {session_id} changed since this copy was read (copy at revision "
            f"{revision}, stored revision {stored_revision}): load it again"
        )


def check_durability(durability: str, supported: tuple[str, ...] = ("fsync", "none")) -> Durability:
    """Validate a durability mode name against the modes a store ``supported``.

    Raises:
        InvalidArgumentError: an unknown mode, or one this store does not offer.
    """
    if durability not in supported:
        raise InvalidArgumentError(f"durability must be one of {supported}, got {durability!r}")
    return cast(Durability, durability)
