"""Times and durations written for people: shared by the command line and the dashboard."""

from __future__ import annotations

from datetime import datetime


def short(seconds: float) -> str:
    """Say roughly how long: ``40s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def ago(moment: datetime | None, now: datetime) -> str:
    """Say how long ago ``moment`` was (``?`` when unknown)."""
    if moment is None:
        return "?"
    seconds = (now - moment).total_seconds()
    return "just now" if seconds < 1 else f"{short(seconds)} ago"
