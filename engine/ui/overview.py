"""The overview page's numbers and charts: the spec's analytics, and checkpoints per minute.

The analytics come from ``SessionManager.collect_metrics`` (it reads every
session). Checkpoints per minute are counted from the tool history of the
sessions active in the last hour only: every attempt, tool call, event taken and
skip is committed by a checkpoint of its own, at its ``finished_at``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..errors import EngineError
from ..models import SessionMetrics
from ..sessions import SessionManager

WINDOW_MINUTES = 60
CHART_WIDTH = 560.0
COLUMNS_WIDTH = 1180.0
LABEL_WIDTH = 150.0
ROW_HEIGHT = 22.0
COLUMNS_HEIGHT = 160.0
TOP_TOOLS = 20
"""Tools shown on the usage chart; the rest are summed up in one bar."""


@dataclass(frozen=True, slots=True)
class HBar:
    """One bar of a horizontal bar chart."""

    label: str
    value: int
    y: float
    width: float


@dataclass(frozen=True, slots=True)
class BarChart:
    """Counts by name, largest first, as horizontal bars."""

    bars: list[HBar]
    width: float
    height: float
    label_width: float = LABEL_WIDTH


@dataclass(frozen=True, slots=True)
class Column:
    """One minute of the checkpoints chart."""

    minute: datetime
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class ColumnChart:
    """Checkpoints per minute over the last hour."""

    columns: list[Column]
    width: float
    height: float
    peak: int
    total: int


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the overview page shows."""

    metrics: SessionMetrics
    statuses: BarChart
    tools: BarChart
    checkpoints: ColumnChart

    def as_json(self) -> dict[str, Any]:
        """Return the numbers as ``/api/metrics`` sends them."""
        data: dict[str, Any] = self.metrics.model_dump(mode="json")
        data["checkpoints_per_minute"] = [
            {"minute": column.minute.isoformat(), "checkpoints": column.count}
            for column in self.checkpoints.columns
        ]
        return data


async def collect(manager: SessionManager, now: datetime) -> Overview:
    """Gather the analytics and count the last hour's checkpoints."""
    metrics = await manager.collect_metrics()
    per_minute = await _checkpoints_per_minute(manager, now)
    tools = sorted(metrics.tool_usage_stats.items(), key=lambda item: (-item[1], item[0]))
    if len(tools) > TOP_TOOLS:
        rest = sum(count for _, count in tools[TOP_TOOLS:])
        tools = [*tools[:TOP_TOOLS], (f"{len(tools) - TOP_TOOLS} others", rest)]
    statuses = sorted(metrics.status_counts.items(), key=lambda item: (-item[1], item[0]))
    if metrics.unreadable_sessions:
        statuses.append(("unreadable", metrics.unreadable_sessions))
    return Overview(metrics, bar_chart(statuses), bar_chart(tools), column_chart(per_minute))


async def _checkpoints_per_minute(
    manager: SessionManager, now: datetime
) -> list[tuple[datetime, int]]:
    this_minute = now.replace(second=0, microsecond=0)
    first = this_minute - timedelta(minutes=WINDOW_MINUTES - 1)
    counts = dict.fromkeys((first + timedelta(minutes=i) for i in range(WINDOW_MINUTES)), 0)
    recent = [
        row.id
        for row in await manager.store.list()
        if row.problem is None and row.last_activity is not None and row.last_activity >= first
    ]
    for session_id in recent:
        try:
            session = await manager.store.load(session_id)
        except EngineError:
            continue  # unreadable since it was listed: the analytics count it
        if session is None:
            continue
        for record in session.tool_history:
            minute = record.finished_at.replace(second=0, microsecond=0)
            if minute in counts:
                counts[minute] += 1
        await asyncio.sleep(0)  # let the server answer other requests meanwhile
    return list(counts.items())


def bar_chart(items: Iterable[tuple[str, int]]) -> BarChart:
    """Lay out counts as horizontal bars scaled to the largest."""
    pairs = list(items)
    largest = max((value for _, value in pairs), default=0) or 1
    plot = CHART_WIDTH - LABEL_WIDTH - 50
    bars = [
        HBar(label, value, i * ROW_HEIGHT, max(value / largest * plot, 1.0))
        for i, (label, value) in enumerate(pairs)
    ]
    return BarChart(bars, CHART_WIDTH, max(len(bars), 1) * ROW_HEIGHT)


def column_chart(per_minute: list[tuple[datetime, int]]) -> ColumnChart:
    """Lay out one column per minute, scaled to the busiest minute."""
    peak = max((count for _, count in per_minute), default=0)
    slot = COLUMNS_WIDTH / max(len(per_minute), 1)
    columns = []
    for i, (minute, count) in enumerate(per_minute):
        height = count / peak * COLUMNS_HEIGHT if peak else 0.0
        columns.append(
            Column(minute, count, i * slot + 1, COLUMNS_HEIGHT - height, slot - 2, height)
        )
    total = sum(count for _, count in per_minute)
    return ColumnChart(columns, COLUMNS_WIDTH, COLUMNS_HEIGHT, peak, total)
