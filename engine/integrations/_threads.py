"""Conversation threads kept as stepvault sessions: one session per thread.

A thread's records (checkpoints, channel values, pending writes) are JSON values
under flat keys of the session's ``state``. Every change is one ``Checkpoint``
committed under the session's lease whose ``state_set``/``state_unset`` hold only
the keys that changed, so a write costs its own size and a thread's storage grows
with what was written, never with how often it was rewritten. This module knows
nothing of LangGraph: ``langgraph.py`` decides what the records mean.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

from ..errors import (
    CorruptSessionError,
    DecryptionError,
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..models import Checkpoint, Session, SessionMetadata, TtlPolicy, utcnow
from ..stores.base import Lease, Store

WORKFLOW = "langgraph"
"""The ``workflow`` of every thread's session: ``stepvault sessions ls --workflow langgraph``."""

THREAD_KEY = "langgraph_thread_id"
"""The session metadata key holding the thread id the session was derived from."""

_MIRRORS = 256
"""Threads whose records stay in memory between writes (least recently used first out)."""

_STRIPES = 64
"""Locks serialising this process's work on a thread, shared by hash."""

_LEASE_TTL = 30.0
_T = TypeVar("_T")


@dataclass
class _Held:
    """A lease this process keeps between writes, and when it last renewed it."""

    lease: Lease
    renewed: float
    idle: asyncio.TimerHandle | None = None


def session_id_for(thread_id: str) -> str:
    """Return the session id that holds a thread: a UUIDv4 derived from its SHA-256.

    A thread id is any string; session ids must be UUIDv4, so the id is derived,
    the same in every process, and the thread id is kept in the session metadata.
    """
    digest = hashlib.sha256(b"stepvault.langgraph\x00" + thread_id.encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


# -- record keys --------------------------------------------------------------------


def checkpoint_key(ns: str, checkpoint_id: str) -> str:
    """Key of a checkpoint record."""
    return _key("checkpoint", ns, checkpoint_id)


def blob_key(ns: str, channel: str, version: object) -> str:
    """Key of one channel's value at one version."""
    return _key("blob", ns, channel, str(version))


def write_key(ns: str, checkpoint_id: str, task_id: str, idx: int) -> str:
    """Key of one pending write of a task."""
    return _key("write", ns, checkpoint_id, task_id, str(idx))


def _key(*parts: str) -> str:
    # '/' separates parts; '%' and '/' inside a part are escaped, so any string works.
    return "/".join(part.replace("%", "%25").replace("/", "%2F") for part in parts)


def _parts(key: str) -> list[str]:
    return [unquote(part) for part in key.split("/")]


@dataclass(frozen=True, slots=True)
class Changes:
    """The keys one commit sets and removes, or ``drop``: remove the whole thread."""

    set: dict[str, Any] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    drop: bool = False

    def __bool__(self) -> bool:
        return bool(self.set or self.unset or self.drop)


@dataclass(frozen=True, slots=True)
class Write:
    """One pending write as stored: where it belongs and its record."""

    ns: str
    checkpoint_id: str
    task_id: str
    idx: int
    key: str
    record: Any


@dataclass
class Thread:
    """One thread's records as last read or written here, indexed for lookups."""

    thread_id: str
    session_id: str
    revision: int
    created_at: datetime
    ttl: float
    ttl_policy: TtlPolicy
    expires_at: datetime
    records: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, set[str]] = field(default_factory=dict)
    writes: dict[tuple[str, str], dict[str, Write]] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    """The caller's notes about this thread, forgotten with the mirror."""

    @classmethod
    def of(cls, session: Session, thread_id: str) -> Thread:
        """Index a loaded session.

        Raises:
            SessionExistsError: the session is not this thread's (another owner's id).
        """
        owner = (session.metadata.model_extra or {}).get(THREAD_KEY)
        if session.workflow != WORKFLOW or owner != thread_id:
            raise SessionExistsError(
                f"session {session.id} exists and does not hold LangGraph thread {thread_id!r}"
            )
        thread = cls(
            thread_id=thread_id,
            session_id=session.id,
            revision=session.revision,
            created_at=session.created_at,
            ttl=session.ttl,
            ttl_policy=session.ttl_policy,
            expires_at=session.expires_at,
        )
        thread.apply(Changes(set=session.state))
        return thread

    def apply(self, changes: Changes) -> None:
        """Record committed changes in the indexes."""
        for key in changes.unset:
            self.records.pop(key, None)
            self._index(key, None)
        for key, record in changes.set.items():
            self.records[key] = record
            self._index(key, record)

    def _index(self, key: str, record: Any) -> None:
        kind, _, _ = key.partition("/")
        if kind == "checkpoint":
            _, ns, checkpoint_id = _parts(key)
            ids = self.checkpoints.setdefault(ns, set())
            if record is None:
                ids.discard(checkpoint_id)
            else:
                ids.add(checkpoint_id)
        elif kind == "write":
            _, ns, checkpoint_id, task_id, idx = _parts(key)
            writes = self.writes.setdefault((ns, checkpoint_id), {})
            if record is None:
                writes.pop(key, None)
            else:
                writes[key] = Write(ns, checkpoint_id, task_id, int(idx), key, record)

    def is_expired(self, now: datetime) -> bool:
        """Tell whether the session's TTL has run out."""
        return self.expires_at <= now

    def expiry_after(self, now: datetime) -> datetime:
        """Return the expiry that activity at ``now`` gives, under the session's policy."""
        start = now if self.ttl_policy == "sliding" else self.created_at
        return start + timedelta(seconds=self.ttl)

    def namespaces(self) -> list[str]:
        """Return the namespaces holding at least one checkpoint."""
        return [ns for ns, ids in self.checkpoints.items() if ids]

    def checkpoint_ids(self, ns: str) -> set[str]:
        """Return the checkpoint ids of a namespace."""
        return self.checkpoints.get(ns, set())

    def writes_of(self, ns: str, checkpoint_id: str) -> Iterable[Write]:
        """Return the pending writes stored against one checkpoint."""
        return self.writes.get((ns, checkpoint_id), {}).values()

    def blob_keys(self) -> Iterator[str]:
        """Yield the keys of every stored channel value."""
        return (key for key in self.records if key.startswith("blob/"))


