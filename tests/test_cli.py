"""The ``stepvault`` command line: run, resume, errors and Ctrl-C.

In-process paths go through typer's CliRunner; what only a real process shows
(exit codes after a signal, no traceback on stderr) goes through subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from engine import FileStore, Runner, Session, SessionInfo, StepEvent
from engine.cli import app
from engine.cli_support import WorkflowFiles

WORKFLOWS = Path(__file__).parents[1] / "workflows"
QUICKSTART = WORKFLOWS / "quickstart.py"
QUICKSTART_STEPS = ["fetch_reviews", "clean_reviews", "score_sentiment", "summarize"]
UNKNOWN_ID = "3f1c9a52-7a4e-4c1e-9d0b-6a2b1c3d4e5f"

# A workflow whose first step fails until a file named `ready` sits beside it.
FLAKY_WORKFLOW = """
from pathlib import Path

from engine import StepContext, Workflow

flaky = Workflow("flaky")


@flaky.step
def check(ctx: StepContext, value: int) -> int:
    if not Path(__file__).with_name("ready").exists():
        raise RuntimeError("not ready yet")
    return value + 1


@flaky.step
def double(ctx: StepContext, value: int) -> int:
    return value * 2
"""

# Two workflows in one file, told apart by attribute or by name.
TWO_WORKFLOWS = """
from engine import StepContext, Workflow

first = Workflow("alpha")
second = Workflow("beta")


@first.step
def shout(ctx: StepContext, text: str) -> str:
    return text.upper()


@second.step
def whisper(ctx: StepContext, text: str) -> str:
    return text.lower()
"""

# A workflow whose only step waits forever: a session stopped in flight.
STUCK_WORKFLOW = """
import asyncio

from engine import StepContext, Workflow

stuck = Workflow("stuck")


@stuck.step
async def hang(ctx: StepContext, value: object) -> None:
    await asyncio.Event().wait()
