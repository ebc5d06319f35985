"""Events and durable waits: delivering an event, and knowing when a wait is over.

A step waits with ``ctx.wait_for_event`` or ``ctx.sleep``; the session is then
``waiting`` and holds no lease. An event is kept in the session's inbox until a
step takes it, so one sent before the wait is not lost.

Delivery. A store that implements ``EventInbox`` takes an event without the
session's lease, even while another runner (in any process) runs the session.
Any other store takes it through a checkpoint, which needs the lease: the runner
holding the session commits it, or the sender takes the lease when it is free (the
session is waiting or stopped); while another runner holds it, ``SessionBusyError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from .errors import SessionBusyError, SessionNotFoundError
from .journal import SessionWriter
from .models import UNFINISHED, Event, Session
from .stores.base import Lease, Store


@runtime_checkable
class EventInbox(Protocol):
    """A store that takes events without the session's lease.

    ``post_event`` appends ``event`` durably to the session's inbox, whoever holds
    the lease, and returns its number there (1, 2, ... per session; posting an
    ``event.id`` already there returns its number again). ``load`` returns the
    session with each posted event numbered above ``session.inbox_seq`` appended to
    ``session.inbox``, in order, with ``seq`` set. A committed checkpoint whose
    ``inbox_seq`` is n lets the store forget its posted events numbered n or less:
    that checkpoint's ``events_added`` carries the ones not yet taken into the
    session itself.
    """

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox; ``SessionNotFoundError`` if unknown."""
        ...


def ready(session: Session, now: datetime) -> bool:
    """Tell whether a runner can move the session on now.

    A waiting session is ready once its event is in the inbox or its time is up; a
    session parked for an operator never is (an operator resumes it).
    """
    wait = session.wait
    if session.status != "waiting" or wait is None:
        return session.status in UNFINISHED
    if wait.kind == "operator":
        return False
    if wait.until is not None and wait.until <= now:
        return True
    return wait.kind == "event" and any(event.name == wait.event for event in session.inbox)


def parked(session: Session) -> bool:
    """Tell whether the session waits for an operator (its failure policy is ``park``)."""
    return (
        session.status == "waiting" and session.wait is not None and session.wait.kind == "operator"
    )


async def deliver(
    store: Store,
    session_id: str,
    event: Event,
    *,
    holder: SessionWriter | None,
    acquire: Callable[[str], Awaitable[Lease | None]],
) -> None:
    """Store ``event`` in the session's inbox durably.

    Args:
        holder: this runner's writer for the session, if it holds the lease now.
        acquire: takes the session's lease (None if another holds it).

    Raises:
        SessionBusyError: another runner holds the lease and the store is no
            ``EventInbox``.
    """
    if holder is not None:  # ours: into the session now, so a waiting step takes it at once
        await holder.commit(keep_status=True, events_added=[event])
        return
    if isinstance(store, EventInbox):
        await store.post_event(session_id, event)
        return
    lease = await acquire(session_id)
    if lease is None:
        raise SessionBusyError(
            f"session {session_id} is being run by another runner, and "
            f"{type(store).__name__} takes events only with the session's lease; "
            "send it again once the session waits"
        )
    try:
        session = await store.load(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        writer = SessionWriter(store, lease, session)
        await writer.commit(keep_status=True, events_added=[event])
    finally:
        await store.release(lease)