class ThreadStore:
    """Read and change threads in a stepvault store, one lease-guarded commit per change.

    Reads always load the session, so writes made by other processes are seen.
    Writes go through a mirror of what this process last read or wrote; the store
    refuses a commit built on a stale mirror (its revision check), and the change
    is then planned again on a fresh load. A thread's lease is kept for ``hold``
    seconds after its last write: the writes of one run then share it, and a store
    that re-reads a session on every new lease (the file store) need not.
    """

    def __init__(self, store: Store, *, ttl: float, lease_wait: float, hold: float) -> None:
        self.store = store
        self.ttl = ttl
        self.lease_wait = lease_wait
        self.hold = hold
        self.owner = f"langgraph-{uuid.uuid4()}"
        self._mirrors: OrderedDict[str, Thread] = OrderedDict()
        self._locks: list[asyncio.Lock] = []
        self._held: dict[str, _Held] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    async def read(self, thread_id: str, view: Callable[[Thread | None], _T]) -> _T:
        """Load a thread and return ``view`` of it (None if absent or expired)."""
        session_id = session_id_for(thread_id)
        async with self._lock(session_id):
            return view(await self._load(thread_id, session_id, purge_expired=False))

    async def read_all(self, view: Callable[[Thread], Iterable[_T]]) -> list[_T]:
        """Return ``view`` of every unexpired thread in the store, concatenated."""
        now = utcnow()
        found: list[_T] = []
        for row in await self.store.list():
            if row.workflow != WORKFLOW or row.problem is not None or row.is_expired(now):
                continue
            session = await self.store.load(row.id)
            thread_id = (
                None if session is None else (session.metadata.model_extra or {}).get(THREAD_KEY)
            )
            if session is not None and isinstance(thread_id, str):
                found.extend(view(Thread.of(session, thread_id)))
        return found

    async def change(self, thread_id: str, plan: Callable[[Thread | None], Changes]) -> None:
        """Commit the changes ``plan`` makes to the thread (created on its first write).

        ``plan`` may be called twice: again on a fresh load when another process
        wrote to the thread since this one last saw it.
        """
        session_id = session_id_for(thread_id)
        async with self._lock(session_id):
            thread = self._mirror(session_id)
            if thread is None:
                thread = await self._load(thread_id, session_id, purge_expired=True)
            for last_try in (False, True):
                changes = plan(thread)
                if not changes:
                    return
                try:
                    if changes.drop:
                        await self._drop(session_id)
                    elif thread is None:
                        await self._create(thread_id, session_id, changes)
                    else:
                        await self._commit(thread, changes)
                    return
                except (
                    SessionExistsError,
                    SessionNotFoundError,
                    StorageError,
                    LeaseLostError,
                ) as exc:
                    stale = not isinstance(exc, (CorruptSessionError, DecryptionError))
                    if last_try or not stale:
                        raise
                    thread = await self._load(thread_id, session_id, purge_expired=True)

    async def delete(self, thread_id: str) -> None:
        """Remove a thread's session, if there is one."""
        session_id = session_id_for(thread_id)
        async with self._lock(session_id):
            await self._drop(session_id)

    async def close(self) -> None:
        """Give back every lease kept, then close the store."""
        await asyncio.gather(*self._releasing)
        for session_id in list(self._held):
            await self._let_go(session_id)
        self._mirrors.clear()
        await self.store.close()

    # -- implementation ------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        if not self._locks:  # made on the loop that uses them
            self._locks = [asyncio.Lock() for _ in range(_STRIPES)]
        return self._locks[int(session_id[:8], 16) % _STRIPES]

    def _mirror(self, session_id: str) -> Thread | None:
        thread = self._mirrors.get(session_id)
        if thread is not None:
            self._mirrors.move_to_end(session_id)
        return thread

    def _remember(self, thread: Thread) -> None:
        self._mirrors[thread.session_id] = thread
        self._mirrors.move_to_end(thread.session_id)
        while len(self._mirrors) > _MIRRORS:
            self._mirrors.popitem(last=False)

    async def _load(self, thread_id: str, session_id: str, *, purge_expired: bool) -> Thread | None:
        self._mirrors.pop(session_id, None)
        session = await self.store.load(session_id)
        if session is None:
            return None
        thread = Thread.of(session, thread_id)
        if thread.is_expired(utcnow()):
            if purge_expired:  # about to write: the expired thread starts over
                await self.store.delete(session_id)
            return None
        self._remember(thread)
        return thread

    async def _create(self, thread_id: str, session_id: str, changes: Changes) -> None:
        now = utcnow()
        session = Session(
            id=session_id,
            created_at=now,
            last_activity=now,
            expires_at=now + timedelta(seconds=self.ttl),
            ttl=self.ttl,
            status="completed",  # nothing for a stepvault runner to drive: LangGraph does
            workflow=WORKFLOW,
            metadata=SessionMetadata(
                origin="langgraph", tags=["langgraph"], **{THREAD_KEY: thread_id}
            ),
            state=changes.set,
        )
        await self.store.create(session)
        self._remember(Thread.of(session, thread_id))

    async def _commit(self, thread: Thread, changes: Changes) -> None:
        lease = await self._lease(thread.session_id)
        now = utcnow()
        try:
            await self.store.commit(
                lease,
                Checkpoint(
                    revision=thread.revision + 1,
                    status="completed",
                    last_activity=now,
                    expires_at=thread.expiry_after(now),
                    state_set=changes.set,
                    state_unset=changes.unset,
                ),
            )
        except BaseException:
            await self._let_go(thread.session_id)
            raise
        self._release_when_idle(thread.session_id)
        thread.revision += 1
        thread.expires_at = thread.expiry_after(now)
        thread.apply(changes)

    async def _drop(self, session_id: str) -> None:
        self._mirrors.pop(session_id, None)
        await self._let_go(session_id)
        await self.store.delete(session_id)

    async def _lease(self, session_id: str) -> Lease:
        """Return the lease kept for this session (renewed when due), or take it."""
        held = self._held.get(session_id)
        if held is not None and time.monotonic() - held.renewed > _LEASE_TTL / 3:
            try:
                await self.store.renew(held.lease, ttl=_LEASE_TTL)
                held.renewed = time.monotonic()
            except LeaseLostError:
                await self._let_go(session_id)
                held = None
        if held is not None:
            return held.lease
        lease = await self._acquire(session_id)
        self._held[session_id] = _Held(lease, time.monotonic())
        return lease

    def _release_when_idle(self, session_id: str) -> None:
        held = self._held.get(session_id)
        if held is None:
            return
        if held.idle is not None:
            held.idle.cancel()
        held.idle = asyncio.get_running_loop().call_later(
            self.hold, self._start_release, session_id, held
        )

    def _start_release(self, session_id: str, held: _Held) -> None:
        task = asyncio.get_running_loop().create_task(self._release_idle(session_id, held))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_idle(self, session_id: str, held: _Held) -> None:
        async with self._lock(session_id):  # never in the middle of a write
            if self._held.get(session_id) is held:
                await self._let_go(session_id)

    async def _let_go(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is None:
            return
        if held.idle is not None:
            held.idle.cancel()
        await self.store.release(held.lease)

    async def _acquire(self, session_id: str) -> Lease:
        deadline = time.monotonic() + self.lease_wait
        delay = 0.001
        while True:
            lease = await self.store.acquire(session_id, self.owner, ttl=_LEASE_TTL)
            if lease is not None:
                return lease
            if time.monotonic() >= deadline:
                raise SessionBusyError(
                    f"session {session_id} stayed leased by another process for {self.lease_wait}s"
                )
            await asyncio.sleep(delay)  # another process is writing: back off briefly
            delay = min(delay * 2, 0.05)
