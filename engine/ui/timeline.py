"""A session's timeline: one lane per step, one bar per attempt, drawn as SVG by a template.

Everything is computed from the stored tool history, so the timeline of a session
is the same whichever process wrote it:

- an attempt (``kind="step"``) is a bar from its start to its end, coloured by
  outcome (``ok``, ``failed``, ``cancelled``); an operator's skip is a ``skip`` bar;
- the pause between a failed attempt and the next one is a ``retry`` segment (the
  backoff, or the time until someone resumed the session);
- the time from the previous step's end to a step's first attempt, when the step
  took an event or the pause lasted half a second or more, is a ``wait`` segment:
  a wait for an event, a durable sleep, or no runner running the session;
- tool calls and events taken show as thin marks under their step's bars;
- a running session's step in flight is a ``running`` bar up to now, and a
  waiting session's wait a ``waiting`` bar.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from .. import humanize
from ..models import UNFINISHED, Session, ToolResult
from . import format as fmt

LABEL_WIDTH = 180.0
PLOT_WIDTH = 780.0
LANE_HEIGHT = 30.0
BAR_HEIGHT = 16.0
MARK_HEIGHT = 5.0
AXIS_HEIGHT = 26.0
MIN_BAR = 2.0
"""Pixels: an attempt that took no time still shows."""
MAX_LANES = 60
"""Steps drawn at most; a longer workflow shows those around its latest activity."""
LANES_AHEAD = 5
"""Steps still to come drawn after the latest activity, when lanes are cut."""
MIN_GAP = 3.0
"""Pixels: a pause shorter than this is not worth a segment."""
MIN_WAIT = 0.5
"""Seconds before a step's first attempt that count as a wait rather than the engine's overhead."""
_Scale: TypeAlias = Callable[[datetime], float]
"""Where a moment falls on the x axis."""
_NICE_STEPS = (
    *(m * 10.0**e for e in range(-3, 2) for m in (1, 2, 5)),
    *(60.0 * m for m in (1, 2, 5, 10, 15, 30)),
    *(3600.0 * m for m in (1, 2, 3, 6, 12)),
    *(86400.0 * m for m in (1, 2, 7, 14, 30)),
)


@dataclass(frozen=True, slots=True)
class Bar:
    """One shape on the timeline; ``kind`` is its CSS class, ``title`` its tooltip."""

    kind: str
    step: str
    x: float
    y: float
    width: float
    height: float
    title: str
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Lane:
    """One step's row."""

    name: str
    y: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Timeline:
    """A Gantt chart of a session's steps, in SVG coordinates."""

    width: float
    height: float
    lanes: list[Lane]
    bars: list[Bar]
    ticks: list[tuple[float, str]]
    now_x: float | None
    span: float
    hidden_before: int = 0
    hidden_after: int = 0

    @property
    def plot_left(self) -> float:
        """Return where the time axis begins."""
        return LABEL_WIDTH

    @property
    def plot_right(self) -> float:
        """Return where the time axis ends."""
        return LABEL_WIDTH + PLOT_WIDTH


def build(session: Session, now: datetime) -> Timeline:
    """Lay out ``session``'s timeline as of ``now``.

    A workflow with more than ``MAX_LANES`` steps shows the lanes around its
    latest activity; the timeline says how many it leaves out on each side.
    """
    by_step: dict[str, list[ToolResult]] = defaultdict(list)
    for record in session.tool_history:
        by_step[record.step or record.name].append(record)
    every = _lane_names(session)
    first, last = _window(every, by_step, session.cursor)
    names = every[first:last]
    history = [r for name in names for r in by_step.get(name, [])]
    ready = session.created_at  # when the first lane's step could start
    if first > 0:
        ready = max(
            (r.finished_at for r in by_step.get(every[first - 1], []) if r.ok), default=ready
        )
    live = session.status in UNFINISHED
    start = min([ready, *(r.started_at for r in history)])
    end = max([ready, *(r.finished_at for r in history)])
    if live:
        end = max(end, now)
    elif last == len(every):
        end = max(end, session.last_activity)
    span = max((end - start).total_seconds(), 0.001)
    scale = PLOT_WIDTH / span

    def x_of(moment: datetime) -> float:
        return LABEL_WIDTH + (moment - start).total_seconds() * scale

    lanes = [
        Lane(name, AXIS_HEIGHT + i * LANE_HEIGHT, _attempt_count(history, name))
        for i, name in enumerate(names)
    ]
    lane_y = {lane.name: lane.y for lane in lanes}
    bars: list[Bar] = []
    for lane in lanes:
        records = by_step.get(lane.name, [])
        attempts = sorted((r for r in records if r.kind in ("step", "skip")), key=_start)
        top = lane.y + (LANE_HEIGHT - BAR_HEIGHT) / 2
        if attempts:
            began = attempts[0].started_at
            events = [r.name for r in records if r.kind == "event"]
            if events or (began - ready).total_seconds() >= MIN_WAIT:
                what = f"waited for event {', '.join(map(repr, events))}" if events else "waited"
                bars += _gap(lane.name, ready, began, top, "wait", what, x_of)
        previous: ToolResult | None = None
        for record in attempts:
            if previous is not None and not previous.ok:
                what = f"before attempt {record.attempt}: retry"
                since = previous.finished_at
                bars += _gap(lane.name, since, record.started_at, top, "retry", what, x_of)
            bars.append(_attempt(lane.name, record, top, x_of))
            previous = record
        marks_y = top + BAR_HEIGHT + 1
        bars += [_mark(lane.name, r, marks_y, x_of) for r in records if r.kind in ("tool", "event")]
        done = [r.finished_at for r in attempts if r.ok]
        if done:
            ready = max(done)
    if live:
        bars += _live(session, lane_y, now, x_of)
    height = AXIS_HEIGHT + max(len(lanes), 1) * LANE_HEIGHT + 4
    return Timeline(
        width=LABEL_WIDTH + PLOT_WIDTH + 10,
        height=height,
        lanes=lanes,
        bars=bars,
        ticks=_ticks(span, scale),
        now_x=x_of(now) if live else None,
        span=span,
        hidden_before=first,
        hidden_after=len(every) - last,
    )


