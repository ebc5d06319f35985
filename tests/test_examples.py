"""The example workflows in ``workflows/`` run as documented, in real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import FileStore, Session

WORKFLOWS = Path(__file__).parents[1] / "workflows"
QUICKSTART = WORKFLOWS / "quickstart.py"
AGENT = WORKFLOWS / "agent.py"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in ``cwd`` with quickstart steps taking a hundredth of a second."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("STEPVAULT_STORE", "SESSION_ENCRYPTION_KEY")
    }
    env["STEPVAULT_QUICKSTART_DELAY"] = "0.01"
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stored_sessions(folder: Path) -> list[Session]:
    """Load every session a run left in ``folder``."""

    async def read() -> list[Session]:
        store = FileStore(folder)
        try:
            loaded = [await store.load(row.id) for row in await store.list()]
        finally:
            await store.close()
        return [session for session in loaded if session is not None]

    return asyncio.run(read())


def test_quickstart_runs_from_the_command_line(tmp_path: Path) -> None:
    # When
    done = run(["-m", "engine.cli", "run", str(QUICKSTART)], cwd=tmp_path)

    # Then
    assert done.returncode == 0, done.stderr
    (session,) = stored_sessions(tmp_path / "sessions")
    assert f"session {session.id} started" in done.stderr
    summary = json.loads(done.stdout)
    assert summary == session.outputs["summarize"]
    assert session.status == "completed"
    assert session.steps_done == ["fetch_reviews", "clean_reviews", "score_sentiment", "summarize"]
    # cleaning dropped the empty review and the duplicate
    assert session.state["fetched"] - session.state["dropped"] == summary["reviews"]
    assert session.state["dropped"] == 2
    assert summary["product"] == "trail shoes"
    assert summary["verdict"] == session.state["verdict"]


def test_quickstart_runs_as_a_script_and_records_its_file(tmp_path: Path) -> None:
    # When
    done = run([str(QUICKSTART), "rain jacket"], cwd=tmp_path)

    # Then
    assert done.returncode == 0, done.stderr
    (session,) = stored_sessions(tmp_path / "sessions")
    first_line, _, rest = done.stdout.partition("\n")
    assert first_line.startswith(f"session {session.id}")
    assert json.loads(rest)["product"] == "rain jacket"
    assert session.status == "completed"
    # `stepvault resume` imports the workflow from here
    assert Path(session.workflow_source or "") == QUICKSTART.resolve()


def test_agent_answers_from_the_command_line_and_records_its_tool_calls(
    tmp_path: Path,
) -> None:
    question = "What is the combined population of Lyon and Marseille?"

    # When
    done = run(
        ["-m", "engine.cli", "run", str(AGENT), "--input", json.dumps(question), "--json"],
        cwd=tmp_path,
    )

    # Then
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    reply = result["output"]
    assert reply["question"] == question
    assert "1,395,326" in reply["answer"]  # 522,250 + 873,076
    assert reply["sources"] == ["lyon", "marseille"]
    tools = [call["tool"] for call in reply["tool_calls"]]
    assert tools == ["search", "search", "calculator"]
    assert all(call["error"] is None for call in reply["tool_calls"])
    (session,) = stored_sessions(tmp_path / "sessions")
    assert session.state["tool_calls"] == reply["tool_calls"]
    assert session.steps_done == ["plan", "search_knowledge", "compute", "answer"]


def test_agent_runs_as_a_script(tmp_path: Path) -> None:
    done = run([str(AGENT), "How many people live in Lyon and Paris in total?"], cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "2,655,361" in done.stdout.splitlines()[0]  # 522,250 + 2,133,111
    (session,) = stored_sessions(tmp_path / "sessions")
    assert session.status == "completed"


@pytest.mark.parametrize(
    ("question", "says", "tools"),
    [
        ("What is 6 times 7?", "6 * 7 = 42", ["calculator"]),  # the README's example
        ("What is 1 divided by 0?", "could not work out 1 / 0: ZeroDivisionError", ["calculator"]),
        ("Who painted the Mona Lisa?", "I could not find", ["search"]),
    ],
)
def test_agent_answers_what_it_can_and_says_what_it_cannot(
    tmp_path: Path, question: str, says: str, tools: list[str]
) -> None:
    done = run(
        ["-m", "engine.cli", "run", str(AGENT), "--input", json.dumps(question), "--json"],
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)["output"]
    assert says in reply["answer"]
    assert [call["tool"] for call in reply["tool_calls"]] == tools
