"""Plain data: sessions, tool results, checkpoints and the analytics types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from .errors import InvalidArgumentError

SessionStatus = Literal["pending", "running", "waiting", "completed", "failed", "cancelled"]
TtlPolicy = Literal["sliding", "fixed"]
ToolKind = Literal["step", "tool", "event", "skip"]
"""A step attempt, a ``ctx.tool`` call, an event a step took, an operator's skip."""
WaitKind = Literal["event", "sleep", "operator"]

#: Statuses a runner may still drive forward.
UNFINISHED: frozenset[str] = frozenset({"pending", "running", "waiting"})


Timestamp = AwareDatetime
"""Every stored time: a naive datetime (no time zone) is refused on load, not compared
later with a raw TypeError."""


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime (every stored time is one)."""
    return datetime.now(UTC)


MAX_DURATION = 100 * 365.25 * 24 * 3600.0
"""A century: longer durations would overflow datetime arithmetic."""


def to_seconds(value: float | timedelta) -> float:
    """Normalise a duration given as seconds or a ``timedelta`` to seconds.

    Raises:
        InvalidArgumentError: the duration is not positive, not finite, or over a century.
    """
    try:
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"a duration must be seconds or a timedelta, got {value!r}"
        ) from None
    if not 0 < seconds <= MAX_DURATION:
        raise InvalidArgumentError(
            f"a duration must be positive and at most a century, got {value!r}"
        )
    return seconds


class StoredModel(BaseModel):
    """The base of every model the engine stores or shows.

    NaN and the infinities are written as the JSON constants ``NaN`` / ``Infinity``
    (which Python's ``json`` writes and pydantic reads back), never as ``null``: a
    resumed step must get back the float its predecessor returned.
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")


class SessionContext(StoredModel):
    """Who a session runs for: the spec's execution context, open to extra keys."""

    model_config = ConfigDict(extra="allow")

    user_id: str | None = None
    ai_provider: str | None = None
    permissions: list[str] = Field(default_factory=list)


class SessionMetadata(StoredModel):
    """Descriptive data about a session, open to extra keys."""

    model_config = ConfigDict(extra="allow")

    user_agent: str | None = None
    origin: str | None = None
    tags: list[str] = Field(default_factory=list)


class ToolResult(StoredModel):
    """One executed step attempt, or one tool call recorded inside a step."""

    name: str
    kind: ToolKind = "step"
    attempt: int = 1
    step: str | None = None
    input_digest: str | None = None
    output: Any = None
    error: str | None = None
    started_at: Timestamp
    finished_at: Timestamp
    duration: float = Field(
        description="seconds; the engine measures to the microsecond (no more bytes stored)"
    )

    @property
    def ok(self) -> bool:
        """Tell whether the attempt or call succeeded."""
        return self.error is None


class Event(StoredModel):
    """An event sent to a session: kept in its inbox until a step waiting for it takes it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    payload: Any = None
    sent_at: Timestamp
    seq: int | None = Field(
        default=None, description="its number in a store inbox that takes events without a lease"
    )


class Wait(StoredModel):
    """What a ``waiting`` session waits for, and until when."""

    model_config = ConfigDict(frozen=True)

    kind: WaitKind
    step: str
    event: str | None = None
    until: Timestamp | None = None
    reason: str | None = None


class JournalEntry(StoredModel):
    """One durable fact of the step in flight, replayed when that step runs again.

    A finished tool call (its output), an event taken (its payload) or a wait for
    one that timed out (``error``), a pending event wait (``done`` False, ``until``
    its deadline) or a durable sleep (``until`` its end).
    """

    model_config = ConfigDict(frozen=True)

    step: str
    kind: Literal["tool", "event", "sleep"]
    done: bool = True
    output: Any = None
    error: str | None = None
    until: Timestamp | None = None
    event_id: str | None = None


class StateUndo(StoredModel):
    """How to take back one step's state changes: put these values back, drop these keys."""

    model_config = ConfigDict(frozen=True)

    restore: dict[str, Any] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class WorkflowStamp(StoredModel):
    """Which version and shape of its workflow a session was last run with."""

    model_config = ConfigDict(frozen=True)

    version: str
    fingerprint: str
    shape: list[tuple[str, str]]


class Checkpoint(StoredModel):
    """What one commit changes in a session: applied all at once or not at all.

    A finished step sets ``step`` (its completion marker) and ``output``; a failed
    attempt or a status change commits a checkpoint without ``step``. ``status``,
    ``error`` and ``wait`` are the session's as of this checkpoint; the other
    fields are changes.
    """

    model_config = ConfigDict(frozen=True)

    revision: int
    status: SessionStatus
    last_activity: Timestamp
    expires_at: Timestamp
    step: str | None = None
    output: Any = None
    state_set: dict[str, Any] = Field(default_factory=dict)
    state_unset: list[str] = Field(default_factory=list)
    tool_results: list[ToolResult] = Field(default_factory=list)
    attempts: dict[str, int] = Field(default_factory=dict)
    retry_base: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
    wait: Wait | None = None
    journal: dict[str, JournalEntry] = Field(default_factory=dict)
    events_added: list[Event] = Field(default_factory=list)
    events_consumed: list[str] = Field(default_factory=list)
    inbox_seq: int | None = None
    undo: StateUndo | None = None
    stamp: WorkflowStamp | None = None


class Session(StoredModel):
    """A UUID-identified unit of work with state, history, metadata and a TTL."""

    id: str
    context: SessionContext = Field(default_factory=SessionContext)
    state: dict[str, Any] = Field(default_factory=dict)
    tool_history: list[ToolResult] = Field(default_factory=list)
    metadata: SessionMetadata = Field(default_factory=SessionMetadata)
    created_at: Timestamp
    last_activity: Timestamp
    expires_at: Timestamp
    ttl: float = Field(gt=0, description="seconds")
    ttl_policy: TtlPolicy = "sliding"
    status: SessionStatus = "pending"
    workflow: str | None = None
    workflow_version: str | None = None
    workflow_fingerprint: str | None = None
    workflow_source: str | None = None
    workflow_shape: list[tuple[str, str]] | None = Field(
        default=None, description="(step name, output type) per step, as last run"
    )
    forked_from: str | None = None
    input: Any = None
    steps_done: list[str] = Field(default_factory=list)
    outputs: dict[str, Any] = Field(default_factory=dict)
    attempts: dict[str, int] = Field(
        default_factory=dict, description="attempts made per step, over the session's life"
    )
    retry_base: dict[str, int] = Field(
        default_factory=dict, description="per step, the attempts made before its retry budget"
    )
    error: str | None = None
    wait: Wait | None = None
    inbox: list[Event] = Field(default_factory=list, description="events not taken yet")
    inbox_seq: int = Field(default=0, description="store inbox numbers absorbed so far")
    journal: dict[str, JournalEntry] = Field(
        default_factory=dict, description="what the step in flight recorded so far"
    )
    undo: dict[str, StateUndo] = Field(
        default_factory=dict, description="per completed step, how to take back its state changes"
    )
    revision: int = 0

    @property
    def cursor(self) -> int:
        """Return how many steps are done: the index of the next step to run."""
        return len(self.steps_done)

    def is_expired(self, now: datetime | None = None) -> bool:
        """Tell whether the TTL has run out (``expires_at <= now``)."""
        return self.expires_at <= (now or utcnow())

    def expiry_after(self, activity: datetime) -> datetime:
        """Return ``expires_at`` for activity at ``activity`` under this session's policy."""
        start = activity if self.ttl_policy == "sliding" else self.created_at
        return start + timedelta(seconds=self.ttl)

    def touch(self, now: datetime | None = None) -> None:
        """Record activity now and slide the expiry when the policy says so."""
        self.last_activity = now or utcnow()
        self.expires_at = self.expiry_after(self.last_activity)

    def apply(self, checkpoint: Checkpoint) -> None:
        """Apply one committed checkpoint; replaying every checkpoint rebuilds the session."""
        if checkpoint.step is not None:
            self.steps_done.append(checkpoint.step)
            self.outputs[checkpoint.step] = checkpoint.output
            self.journal.clear()  # the journal belongs to the step in flight
            if checkpoint.undo is not None:
                self.undo[checkpoint.step] = checkpoint.undo
        self.state.update(checkpoint.state_set)
        for key in checkpoint.state_unset:
            self.state.pop(key, None)
        self.tool_history.extend(checkpoint.tool_results)
        self.attempts.update(checkpoint.attempts)
        self.retry_base.update(checkpoint.retry_base)
        self.journal.update(checkpoint.journal)
        if checkpoint.events_added:
            known = {event.id for event in self.inbox}
            self.inbox.extend(e for e in checkpoint.events_added if e.id not in known)
        if checkpoint.events_consumed:
            taken = set(checkpoint.events_consumed)
            self.inbox = [event for event in self.inbox if event.id not in taken]
        if checkpoint.inbox_seq is not None:
            self.inbox_seq = max(self.inbox_seq, checkpoint.inbox_seq)
        if checkpoint.stamp is not None:
            self.workflow_version = checkpoint.stamp.version
            self.workflow_fingerprint = checkpoint.stamp.fingerprint
            self.workflow_shape = list(checkpoint.stamp.shape)
        # Written straight into the fields: the values come from a validated checkpoint,
        # and pydantic's per-field __setattr__ would cost on every checkpoint.
        vars(self).update(
            status=checkpoint.status,
            error=checkpoint.error,
            wait=checkpoint.wait,
            last_activity=checkpoint.last_activity,
            expires_at=checkpoint.expires_at,
            revision=checkpoint.revision,
        )


class Summarisable(Protocol):
    """What a listing row is made from: a whole ``Session``, or a store's lean read of one."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> SessionStatus: ...
    @property
    def workflow(self) -> str | None: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def last_activity(self) -> datetime: ...
    @property
    def cursor(self) -> int: ...


class SessionInfo(StoredModel):
    """A session's listing row: enough to find, expire and resume it.

    ``problem`` is set, and the other fields may be unknown, when the session could
    not be read (corrupt or undecryptable): listings report it instead of hiding it.
    """

    id: str
    status: SessionStatus | None = None
    workflow: str | None = None
    expires_at: Timestamp | None = None
    created_at: Timestamp | None = None
    last_activity: Timestamp | None = None
    steps_done: int = 0
    problem: str | None = None

    @classmethod
    def of(cls, session: Summarisable) -> SessionInfo:
        """Summarise a loaded session (or what a listing read of it)."""
        return cls(
            id=session.id,
            status=session.status,
            workflow=session.workflow,
            expires_at=session.expires_at,
            created_at=session.created_at,
            last_activity=session.last_activity,
            steps_done=session.cursor,
        )

    def is_expired(self, now: datetime) -> bool:
        """Tell whether this row's session has expired; unreadable rows never are."""
        return self.expires_at is not None and self.expires_at <= now


class CleanupResult(StoredModel):
    """What one cleanup sweep did."""

    cleaned_sessions: int
    duration: float = Field(description="seconds")
    skipped: dict[str, str] = Field(
        default_factory=dict, description="session id -> why it was kept (unreadable)"
    )


class SessionMetrics(StoredModel):
    """The spec's analytics over every stored session."""

    total_sessions: int
    active_sessions: int
    average_session_duration: float = Field(description="seconds from creation to last activity")
    tool_usage_stats: dict[str, int]
    status_counts: dict[str, int]
    unreadable_sessions: int = 0
    collected_at: Timestamp