def _window(names: list[str], by_step: dict[str, list[ToolResult]], cursor: int) -> tuple[int, int]:
    """Return the lanes to draw, ``names[first:last]``: at most ``MAX_LANES``, ending
    a few steps after the latest activity."""
    if len(names) <= MAX_LANES:
        return 0, len(names)
    active = [i for i, name in enumerate(names) if name in by_step]
    latest = max([cursor, *active])
    last = min(len(names), max(latest + 1 + LANES_AHEAD, MAX_LANES))
    return last - MAX_LANES, last


def _lane_names(session: Session) -> list[str]:
    """Return the steps in workflow order, then any the history names that it lacks."""
    names = [name for name, _ in session.workflow_shape or []]
    for record in session.tool_history:
        name = record.step or record.name
        if name not in names:
            names.append(name)
    return names


def _attempt_count(history: list[ToolResult], name: str) -> int:
    return sum(1 for r in history if (r.step or r.name) == name and r.kind == "step")


def _start(record: ToolResult) -> datetime:
    return record.started_at


def _outcome(record: ToolResult) -> str:
    if record.kind == "skip":
        return "skip"
    if record.error is None:
        return "ok"
    return "cancelled" if record.error == "cancelled" else "failed"


def _attempt(step: str, record: ToolResult, top: float, x_of: _Scale) -> Bar:
    outcome = _outcome(record)
    x = x_of(record.started_at)
    width = max(x_of(record.finished_at) - x, MIN_BAR)
    if outcome == "skip":
        title = f"{step}: skipped by an operator"
    else:
        title = f"{step} attempt {record.attempt}: {outcome} in {fmt.duration(record.duration)}"
        if record.error is not None and outcome == "failed":
            title += f": {record.error}"
    return Bar(outcome, step, x, top, width, BAR_HEIGHT, title, record.attempt)


def _gap(
    step: str,
    since: datetime,
    until: datetime,
    top: float,
    kind: str,
    what: str,
    x_of: _Scale,
) -> list[Bar]:
    x, right = x_of(since), x_of(until)
    if right - x < MIN_GAP:
        return []
    seconds = (until - since).total_seconds()
    title = f"{step}: {what} ({fmt.duration(seconds)})"
    return [Bar(kind, step, x, top + BAR_HEIGHT / 4, right - x, BAR_HEIGHT / 2, title)]


def _mark(step: str, record: ToolResult, y: float, x_of: _Scale) -> Bar:
    if record.kind == "event":
        title = f"{step}: took event {record.name!r} (sent {fmt.stamp(record.started_at)})"
        return Bar("event", step, x_of(record.finished_at) - 1.5, y, 3.0, MARK_HEIGHT, title)
    kind = "tool" if record.ok else "tool-failed"
    title = f"{step}: tool {record.name!r} in {fmt.duration(record.duration)}"
    if record.error is not None:
        title += f": {record.error}"
    x = x_of(record.started_at)
    width = max(x_of(record.finished_at) - x, MIN_BAR)
    return Bar(kind, step, x, y, width, MARK_HEIGHT, title)


def _live(session: Session, lane_y: dict[str, float], now: datetime, x_of: _Scale) -> list[Bar]:
    """Draw what is happening now: the step in flight, or the wait."""
    wait = session.wait
    if session.status == "waiting" and wait is not None and wait.step in lane_y:
        if wait.kind == "event":
            what = f"waiting for event {wait.event!r}"
        elif wait.kind == "sleep":
            what = "sleeping"
        else:
            what = f"parked for an operator: {wait.reason or session.error or ''}"
        if wait.until is not None:
            what += f" until {fmt.stamp(wait.until)}"
        title = f"{wait.step}: {what}"
        return _now_bar(session, wait.step, lane_y[wait.step], "waiting", title, now, x_of)
    shape = session.workflow_shape or []
    if session.status == "running" and session.cursor < len(shape):
        step = shape[session.cursor][0]
        if step in lane_y:
            attempt = session.attempts.get(step, 0) + 1
            title = f"{step}: attempt {attempt} in flight"
            return _now_bar(session, step, lane_y[step], "running", title, now, x_of)
    return []


def _now_bar(
    session: Session, step: str, lane: float, kind: str, title: str, now: datetime, x_of: _Scale
) -> list[Bar]:
    since = max([session.created_at, *(r.finished_at for r in session.tool_history)])
    if kind == "waiting":
        since = session.last_activity
    x = x_of(since)
    top = lane + (LANE_HEIGHT - BAR_HEIGHT) / 2
    return [Bar(kind, step, x, top, max(x_of(now) - x, MIN_BAR), BAR_HEIGHT, title)]


def _ticks(span: float, scale: float) -> list[tuple[float, str]]:
    """Return about six evenly spaced, round time offsets along the axis."""
    step = next((s for s in _NICE_STEPS if s >= span / 6), _NICE_STEPS[-1])
    count = int(span / step) + 1
    return [(LABEL_WIDTH + i * step * scale, _offset(i * step)) for i in range(count)]


def _offset(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g} ms"
    if seconds < 60:
        return f"{seconds:g} s"
    return humanize.short(seconds)
