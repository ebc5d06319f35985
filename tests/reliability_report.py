"""Where the reliability suites leave their figures for benchmarks/torture.py.

A helper, not a test module. When ``STEPVAULT_RELIABILITY_REPORT`` names a file,
each suite appends one JSON line to it: its name, its ``size`` (a phrase), and
what it counted: ``cases`` tried, ``found`` (damage or faults reported as errors;
None where nothing is to be reported), ``survived`` (cases that ended in a correct
state) and ``lost`` (cases that lost or changed acknowledged data, or broke a
guarantee some other way), plus any details. Without it nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def report(suite: str, **figures: int | str | None) -> None:
    """Append ``figures`` for ``suite`` to the report file, if one was asked for."""
    path = os.environ.get("STEPVAULT_RELIABILITY_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]  # which test reported
    line = json.dumps({"suite": suite, "test": test, **figures}, sort_keys=True)
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
