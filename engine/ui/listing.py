"""What the sessions page and ``/api/sessions`` show: filtered, sorted, paged rows.

A page is drawn from ``store.list()`` rows (``SessionInfo``: a few clear fields
per session), filtered and sorted on those alone; only the sessions on the page
shown are loaded in full. A tag filter is the exception: tags live in a session's
metadata, so it loads the sessions that passed the other filters, newest first,
until it has the page asked for and one more (see docs/dashboard.md).

An unreadable session stays in the listing. One that is encrypted under a key the
dashboard was not given is *locked*: its row shows the fields its store keeps in
clear and names the ones it cannot show.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, get_args

from starlette.datastructures import QueryParams

from ..errors import DecryptionError, EngineError, InvalidArgumentError, SessionNotFoundError
from ..models import MAX_DURATION, Session, SessionInfo, SessionStatus
from ..stores import Store, validate_session_id

STATUSES: tuple[str, ...] = get_args(SessionStatus)
UNREADABLE = "unreadable"
"""The status filter that picks sessions the dashboard cannot read (locked or damaged)."""
FILTER_STATUSES: tuple[str, ...] = (*STATUSES, UNREADABLE)
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500
LOAD_BATCH = 64
"""Sessions loaded at once when a tag filter has to look inside them."""

_CLEAR_CANDIDATES = ("status", "workflow", "created_at", "last_activity", "expires_at")
"""The listing fields a store may keep in clear for an encrypted session."""
ALWAYS_LOCKED = ("steps done", "metadata and tags", "context", "state", "tool history")
"""What an encrypted session never shows without its key."""
_LABELS = {
    "status": "status",
    "workflow": "workflow",
    "created_at": "created",
    "last_activity": "last activity",
    "expires_at": "expiry",
}


@dataclass(frozen=True, slots=True)
class Filters:
    """The sessions page's query: which sessions, and which page of them."""

    statuses: tuple[str, ...] = ()
    workflow: str | None = None
    tags: tuple[str, ...] = ()
    expiring_within: float | None = None
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    @classmethod
    def parse(cls, params: QueryParams) -> Filters:
        """Read filters from a query string; blank fields mean "any".

        Raises:
            InvalidArgumentError: an unknown status, or a number that is not one.
        """
        statuses = tuple(s for s in params.getlist("status") if s)
        unknown = sorted(set(statuses) - set(FILTER_STATUSES))
        if unknown:
            raise InvalidArgumentError(
                f"unknown status {', '.join(unknown)}; use {', '.join(FILTER_STATUSES)}"
            )
        within = params.get("expiring_within") or None
        return cls(
            statuses=statuses,
            workflow=params.get("workflow") or None,
            tags=_tags(params.getlist("tag")),
            expiring_within=None
            if within is None
            else _number(within, "expiring_within", high=MAX_DURATION),
            page=int(_number(params.get("page") or "1", "page", whole=True, low=1)),
            per_page=int(
                _number(
                    params.get("per_page") or str(DEFAULT_PER_PAGE),
                    "per_page",
                    whole=True,
                    low=1,
                    high=MAX_PER_PAGE,
                )
            ),
        )

    def admits(self, info: SessionInfo, now: datetime) -> bool:
        """Tell whether a listing row passes the filters that need no loading."""
        if self.statuses:
            label = UNREADABLE if info.problem is not None else info.status
            if label not in self.statuses:
                return False
        if self.workflow is not None and info.workflow != self.workflow:
            return False
        if self.tags and info.problem is not None:
            return False  # its tags cannot be read
        if self.expiring_within is not None:
            horizon = now + timedelta(seconds=self.expiring_within)
            if info.expires_at is None or not now < info.expires_at <= horizon:
                return False
        return True

    def query(self, **changes: Any) -> str:
        """Return the query string of these filters with ``changes``, for links."""
        changed = replace(self, **changes)
        pairs: list[tuple[str, str]] = [("status", s) for s in changed.statuses]
        if changed.workflow is not None:
            pairs.append(("workflow", changed.workflow))
        pairs += [("tag", t) for t in changed.tags]
        if changed.expiring_within is not None:
            pairs.append(("expiring_within", f"{changed.expiring_within:g}"))
        if changed.page != 1:
            pairs.append(("page", str(changed.page)))
        if changed.per_page != DEFAULT_PER_PAGE:
            pairs.append(("per_page", str(changed.per_page)))
        return urllib.parse.urlencode(pairs)


def _tags(values: Iterable[str]) -> tuple[str, ...]:
    """Read tags given repeatedly or comma-separated (``tag=a,b`` or ``tag=a&tag=b``)."""
    found = (tag.strip() for value in values for tag in value.split(","))
    return tuple(dict.fromkeys(tag for tag in found if tag))


def _number(
    text: str,
    name: str,
    *,
    whole: bool = False,
    low: float = 0,
    high: float = math.inf,
) -> float:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number of seconds"
        raise InvalidArgumentError(f"{name} must be {kind}, got {text[:40]!r}") from None
    if not (low <= value <= high and math.isfinite(value)):
        limit = f"between {low:g} and {high:g}" if high != math.inf else f"at least {low:g}"
        raise InvalidArgumentError(f"{name} must be {limit}, got {text[:40]!r}")
    return value


