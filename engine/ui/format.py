"""How the dashboard writes times, durations and JSON for people to read."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pydantic_core

from ..humanize import short


def duration(seconds: float) -> str:
    """Write a duration to the precision a person wants: ``4.2 ms``, ``3.10 s``, ``2h 5m``."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return short(seconds)


def expires_in(expires_at: datetime | None, now: datetime) -> str:
    """Say when a session expires, or how long ago it did."""
    if expires_at is None:
        return "?"
    seconds = (expires_at - now).total_seconds()
    if seconds <= 0:
        return f"expired {short(-seconds)} ago"
    return short(seconds)


def stamp(moment: datetime | None) -> str:
    """Write a stored time as UTC to the second."""
    return "?" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def clock(moment: datetime) -> str:
    """Write a time of day to the millisecond, for tool-history rows."""
    return f"{moment:%H:%M:%S.%f}"[:-3]


def pretty_json(value: Any) -> str:
    """Format a stored value as indented JSON text (escaped later, by the template)."""
    return json.dumps(pydantic_core.to_jsonable_python(value), indent=2, ensure_ascii=False)


def one_line_json(value: Any, limit: int = 160) -> str:
    """Format a value as compact JSON, cut to ``limit`` characters."""
    text = json.dumps(pydantic_core.to_jsonable_python(value), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
