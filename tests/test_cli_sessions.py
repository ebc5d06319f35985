"""``stepvault sessions ls|show|rm``, ``cleanup`` and ``stats``, and shell completion.

A real FileStore is filled through the public API; the commands run in-process
through typer's CliRunner, and in real processes where only a process shows it
(exit codes, stderr, the completion protocol).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from engine import FileStore, Runner, SessionManager, StepContext, Workflow
from engine.cli import app
from engine.models import Session, utcnow

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stored:
    """The sessions the tests find in the store."""

    folder: Path
    workflow_run: str  # completed; its first step failed once; tagged "urgent"
    expiring: str  # pending, created by SessionManager with a 60 s TTL; tagged "analysis"
    expired: str  # expired an hour ago, not yet cleaned up


async def _fill(folder: Path) -> Stored:
    wf = Workflow("invoice")
    failures = [ConnectionError("bank timeout")]

    @wf.step(retries=1, backoff=0.01)
    async def charge(ctx: StepContext, amount: int) -> int:
        if failures:
            raise failures.pop()
        return amount

    @wf.step
    def receipt(ctx: StepContext, amount: int) -> str:
        ctx.state["sent"] = True
        return f"paid {amount}"

    async with Runner(FileStore(folder), workflows=[wf]) as runner:
        workflow_run = await runner.start(wf, 42, metadata={"tags": ["urgent"]})
        assert await runner.wait(workflow_run) == "paid 42"
    async with SessionManager(FileStore(folder), cleanup_interval=None) as manager:
        session = await manager.create_session(
            {"user_id": "user123"}, ttl=60, metadata={"tags": ["analysis"], "user_agent": "cli/1.0"}
        )
    now = utcnow()
    expired = Session(
        id=str(uuid.uuid4()),
        created_at=now - timedelta(hours=2),
        last_activity=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
        ttl=3600,
    )
    store = FileStore(folder)
    await store.create(expired)
    await store.close()
    return Stored(folder, workflow_run, session.id, expired.id)


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    """A store holding a finished workflow run, a live session and an expired one."""
    return asyncio.run(_fill(tmp_path / "sessions"))


@pytest.fixture
def cli(stored: Stored) -> CliRunner:
    """A CliRunner whose commands default to the filled store, on a wide terminal."""
    env = {"STEPVAULT_STORE": str(stored.folder), "SESSION_ENCRYPTION_KEY": None, "COLUMNS": "200"}
    return CliRunner(env=env)


def _json(result: Result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _ids(result: Result) -> set[str]:
    rows = _json(result)
    assert isinstance(rows, list)
    return {row["id"] for row in rows}


# -- sessions ls ---------------------------------------------------------------------------


def test_ls_shows_every_session_in_a_table(cli: CliRunner, stored: Stored) -> None:
    result = cli.invoke(app, ["sessions", "ls"])

    assert result.exit_code == 0, result.output
    for session_id in (stored.workflow_run, stored.expiring, stored.expired):
        assert session_id in result.stdout
    assert "3 of 3 sessions" in result.stdout
    assert "invoice" in result.stdout
    assert "expired" in result.stdout


def test_ls_filters_by_status_workflow_tag_and_expiry(cli: CliRunner, stored: Stored) -> None:
    def ids(*args: str) -> set[str]:
        return _ids(cli.invoke(app, ["sessions", "ls", "--json", *args]))

    assert ids() == {stored.workflow_run, stored.expiring, stored.expired}
    assert ids("--status", "completed") == {stored.workflow_run}
    assert ids("--status", "completed", "--status", "pending") == {
        stored.workflow_run,
        stored.expiring,
        stored.expired,
    }
    assert ids("--workflow", "invoice") == {stored.workflow_run}
    assert ids("--tag", "urgent") == {stored.workflow_run}
    assert ids("--tag", "urgent", "--tag", "analysis") == set()
    assert ids("--expiring-within", "120") == {stored.expiring}  # not the expired one
    assert ids("--expiring-within", "120", "--tag", "urgent") == set()


def test_ls_json_rows_say_what_the_table_says(cli: CliRunner, stored: Stored) -> None:
    rows = _json(cli.invoke(app, ["sessions", "ls", "--json", "--workflow", "invoice"]))

    assert isinstance(rows, list)
    (row,) = rows
    assert row["id"] == stored.workflow_run
    assert row["status"] == "completed"
    assert row["steps_done"] == 2
    assert row["tags"] == ["urgent"]
    assert row["expired"] is False


def test_ls_with_an_unknown_status_is_a_one_line_usage_error(cli: CliRunner) -> None:
    result = cli.invoke(app, ["sessions", "ls", "--status", "finished"])

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "unknown status finished" in result.stderr


# -- sessions show ---------------------------------------------------------------------------


def test_show_prints_metadata_state_and_tool_history_with_durations(
    cli: CliRunner, stored: Stored
) -> None:
    result = cli.invoke(app, ["sessions", "show", stored.workflow_run])

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert stored.workflow_run in out
    assert '"urgent"' in out  # metadata
    assert '"sent": true' in out  # state
    assert "tool history (3)" in out
    history = out.split("tool history (3)", 1)[1]
    assert "ConnectionError: bank timeout" in history
    assert history.count(" ms ") + history.count(" s ") >= 3  # a duration per attempt
    for name in ("charge", "receipt"):
        assert name in history


def test_show_json_is_the_stored_session(cli: CliRunner, stored: Stored) -> None:
    shown = _json(cli.invoke(app, ["sessions", "show", stored.expiring, "--json"]))

    session = asyncio.run(FileStore(stored.folder).load(stored.expiring))
    assert session is not None
    assert shown == session.model_dump(mode="json")


def test_show_json_is_standard_json_even_for_nan_and_infinity(
    cli: CliRunner, stored: Stored
) -> None:
    # Given a session whose state holds floats JSON has no number for
    async def keep_odd_floats() -> None:
        store = FileStore(stored.folder)
        session = await store.load(stored.expiring)
        assert session is not None
        session.state.update(ratio=math.nan, ceiling=math.inf)
        await store.save(session)

    asyncio.run(keep_odd_floats())

    # When it is shown as JSON, Then a strict parser reads it, with nulls for them
    result = cli.invoke(app, ["sessions", "show", stored.expiring, "--json"])
    assert result.exit_code == 0, result.output

    def refuse(constant: str) -> None:
        raise AssertionError(f"not standard JSON: {constant}")

    shown = json.loads(result.stdout, parse_constant=refuse)
    assert shown["state"]["ratio"] is None
    assert shown["state"]["ceiling"] is None


@pytest.mark.parametrize(
    ("session_id", "message"),
    [
        ("0b6c1a0e-1d2e-4f3a-8b4c-5d6e7f8a9b0c", "not found"),
        ("../../etc/passwd", "invalid session id"),
    ],
)
def test_show_of_a_missing_or_malformed_id_fails_in_one_line(
    cli: CliRunner, session_id: str, message: str
) -> None:
    result = cli.invoke(app, ["sessions", "show", session_id])

    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


# -- sessions rm ------------------------------------------------------------------------------


def test_rm_removes_a_session_and_refuses_one_being_run(cli: CliRunner, stored: Stored) -> None:
    # Given: another process holds the lease of the live session
    holder = FileStore(stored.folder)
    lease = asyncio.run(holder.acquire(stored.expiring, "another runner"))
    assert lease is not None
    try:
        # When / Then: rm refuses it, and --force removes it anyway
        refused = cli.invoke(app, ["sessions", "rm", stored.expiring])
        assert refused.exit_code == 1
        assert "being run right now" in refused.stderr
        assert stored.expiring in _ids(cli.invoke(app, ["sessions", "ls", "--json"]))
        forced = cli.invoke(app, ["sessions", "rm", stored.expiring, "--force"])
        assert forced.exit_code == 0, forced.output
    finally:
        asyncio.run(holder.close())

    # When: a session nobody runs is removed, then removed again
    removed = cli.invoke(app, ["sessions", "rm", stored.workflow_run, "--json"])
    again = cli.invoke(app, ["sessions", "rm", stored.workflow_run])

    # Then
    assert _json(removed) == {"removed": stored.workflow_run}
    assert again.exit_code == 1
    assert "not found" in again.stderr
    assert _ids(cli.invoke(app, ["sessions", "ls", "--json"])) == {stored.expired}


# -- cleanup and stats ------------------------------------------------------------------------


def test_cleanup_dry_run_lists_and_cleanup_removes_only_expired(
    cli: CliRunner, stored: Stored
) -> None:
    # Given / When: a dry run
    dry = _json(cli.invoke(app, ["cleanup", "--dry-run", "--json"]))

    # Then: it names the expired session and removes nothing
    assert dry == {"dry_run": True, "expired": [stored.expired]}
    assert len(_ids(cli.invoke(app, ["sessions", "ls", "--json"]))) == 3

    # When: the real cleanup
    done = cli.invoke(app, ["cleanup"])

    # Then
    assert done.exit_code == 0, done.output
    assert "removed 1 expired session(s)" in done.stdout
    assert _ids(cli.invoke(app, ["sessions", "ls", "--json"])) == {
        stored.workflow_run,
        stored.expiring,
    }


def test_stats_reports_totals_activity_and_tool_usage(cli: CliRunner, stored: Stored) -> None:
    metrics = _json(cli.invoke(app, ["stats", "--json"]))
    table = cli.invoke(app, ["stats"])

    assert isinstance(metrics, dict)
    assert metrics["total_sessions"] == 3
    assert metrics["active_sessions"] == 2
    assert metrics["tool_usage_stats"] == {"charge": 2, "receipt": 1}
    assert metrics["status_counts"] == {"completed": 1, "pending": 2}
    assert metrics["average_session_duration"] > 0
    assert table.exit_code == 0, table.output
    assert "charge" in table.stdout
    assert "active (unexpired)" in table.stdout


def test_commands_on_a_missing_store_fail_without_creating_it(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    cli = CliRunner(env={"STEPVAULT_STORE": None, "SESSION_ENCRYPTION_KEY": None})

    for args in (["sessions", "ls"], ["stats"], ["cleanup"]):
        result = cli.invoke(app, [*args, "--store", str(missing)])
        assert result.exit_code == 1
        assert "does not exist" in result.stderr
    assert not missing.exists()


# -- real processes -------------------------------------------------------------------------------


def _stepvault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STEPVAULT_", "SESSION_"))}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_real_process_lists_as_json_and_fails_in_one_line(stored: Stored) -> None:
    listed = _stepvault("sessions", "ls", "--json", "--store", str(stored.folder))
    failed = _stepvault("sessions", "show", str(uuid.uuid4()), "--store", str(stored.folder))

    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == {
        stored.workflow_run,
        stored.expiring,
        stored.expired,
    }
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.startswith("error: session ")
    assert failed.stderr.count("\n") == 1  # no traceback


def test_help_lists_the_session_commands() -> None:
    result = _stepvault("--help")

    assert result.returncode == 0, result.stderr
    for command in ("sessions", "cleanup", "stats", "--show-completion"):
        assert command in result.stdout


def test_shell_completion_script_and_completions() -> None:
    # Named, not detected: detection looks for a shell among the parent processes,
    # which a test run started by something else (an IDE, a service) does not have
    script = _stepvault(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    completed = _stepvault(
        env={
            "_STEPVAULT_COMPLETE": "complete_bash",
            "COMP_WORDS": "stepvault sessions ",
            "COMP_CWORD": "2",
        }
    )

    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _stepvault_completion stepvault" in script.stdout
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["ls", "show", "rm"]