@dataclass(frozen=True, slots=True)
class Row:
    """One session as a page shows it: its listing row, and the session if readable."""

    info: SessionInfo
    session: Session | None = None
    problem: str | None = None
    locked: bool = False

    @property
    def id(self) -> str:
        """Return the session's id."""
        return self.info.id

    @property
    def label(self) -> str:
        """Return the status to show: the session's, or ``locked`` / ``unreadable``."""
        if self.locked:
            return "locked"
        if self.problem is not None:
            return UNREADABLE
        return self.info.status or "?"

    @property
    def steps_total(self) -> int | None:
        """Return how many steps its workflow has, as last run (None if unknown)."""
        shape = self.session.workflow_shape if self.session is not None else None
        return len(shape) if shape else None

    @property
    def tags(self) -> list[str]:
        """Return its tags (none when unreadable)."""
        return list(self.session.metadata.tags) if self.session is not None else []

    def clear_fields(self) -> dict[str, Any]:
        """Return the listing fields known for an unreadable session."""
        return {
            name: getattr(self.info, name)
            for name in _CLEAR_CANDIDATES
            if getattr(self.info, name) is not None
        }

    def locked_fields(self) -> list[str]:
        """Name what a locked session does not show without its key."""
        if not self.locked:
            return []
        hidden = [_LABELS[name] for name in _CLEAR_CANDIDATES if getattr(self.info, name) is None]
        return [*hidden, *ALWAYS_LOCKED]

    def as_json(self, now: datetime) -> dict[str, Any]:
        """Return the row as ``/api/sessions`` lists it."""
        info = self.info
        readable = self.problem is None
        return {
            "id": info.id,
            "status": info.status,
            "workflow": info.workflow,
            "steps_done": info.steps_done if readable else None,
            "steps_total": self.steps_total,
            "created_at": _iso(info.created_at),
            "last_activity": _iso(info.last_activity),
            "expires_at": _iso(info.expires_at),
            "expired": info.is_expired(now),
            "tags": self.tags,
            "problem": self.problem,
            "locked": self.locked,
            "locked_fields": self.locked_fields(),
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of sessions, and what the page needs around it."""

    filters: Filters
    rows: list[Row]
    matched: int
    stored: int
    workflows: list[str] = field(default_factory=list)
    exact: bool = True
    """False when a tag filter stopped looking once it had this page and one more."""

    @property
    def pages(self) -> int:
        """Return how many pages the matching sessions fill (at least one)."""
        counted = max(1, math.ceil(self.matched / self.filters.per_page))
        return counted if self.exact else max(counted, self.filters.page + 1)

    def as_json(self, now: datetime) -> dict[str, Any]:
        """Return the page as ``/api/sessions`` sends it."""
        return {
            "sessions": [row.as_json(now) for row in self.rows],
            "matched": self.matched,
            "matched_exact": self.exact,
            "stored": self.stored,
            "page": self.filters.page,
            "per_page": self.filters.per_page,
            "pages": self.pages,
        }


async def list_sessions(store: Store, filters: Filters, now: datetime) -> Listing:
    """Return the page of sessions ``filters`` asks for, newest activity first.

    Unreadable sessions come first: someone should look at them.
    """
    infos = await store.list()
    workflows = sorted({info.workflow for info in infos if info.workflow})
    matched = sorted(
        (info for info in infos if filters.admits(info, now)),
        key=lambda info: (
            info.problem is not None,
            info.last_activity or datetime.min.replace(tzinfo=now.tzinfo),
        ),
        reverse=True,
    )
    start = (filters.page - 1) * filters.per_page
    if filters.tags:
        found, exact = await _tagged(store, matched, set(filters.tags), start + filters.per_page)
        page = found[start : start + filters.per_page]
        return Listing(filters, page, len(found), len(infos), workflows, exact)
    page = await _load(store, matched[start : start + filters.per_page])
    return Listing(filters, page, len(matched), len(infos), workflows)


async def _tagged(
    store: Store, infos: Sequence[SessionInfo], wanted: set[str], enough: int
) -> tuple[list[Row], bool]:
    """Load sessions in order until more than ``enough`` carry every ``wanted`` tag.

    Returns them, and whether every candidate was looked at (so their count is exact).
    """
    found: list[Row] = []
    for first in range(0, len(infos), LOAD_BATCH):
        batch = await _load(store, infos[first : first + LOAD_BATCH])
        found += [row for row in batch if wanted <= set(row.tags)]
        if len(found) > enough:
            return found, first + LOAD_BATCH >= len(infos)
    return found, True


async def _load(store: Store, infos: Sequence[SessionInfo]) -> list[Row]:
    """Load the sessions of ``infos``, a batch at a time; the vanished are left out."""
    rows: list[Row] = []
    for start in range(0, len(infos), LOAD_BATCH):
        batch = infos[start : start + LOAD_BATCH]
        loaded = await asyncio.gather(*(load_row(store, info) for info in batch))
        rows += [row for row in loaded if row is not None]
    return rows


async def load_row(store: Store, info: SessionInfo) -> Row | None:
    """Load the session behind a listing row; None if it was removed meanwhile."""
    try:
        session = await store.load(info.id)
    except DecryptionError as exc:
        return Row(info, problem=str(exc), locked=True)
    except EngineError as exc:
        return Row(info, problem=str(exc))
    if session is None:
        return None
    return Row(SessionInfo.of(session), session)


async def session_row(store: Store, session_id: str) -> Row:
    """Load one session for its page; a locked one gets its clear fields from the listing.

    Raises:
        InvalidSessionIdError: ``session_id`` is not a session id.
        SessionNotFoundError: no such session.
    """
    validate_session_id(session_id)
    row = await load_row(store, SessionInfo(id=session_id))
    if row is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    if row.locked:  # the listing may know more than the id: what the store keeps in clear
        listed = _find(await store.list(), session_id)
        if listed is not None:
            row = replace(row, info=listed)
    return row


def _find(infos: Iterable[SessionInfo], session_id: str) -> SessionInfo | None:
    return next((info for info in infos if info.id == session_id), None)
