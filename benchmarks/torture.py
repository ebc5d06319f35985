"""The long run of the reliability suites, ending in a summary table.

CI runs each suite at a small size; this runs them at full size, for a release or
after touching a store, the codec or the runner (docs/reliability.md shows the
figures of the last run):

    .venv/bin/python benchmarks/torture.py                  # the full long run
    .venv/bin/python benchmarks/torture.py --trials 500 --corruption-values 3

Each suite runs under pytest, with the same assertions as in CI, and appends its
figures to a report file; the table then shows, per suite, how many cases were
tried, how many were found (damage or faults reported as an error), how many
survived (ended in a correct state) and how many lost data or broke a guarantee.
It exits non-zero if any suite failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parents[1] / "tests"


@dataclass(frozen=True)
class Suite:
    """One test file, run with its size variable set."""

    name: str
    test_file: str
    size_variable: str | None
    size: int | None


def suites(args: argparse.Namespace) -> list[Suite]:
    """The suites to run, at the sizes asked for."""
    return [
        Suite("kill -9", "test_crash.py", "STEPVAULT_CRASH_TRIALS", args.trials),
        Suite(
            "power loss", "test_power_loss.py", "STEPVAULT_POWERLOSS_STEPS", args.powerloss_steps
        ),
        Suite("I/O faults", "test_io_faults.py", "STEPVAULT_FAULT_STEPS", args.fault_steps),
        Suite(
            "corruption",
            "test_corruption_sweep.py",
            "STEPVAULT_CORRUPTION_VALUES",
            args.corruption_values,
        ),
        Suite("multiprocess", "test_multiprocess.py", "STEPVAULT_MP_SESSIONS", args.mp_sessions),
    ]


def failed_tests(junit: Path) -> set[str]:
    """Return the names of the tests that failed, from pytest's JUnit XML."""
    if not junit.exists():
        return set()
    tree = ElementTree.parse(junit)  # noqa: S314 - pytest wrote it, just now
    return {
        case.get("name", "")
        for case in tree.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    }


def run_suite(suite: Suite, report: Path) -> tuple[bool, set[str], float]:
    """Run one suite under pytest; return whether it passed, what failed, how long it took."""
    env = {**os.environ, "STEPVAULT_RELIABILITY_REPORT": str(report)}
    if suite.size_variable is not None and suite.size is not None:
        env[suite.size_variable] = str(suite.size)
    junit = report.with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    result = subprocess.run(
        [*command, f"--junitxml={junit}", str(TESTS / suite.test_file)],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-25:])
        print(f"--- {suite.name} FAILED (pytest exit {result.returncode}):\n{tail}\n")
    return result.returncode == 0, failed_tests(junit), elapsed


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """Render the report lines as a plain-text table."""
    header = ["suite", "size", "cases", "found", "survived", "lost", "status", "time"]
    lines = [[cell(row.get(column)) for column in header] for row in rows]
    widths = [max(len(item) for item in column) for column in zip(header, *lines, strict=False)]
    rule = "  ".join("-" * width for width in widths)
    out = ["  ".join(name.ljust(width) for name, width in zip(header, widths, strict=True)), rule]
    for line in lines:
        out.append("  ".join(item.ljust(width) for item, width in zip(line, widths, strict=True)))
    return "\n".join(out)


def main() -> int:
    """Run every suite at its long-run size and print the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3000, help="kill -9 trials")
    parser.add_argument(
        "--powerloss-steps", type=int, default=60, help="checkpoints per power-loss scenario"
    )
    parser.add_argument("--fault-steps", type=int, default=24, help="checkpoints swept with faults")
    parser.add_argument(
        "--corruption-values", type=int, default=255, help="flip values tried per byte (1-255)"
    )
    parser.add_argument(
        "--mp-sessions", type=int, default=1000, help="multiprocess sessions (at least 100)"
    )
    parser.add_argument("--json", type=Path, help="also write the table's rows to this file")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="stepvault-torture-") as scratch:
        for suite in suites(args):
            report = Path(scratch) / f"{suite.test_file}.jsonl"
            print(f"running {suite.name} ({suite.size_variable}={suite.size}) ...", flush=True)
            passed, failures, elapsed = run_suite(suite, report)
            lines = report.read_text().splitlines() if report.exists() else []
            found = [json.loads(line) for line in lines]
            if not passed:
                failed.append(suite.name)
            if not found:
                found = [{"suite": suite.name, "size": "(no figures: see the failure above)"}]
            for row in found:
                test = str(row.pop("test", "")).rsplit("::", 1)[-1]
                status = "FAILED" if not passed and (test in failures or not test) else "passed"
                row.update(status=status, time=f"{elapsed:.0f} s")
            rows += found
    print()
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
