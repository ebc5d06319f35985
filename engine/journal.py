"""Committing a leased session's checkpoints, and journaling the step in flight.

``SessionWriter`` is the only thing that commits for a session a runner holds: one
checkpoint at a time, each applied to the session in memory once it is stored.
``StepJournal`` is what ``ctx.tool``, ``ctx.wait_for_event`` and ``ctx.sleep`` talk
to: it commits each finished call at once and replays it when the step runs again.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter

from .errors import InvalidArgumentError, SessionNotFoundError, StepTimeoutError
from .models import Checkpoint, Event, JournalEntry, Session, ToolKind, ToolResult, Wait, utcnow
from .stores.base import Lease, Store
from .values import digest, restore, to_json


class Suspended(BaseException):
    """Unwinds a step that must wait for an event or a long sleep.

    A BaseException, like ``asyncio.CancelledError``, so that a step's own
    ``except Exception`` cannot swallow it. The wait is already committed.
    """

    def __init__(self, wait: Wait) -> None:
        super().__init__(f"waiting ({wait.kind}) in step {wait.step!r}")
        self.wait = wait


@dataclass(frozen=True, slots=True)
class InFlight:
    """The attempt a runner is running for a session, so ``cancel`` can record it."""

    step: str
    attempt: int
    input_digest: str
    started_at: datetime
    started: float


class SessionWriter:
    """Commit one leased session's checkpoints, one at a time, and keep it current."""

    def __init__(self, store: Store, lease: Lease, session: Session) -> None:
        self.store = store
        self.lease = lease
        self.session = session
        self.in_flight: InFlight | None = None
        self._lock = asyncio.Lock()
        self._writing = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._uncertain = False

    async def commit(self, *, keep_status: bool = False, **changes: Any) -> None:
        """Commit a checkpoint made of ``changes`` and apply it to ``session``.

        With ``keep_status``, the checkpoint repeats the session's status, error and
        wait as they are when it is written (after the writes queued before it).

        If the caller is cancelled (a step timeout, a cancel) while the store
        writes, whether the checkpoint was stored is not known here: the session
        is read again from the store before the next commit, so the session in
        memory never falls behind the stored one. (A store's ``commit`` raises its
        cancellation only once nothing of the write is still running.) ``drain``
        waits for the writes of other tasks before the lease is given back.
        """
        self._writing += 1
        self._idle.clear()
        try:
            await self._write(changes, keep_status=keep_status)
        except asyncio.CancelledError:
            self._uncertain = True
            raise
        finally:
            self._writing -= 1
            if not self._writing:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for every write in flight; their errors were raised to their callers."""
        await self._idle.wait()

    async def _write(self, changes: dict[str, Any], *, keep_status: bool) -> None:
        async with self._lock:
            if self._uncertain:
                await self._reread()
            if keep_status:
                session = self.session
                changes = {
                    "status": session.status,
                    "error": session.error,
                    "wait": session.wait,
                    **changes,
                }
            now = utcnow()
            checkpoint = Checkpoint(
                revision=self.session.revision + 1,
                last_activity=now,
                expires_at=self.session.expiry_after(now),
                **changes,
            )
            await self.store.commit(self.lease, checkpoint)
            self.session.apply(checkpoint)

    async def _reread(self) -> None:
        """Bring ``session`` (the very object everyone holds) back in step with the store."""
        stored = await self.store.load(self.session.id)
        if stored is None:
            raise SessionNotFoundError(f"session {self.session.id} was removed")
        for name in type(stored).model_fields:
            setattr(self.session, name, getattr(stored, name))
        self._uncertain = False


class StepJournal:
    """Journal one attempt's tool calls, event waits and sleeps (a ``StepRecorder``).

    Each call is keyed by what it is and how many such calls came before it in this
    run of the step, so a step that runs again (after a crash, a retry, or a wait)
    meets its recorded calls in the same places.
    """

    def __init__(
        self, writer: SessionWriter, step: str, attempt: int, *, inline_wait: float
    ) -> None:
        self._writer = writer
        self._step = step
        self._attempt = attempt
        self._inline_wait = inline_wait
        self._seen: dict[str, int] = {}  # not a Counter: it costs even a step making no calls

    async def tool(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Return the recorded result of this call, or make it and record it."""
        _check_name(name, "tool")
        what = f"tool call {name!r} in step {self._step!r}"
        call_digest = digest([name, list(args), kwargs], f"the arguments of {what}")
        key = self._key(f"tool:{name}:{call_digest}")
        entry = self._recorded(key)
        if entry is not None:
            return restore(_return_adapter(fn), entry.output, self._writer.session.id, name)
        started_at, started = utcnow(), time.perf_counter()
        try:
            result = await _invoke(fn, args, kwargs)
        except Exception as exc:
            failed = self._result("tool", name, call_digest, started_at, started)
            error = f"{type(exc).__name__}: {exc}"
            await self._writer.commit(
                status="running", tool_results=[failed.model_copy(update={"error": error})]
            )
            raise
        output = to_json(result, f"the result of {what}")
        done = self._result("tool", name, call_digest, started_at, started)
        await self._writer.commit(
            status="running",
            journal={key: JournalEntry(step=self._step, kind="tool", output=output)},
            tool_results=[done.model_copy(update={"output": output})],
        )
        return result

    async def wait_for_event(self, name: str, timeout: float | None) -> Any:  # noqa: ASYNC109
        """Take the next event named ``name``, or suspend the session until it comes."""
        _check_name(name, "event")
        key = self._key(f"event:{name}")
        entry = self._recorded(key)
        if entry is not None and entry.done:
            if entry.error is not None:
                raise StepTimeoutError(entry.error)
            return entry.output
        now = utcnow()
        event = next((e for e in self._writer.session.inbox if e.name == name), None)
        if event is not None:
            await self._take(key, event, now)
            return event.payload
        until = entry.until if entry is not None else None
        if entry is None and timeout is not None:
            until = now + timedelta(seconds=timeout)
        if until is not None and now >= until:
            message = f"step {self._step!r}: no event {name!r} came before {until.isoformat()}"
            timed_out = self._result("event", name, None, now, time.perf_counter())
            await self._writer.commit(
                status="running",
                journal={key: JournalEntry(step=self._step, kind="event", error=message)},
                tool_results=[timed_out.model_copy(update={"error": message})],
            )
            raise StepTimeoutError(message)
        wait = Wait(kind="event", step=self._step, event=name, until=until)
        pending = JournalEntry(step=self._step, kind="event", done=False, until=until)
        await self._writer.commit(
            status="waiting", wait=wait, journal={} if entry is not None else {key: pending}
        )
        raise Suspended(wait)

    async def sleep(self, seconds: float) -> None:
        """Sleep in place when short, else suspend the session until the recorded end."""
        key = self._key("sleep")
        entry = self._recorded(key)
        if entry is None and seconds <= self._inline_wait:
            await asyncio.sleep(seconds)  # short: not worth a commit, nor a suspension
            return
        now = utcnow()
        until = (
            entry.until if entry is not None and entry.until else now + timedelta(seconds=seconds)
        )
        remaining = (until - now).total_seconds()
        if remaining <= self._inline_wait:
            await asyncio.sleep(max(remaining, 0.0))
            return
        wait = Wait(kind="sleep", step=self._step, until=until)
        new = {key: JournalEntry(step=self._step, kind="sleep", until=until)}
        await self._writer.commit(status="waiting", wait=wait, journal={} if entry else new)
        raise Suspended(wait)

    def _key(self, base: str) -> str:
        occurrence = self._seen.get(base, 0)
        self._seen[base] = occurrence + 1
        return f"{base}#{occurrence}"

    def _recorded(self, key: str) -> JournalEntry | None:
        entry = self._writer.session.journal.get(key)
        # Entries of another step are a renamed step's leftovers: never replay them.
        return entry if entry is not None and entry.step == self._step else None

    async def _take(self, key: str, event: Event, now: datetime) -> None:
        """Commit that this step took ``event``: journaled, and gone from the inbox."""
        session = self._writer.session
        absorbed: list[Event] = []
        if event.seq is not None:
            # Events a store took without the lease, up to this one, become part of
            # the session, so the store may forget them (see engine/events.py).
            absorbed = [
                e
                for e in session.inbox
                if e.seq is not None and session.inbox_seq < e.seq <= event.seq and e is not event
            ]
        taken = ToolResult(
            name=event.name,
            kind="event",
            step=self._step,
            attempt=self._attempt,
            output=event.payload,
            started_at=event.sent_at,
            finished_at=now,
            duration=max((now - event.sent_at).total_seconds(), 0.0),
        )
        await self._writer.commit(
            status="running",
            journal={
                key: JournalEntry(
                    step=self._step, kind="event", output=event.payload, event_id=event.id
                )
            },
            events_added=absorbed,
            events_consumed=[event.id],
            inbox_seq=event.seq,
            tool_results=[taken],
        )

    def _result(
        self,
        kind: ToolKind,
        name: str,
        input_digest: str | None,
        started_at: datetime,
        started: float,
    ) -> ToolResult:
        return ToolResult(
            name=name,
            kind=kind,
            step=self._step,
            attempt=self._attempt,
            input_digest=input_digest,
            started_at=started_at,
            finished_at=utcnow(),
            duration=round(time.perf_counter() - started, 6),
        )


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"a {what} name must be a non-empty string, got {name!r}")


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``fn``: a coroutine function on the loop, anything else in a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):  # a sync wrapper that returned a coroutine
        result = await result
    return result


def _return_adapter(fn: Callable[..., Any]) -> TypeAdapter[Any]:
    """Return a validator for ``fn``'s return annotation (anything, without one)."""
    try:
        hint = typing.get_type_hints(fn).get("return", Any)
    except Exception:  # builtins, partials, unresolvable names: replay plain JSON
        hint = Any
    return TypeAdapter(hint)