"""


@pytest.fixture(autouse=True)
def isolated_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what importing workflow files in-process adds to sys.path and sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        source = str(getattr(module, "__file__", None) or "")
        if name.startswith("stepvault_workflow_") or source.startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


@pytest.fixture
def invoke(store_dir: Path) -> Callable[..., Result]:
    """Run the CLI in-process against ``store_dir``, with quickstart steps taking no time."""
    runner = CliRunner()
    env = {
        "STEPVAULT_STORE": str(store_dir),
        "STEPVAULT_QUICKSTART_DELAY": "0",
        "SESSION_ENCRYPTION_KEY": None,
    }

    def call(*args: str) -> Result:
        return runner.invoke(app, list(args), env=env)

    return call


def process_env(delay: float) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("STEPVAULT_STORE", "SESSION_ENCRYPTION_KEY")
    }
    env["STEPVAULT_QUICKSTART_DELAY"] = str(delay)
    return env


def stepvault(*args: str, cwd: Path, delay: float = 0.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m engine.cli`` in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=cwd,
        env=process_env(delay),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load(store_dir: Path, session_id: str) -> Session:
    async def read() -> Session | None:
        store = FileStore(store_dir)
        try:
            return await store.load(session_id)
        finally:
            await store.close()

    session = asyncio.run(read())
    assert session is not None, f"session {session_id} is not in {store_dir}"
    return session


def rows(store_dir: Path) -> list[SessionInfo]:
    async def read() -> list[SessionInfo]:
        store = FileStore(store_dir)
        try:
            return await store.list()
        finally:
            await store.close()

    return asyncio.run(read())


def session_ids(store_dir: Path) -> list[str]:
    return [row.id for row in rows(store_dir)]


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


def assert_one_error_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr


# -- run ------------------------------------------------------------------------------


def test_run_json_prints_one_object_and_completes_the_session(
    invoke: Callable[..., Result], store_dir: Path
) -> None:
    # When
    result = invoke("run", str(QUICKSTART), "--input", '"rain jacket"', "--json")

    # Then
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"session_id", "status", "output"}
    assert data["status"] == "completed"
    assert data["output"]["product"] == "rain jacket"
    assert data["output"]["reviews"] == 3
    assert result.stderr == ""  # no progress bar with --json
    session = load(store_dir, data["session_id"])
    assert session.status == "completed"
    assert session.steps_done == QUICKSTART_STEPS
    assert session.state["product"] == "rain jacket"
    assert session.workflow_source == str(QUICKSTART.resolve())


def test_run_shows_session_and_progress_on_stderr_and_output_on_stdout(
    invoke: Callable[..., Result], store_dir: Path
) -> None:
    result = invoke("run", str(QUICKSTART))

    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)  # stdout holds the output alone
    assert output["product"] == "trail shoes"
    (session_id,) = session_ids(store_dir)
    assert f"session {session_id} started" in result.stderr
    for step in QUICKSTART_STEPS:
        assert f"✓ {session_id[:8]} {step}" in result.stderr
    assert "4/4" in result.stderr


def test_run_uses_the_store_option_over_the_environment(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"

    result = invoke("run", str(QUICKSTART), "--store", str(elsewhere), "--json")

    assert result.exit_code == 0, result.stderr
    session_id = json.loads(result.stdout)["session_id"]
    assert session_ids(elsewhere) == [session_id]
    assert not store_dir.exists()


def test_run_sets_the_session_ttl(invoke: Callable[..., Result], store_dir: Path) -> None:
    result = invoke("run", str(QUICKSTART), "--ttl", "120", "--json")

    assert result.exit_code == 0, result.stderr
    session = load(store_dir, json.loads(result.stdout)["session_id"])
    assert session.ttl == 120
    assert 0 < (session.expires_at - session.last_activity).total_seconds() <= 120


def test_run_picks_a_workflow_by_attribute_or_by_name(
    invoke: Callable[..., Result], tmp_path: Path
) -> None:
    flows = write(tmp_path / "flows.py", TWO_WORKFLOWS)

    by_attribute = invoke("run", f"{flows}:first", "--input", '"Hi"', "--json")
    by_name = invoke("run", f"{flows}:beta", "--input", '"Hi"', "--json")

    assert json.loads(by_attribute.stdout)["output"] == "HI"
    assert json.loads(by_name.stdout)["output"] == "hi"


def test_run_of_a_file_with_several_workflows_names_them(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    flows = write(tmp_path / "flows.py", TWO_WORKFLOWS)

    result = invoke("run", str(flows))

    assert result.exit_code == 1
    assert_one_error_line(result.stderr)
    assert "first (name 'alpha')" in result.stderr
    assert "second (name 'beta')" in result.stderr
    assert "FILE:WORKFLOW" in result.stderr
    assert not store_dir.exists() or session_ids(store_dir) == []


def test_a_workflow_file_imports_its_neighbours(
    invoke: Callable[..., Result], tmp_path: Path
) -> None:
    # Given a workflow file importing a helper module from its own folder
    folder = tmp_path / "project"
    folder.mkdir()
    write(folder / "greeting_helpers.py", "def greet(name: str) -> str:\n    return 'hi ' + name\n")
    flow = write(
        folder / "greet.py",
        """
        from greeting_helpers import greet

        from engine import StepContext, Workflow

        wf = Workflow("greet")


        @wf.step
        def hello(ctx: StepContext, name: str) -> str:
            return greet(name)
        """,
    )

    # When
    result = invoke("run", str(flow), "--input", '"ada"', "--json")

    # Then
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"] == "hi ada"


def test_a_failed_step_exits_1_then_resume_by_id_finishes_it(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    # Given a run whose first step fails
    flow = write(tmp_path / "flaky.py", FLAKY_WORKFLOW)
    failed = invoke("run", str(flow), "--input", "20", "--json")
    assert failed.exit_code == 1
    data = json.loads(failed.stdout)
    session_id = data["session_id"]
    assert data["status"] == "failed"
    assert "not ready yet" in data["error"]
    assert_one_error_line(failed.stderr)
    assert f"stepvault resume {session_id}" in failed.stderr
    assert load(store_dir, session_id).status == "failed"

    # When the cause is fixed and the session resumed by id
    (tmp_path / "ready").touch()
    resumed = invoke("resume", session_id, "--json")

    # Then the failed step runs again and the session completes
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {
        "session_id": session_id,
        "status": "completed",
        "output": 42,
    }
    history = [(r.name, r.error is None) for r in load(store_dir, session_id).tool_history]
    assert history == [("check", False), ("check", True), ("double", True)]


def test_resume_of_a_completed_session_returns_its_output_without_running(
    invoke: Callable[..., Result], store_dir: Path
) -> None:
    # Given
    first = invoke("run", str(QUICKSTART), "--json")
    session_id = json.loads(first.stdout)["session_id"]

    # When
    again = invoke("resume", session_id, "--json")

    # Then
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["output"] == json.loads(first.stdout)["output"]
    assert len(load(store_dir, session_id).tool_history) == len(QUICKSTART_STEPS)


def test_resume_uses_workflow_files_given_on_the_command_line(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    # Given a failed session whose workflow file then moved
    flow = write(tmp_path / "flaky.py", FLAKY_WORKFLOW)
    failed = invoke("run", str(flow), "--input", "1", "--json")
    session_id = json.loads(failed.stdout)["session_id"]
    moved = tmp_path / "moved"
    moved.mkdir()
    flow.rename(moved / "flaky.py")
    (moved / "ready").touch()

    # When
    without = invoke("resume", session_id)
    with_file = invoke("resume", session_id, "--workflow", str(moved / "flaky.py"), "--json")

    # Then
    assert without.exit_code == 1
    assert_one_error_line(without.stderr)
    assert session_id in without.stderr
    assert str(flow.resolve()) in without.stderr
    assert with_file.exit_code == 0, with_file.stderr
    assert json.loads(with_file.stdout)["output"] == 4


def stop_in_flight(flow: Path, store_dir: Path) -> str:
    """Start ``flow``'s workflow, let its first step begin, then stop the runner."""

    async def main() -> str:
        workflow = WorkflowFiles().select(flow, None)
        started = asyncio.Event()

        def hook(event: StepEvent) -> None:
            if event.kind == "started":
                started.set()

        async with Runner(FileStore(store_dir), hooks=[hook]) as runner:
            session_id = await runner.start(workflow, None)
            running = asyncio.ensure_future(runner.wait(session_id))
            begun = asyncio.ensure_future(started.wait())
            await asyncio.wait({running, begun}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                running.result()  # the step failed or finished: say why
            assert begun.done(), "the step never started"
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        return session_id

    return asyncio.run(main())


def test_resume_all_names_the_session_whose_workflow_file_is_missing(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    # Given an unfinished session whose workflow file was deleted
    flow = write(tmp_path / "stuck.py", STUCK_WORKFLOW)
    session_id = stop_in_flight(flow, store_dir)
    assert load(store_dir, session_id).status == "running"
    flow.unlink()

    # When
    result = invoke("resume", "--all")

    # Then
    assert result.exit_code == 1
    assert_one_error_line(result.stderr)
    assert session_id in result.stderr
    assert str(flow.resolve()) in result.stderr
    assert load(store_dir, session_id).status == "running"  # nothing lost


def test_resume_all_with_nothing_to_do_says_so(invoke: Callable[..., Result]) -> None:
    plain = invoke("resume", "--all")
    as_json = invoke("resume", "--all", "--json")

    assert plain.exit_code == 0
    assert "nothing to resume" in plain.stderr
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == []


def test_resume_all_leaves_finished_sessions_alone(
    invoke: Callable[..., Result], tmp_path: Path, store_dir: Path
) -> None:
    # Given one completed and one failed session
    invoke("run", str(QUICKSTART))
    invoke("run", str(write(tmp_path / "flaky.py", FLAKY_WORKFLOW)), "--input", "1")
    assert len(session_ids(store_dir)) == 2

    # When
    result = invoke("resume", "--all", "--json")

    # Then
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == []


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["run", str(QUICKSTART), "--input", "{not json"], 2, "not valid JSON"),
        (["run", str(QUICKSTART), "--input", "rain jacket"], 2, "a string needs quotes"),
        (["run", f"{QUICKSTART}:nope"], 1, "declares no workflow 'nope'"),
        (["run", "missing_flow.py"], 1, "'missing_flow.py' not found"),
        (["run", str(QUICKSTART), "--ttl", "0"], 2, "--ttl"),
        (["run", str(QUICKSTART), "--store", "redis://x"], 1, "scheme 'redis'"),
        (["run"], 2, "Missing argument"),
        (["resume", UNKNOWN_ID], 1, f"session {UNKNOWN_ID} not found"),
        (["resume", "../../etc"], 1, "invalid session id"),
        (["resume"], 2, "--all"),
        (["resume", UNKNOWN_ID, "--all"], 2, "not both"),
        (["launch"], 2, "No such command"),
    ],
)
def test_bad_usage_prints_one_line_and_exits_non_zero(
    invoke: Callable[..., Result], store_dir: Path, args: list[str], code: int, says: str
) -> None:
    result = invoke(*args)

    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # not an exception escaping
    assert_one_error_line(result.stderr)
    assert says in result.stderr
    assert result.stdout == ""
    assert not store_dir.exists() or session_ids(store_dir) == []


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["run", str(QUICKSTART), "--input", "{not json"], 2, "not valid JSON"),
        (["run", f"{QUICKSTART}:nope"], 1, "declares no workflow 'nope'"),
        (["run", "missing_flow.py"], 1, "not found"),
        (["resume", UNKNOWN_ID], 1, "not found"),
        (["resume", "not-a-uuid"], 1, "invalid session id"),
    ],
)
def test_errors_in_a_real_process_print_no_traceback(
    tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    done = stepvault(*args, cwd=tmp_path)

    assert done.returncode == code, done.stderr
    assert_one_error_line(done.stderr)
    assert says in done.stderr


# -- Ctrl-C ---------------------------------------------------------------------------


def wait_for_committed_step(store_dir: Path, timeout: float) -> str:
    """Poll the store until a session has committed a step; return its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store_dir.exists():
            for row in rows(store_dir):
                if row.steps_done >= 1:
                    return row.id
        time.sleep(0.02)
    raise AssertionError(f"no step committed in {store_dir} within {timeout}s")


def test_ctrl_c_keeps_the_session_resumable_and_resume_all_finishes_it(
    tmp_path: Path,
) -> None:
    # Given a quickstart run in a real process, each step taking a second
    store_dir = tmp_path / "sessions"  # the default ./sessions, seen from cwd
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", str(QUICKSTART)],
        cwd=tmp_path,
        env=process_env(delay=1.0),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A parent started in the background may ignore SIGINT, and children
        # inherit that; give the CLI the default handling a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        session_id = wait_for_committed_step(store_dir, timeout=20)

        # When Ctrl-C arrives mid-run
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
        process.wait()

    # Then it exits 130 and says how to resume
    assert process.returncode == 130, stderr
    assert stdout == ""
    assert f"interrupted: session {session_id} stopped after step" in stderr
    assert f"resume with: stepvault resume {session_id}" in stderr
    assert "Traceback" not in stderr
    stopped = load(store_dir, session_id)
    assert stopped.status == "running"
    assert 1 <= len(stopped.steps_done) < len(QUICKSTART_STEPS)

    # When a new process resumes every unfinished session
    resumed = stepvault("resume", "--all", "--json", cwd=tmp_path, delay=0.01)

    # Then the session completes and no completed step ran again
    assert resumed.returncode == 0, resumed.stderr
    (outcome,) = json.loads(resumed.stdout)
    assert outcome["session_id"] == session_id
    assert outcome["status"] == "completed"
    assert outcome["workflow"] == "quickstart"
    assert outcome["output"]["product"] == "trail shoes"
    finished = load(store_dir, session_id)
    assert finished.status == "completed"
    assert Counter(r.name for r in finished.tool_history) == Counter(QUICKSTART_STEPS)
    assert all(r.error is None and r.attempt == 1 for r in finished.tool_history)
