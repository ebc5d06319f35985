"""The LangGraph checkpoint saver: LangGraph's own conformance suite, and real graphs.

The conformance suite (``langgraph-checkpoint-conformance``, pinned in the ``test``
extra) runs against the saver over each kind of store; its report is printed. The
graph tests use real processes, real files and ``kill -9``.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

if not os.environ.get("CI"):  # CI installs the test extra: there, a missing package fails
    pytest.importorskip("langgraph.checkpoint.conformance")

from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import (
    BASE_CAPABILITIES,
    EXTENDED_CAPABILITIES,
)
from langgraph.graph import END, START, StateGraph

from engine import (
    DecryptionError,
    FileStore,
    MemoryStore,
    SessionManager,
    Store,
)
from engine.integrations.langgraph import (
    THREAD_KEY,
    WORKFLOW,
    StepvaultSaver,
    session_id_for,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_TESTS = 58  # put 17, put_writes 10, get_tuple 10, list 16, delete_thread 5 (suite 0.0.2)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- LangGraph's conformance suite ------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_conformance_suite_passes_every_base_and_extended_test(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: a factory building a fresh saver over a fresh store for each capability
    @checkpointer_test(name=f"StepvaultSaver over {kind} store")
    async def factory() -> AsyncIterator[StepvaultSaver]:
        store: Store = MemoryStore() if kind == "memory" else FileStore(tmp_path / uuid.uuid4().hex)
        saver = StepvaultSaver(store)
        yield saver
        await saver.aclose()

    # When
    report = await validate(factory)

    # Then: every capability is implemented and every one of its tests passed
    results = report.results
    base = sum(results[cap.value].tests_passed for cap in BASE_CAPABILITIES)
    extended = sum(results[cap.value].tests_passed for cap in EXTENDED_CAPABILITIES)
    failed = sum(result.tests_failed for result in results.values())
    with capsys.disabled():
        report.print_report()
        print(  # noqa: T201  # the suite's counts belong in the CI log
            f"  conformance ({kind} store): base {base} passed, extended {extended} passed, "
            f"{failed} failed"
        )
    assert report.passed_all_base(), report.to_dict()
    assert report.passed_all(), report.to_dict()
    assert all(results[cap.value].detected for cap in EXTENDED_CAPABILITIES)
    assert base == BASE_TESTS
    assert failed == 0


# -- a real graph across processes -------------------------------------------------------

GRAPH_SCRIPT = """
import itertools
import json
import operator
import sys
from pathlib import Path
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph

from engine import FileStore
from engine.integrations.langgraph import StepvaultSaver

folder, steps, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


class State(TypedDict):
    count: int
    seen: Annotated[list[int], operator.add]


def work(state: State) -> dict:
    return {"count": state["count"] + 1, "seen": [state["count"]]}


def report(state: State) -> dict:
    with open(folder / "progress.log", "a") as log:  # one line per step that ran
        log.write(f"{state['count']}\\n")
    return {}


builder = StateGraph(State)
builder.add_node("work", work)
builder.add_node("report", report)
builder.add_edge(START, "work")
builder.add_edge("work", "report")
builder.add_conditional_edges("report", lambda s: "work" if s["count"] < steps else END)
config = {"configurable": {"thread_id": "orders/42"}, "recursion_limit": 2 * steps + 10}

with StepvaultSaver(FileStore(folder / "sessions")) as saver:
    graph = builder.compile(checkpointer=saver)
    if mode == "start":  # durable per step: a checkpoint is on disk before the next step
        graph.invoke({"count": 0, "seen": []}, config, durability="sync")
    else:
        before = graph.get_state(config).values["count"]
        final = graph.invoke(None, config, durability="sync")  # on from the last checkpoint
        print(json.dumps({"before": before, "count": final["count"], "seen": final["seen"]}))
"""


def test_graph_killed_mid_run_resumes_in_a_new_process(tmp_path: Path) -> None:
    # Given: a two-node graph looping 300 times, checkpointed in a FileStore
    script = tmp_path / "graph_run.py"
    script.write_text(GRAPH_SCRIPT)
    steps = 300
    log = tmp_path / "progress.log"
    first = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(steps), "start"], cwd=ROOT
    )
    try:
        _wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, "five steps")
    finally:
        # When: the process is killed in the middle of the run
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL

    # Then: a new process with a new saver finds the thread and finishes it exactly
    second = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(steps), "resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(second.stdout)
    assert 0 < result["before"] < steps
    assert result["count"] == steps
    assert result["seen"] == list(range(steps))


# -- storage grows linearly ----------------------------------------------------------------


class _Loop(TypedDict):
    i: int
    outputs: Annotated[list[str], operator.add]


async def test_storage_per_step_stays_flat_as_state_accumulates(tmp_path: Path) -> None:
    # Given: a graph whose state accumulates one 256-byte output per step (as a
    # chat history does), on a FileStore that never compacts, so every byte
    # committed stays on disk to be counted
    steps, size = 200, 256
    folder = tmp_path / "sessions"
    stored: list[int] = []

    def step(state: _Loop) -> dict[str, Any]:
        stored.append(_folder_bytes(folder))  # what the checkpoints so far take
        return {"i": state["i"] + 1, "outputs": [str(state["i"] % 10) * size]}

    builder = StateGraph(_Loop)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: "step" if s["i"] < steps else END)
    config: Any = {"configurable": {"thread_id": "loop"}, "recursion_limit": steps + 10}

    # When: it runs 200 steps through the async API, each checkpoint durable
    async with StepvaultSaver(FileStore(folder, compact_bytes=1 << 40)) as saver:
        graph = builder.compile(checkpointer=saver)
        await graph.ainvoke({"i": 0, "outputs": []}, config, durability="sync")

    # Then: each step adds about the same bytes, late or early: linear, not quadratic
    growth = [after - before for before, after in itertools.pairwise(stored)]
    early, late = growth[5:55], growth[-50:]
    assert sum(late) / len(late) <= 1.25 * sum(early) / len(early), (early, late)
    assert sum(late) / len(late) < 4 * size + 4096  # a step's own data, not the history
    async with StepvaultSaver(FileStore(folder)) as saver:
        state = await builder.compile(checkpointer=saver).aget_state(config)
    assert state.values["outputs"] == [str(i % 10) * size for i in range(steps)]


# -- a thread is a stepvault session ---------------------------------------------------------


def _put(saver: StepvaultSaver, thread_id: str, channel_values: dict[str, Any]) -> Any:
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = channel_values
    versions = {name: saver.get_next_version(None, None) for name in channel_values}
    checkpoint["channel_versions"] = versions
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    return saver.put(config, checkpoint, {"source": "input", "step": -1}, versions)


async def test_a_thread_is_a_session_with_a_sliding_ttl_and_cleanup(tmp_path: Path) -> None:
    # Given: a saver whose threads live one hour after their last write
    store = FileStore(tmp_path / "sessions")
    thread_id = "customer 7 / chat"
    async with StepvaultSaver(store, ttl=timedelta(hours=1)) as saver:
        # When: a checkpoint is written
        _put(saver, thread_id, {"messages": ["hello"]})
        before = datetime.now(UTC)

        # Then: one session holds the thread, named after it and expiring in an hour
        session = await FileStore(tmp_path / "sessions").load(session_id_for(thread_id))
        assert session is not None
        assert session.workflow == WORKFLOW
        assert session.metadata.model_extra == {THREAD_KEY: thread_id}
        assert "langgraph" in session.metadata.tags
        expires = session.expires_at - before
        assert timedelta(minutes=59) < expires <= timedelta(hours=1)

    # Given: a saver whose threads expire at once
    async with StepvaultSaver(FileStore(tmp_path / "short"), ttl=0.2) as saver:
        _put(saver, "brief", {"messages": ["hi"]})
        config: Any = {"configurable": {"thread_id": "brief"}}
        assert await saver.aget_tuple(config) is not None

        # When: its TTL runs out
        deadline = time.monotonic() + 30
        while await saver.aget_tuple(config) is not None:
            assert time.monotonic() < deadline, "the thread never expired"

        # Then: it reads as absent, cleanup removes it, and the thread can start over
        async with SessionManager(FileStore(tmp_path / "short"), cleanup_interval=None) as mgr:
            assert (await mgr.perform_cleanup()).cleaned_sessions == 1
        _put(saver, "brief", {"messages": ["again"]})
        found = await saver.aget_tuple(config)
        assert found is not None
        assert found.checkpoint["channel_values"] == {"messages": ["again"]}


def test_two_savers_writing_one_thread_in_turn_see_each_others_checkpoints(
    tmp_path: Path,
) -> None:
    # Given: two savers on one folder, as two processes would have
    folder = tmp_path / "sessions"
    first = StepvaultSaver(FileStore(folder), lease_hold=0.05)
    second = StepvaultSaver(FileStore(folder), lease_hold=0.05)
    try:
        config: Any = {"configurable": {"thread_id": "shared", "checkpoint_ns": ""}}
        stored = []
        # When: they append to one list channel in turn, each after the other's write
        for index, saver in enumerate([first, second, first]):
            checkpoint = empty_checkpoint()
            version = saver.get_next_version(None if index == 0 else f"{index}.0", None)
            checkpoint["channel_values"] = {"items": list(range(index + 1))}
            checkpoint["channel_versions"] = {"items": version}
            parent = stored[-1]["configurable"]["checkpoint_id"] if stored else None
            if parent is not None:
                config["configurable"]["checkpoint_id"] = parent
            metadata: Any = {"source": "loop", "step": index}
            stored.append(saver.put(config, checkpoint, metadata, {"items": version}))

        # Then: a third reader sees all three, newest first, each with its own value
        with StepvaultSaver(FileStore(folder)) as reader:
            listed = list(reader.list({"configurable": {"thread_id": "shared"}}))
    finally:
        first.close()
        second.close()
    assert [t.config["configurable"]["checkpoint_id"] for t in listed] == [
        s["configurable"]["checkpoint_id"] for s in reversed(stored)
    ]
    assert [t.checkpoint["channel_values"]["items"] for t in listed] == [[0, 1, 2], [0, 1], [0]]
    assert [t.metadata["step"] for t in listed] == [2, 1, 0]


def _extend(state: list[str], writes: list[list[str]]) -> list[str]:
    return [*state, *(item for write in writes for item in write)]


class _Delta(TypedDict):
    i: int
    items: Annotated[list[str], DeltaChannel(_extend, snapshot_frequency=7)]


async def test_delta_channel_state_survives_a_new_saver_and_pruning(tmp_path: Path) -> None:
    # Given: a graph whose list lives in a DeltaChannel (only writes are stored)
    def step(state: _Delta) -> dict[str, Any]:
        return {"i": state["i"] + 1, "items": [f"x{state['i']}"]}

    builder = StateGraph(_Delta)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: "step" if s["i"] < 30 else END)
    config: Any = {"configurable": {"thread_id": "delta"}, "recursion_limit": 100}
    folder = tmp_path / "sessions"
    async with StepvaultSaver(FileStore(folder)) as saver:
        await builder.compile(checkpointer=saver).ainvoke({"i": 0, "items": []}, config)

    # When: a new saver reads it back, then prunes the thread to its latest checkpoint
    async with StepvaultSaver(FileStore(folder)) as saver:
        graph = builder.compile(checkpointer=saver)
        read_back = (await graph.aget_state(config)).values
        await saver.aprune(["delta"])
        history = [state async for state in graph.aget_state_history(config)]
        after_prune = (await graph.aget_state(config)).values

    # Then: the replayed list is whole both times, and pruning dropped most history
    expected = [f"x{i}" for i in range(30)]
    assert read_back["items"] == expected
    assert after_prune["items"] == expected
    assert len(history) < 10


def test_encrypted_store_keeps_thread_contents_unreadable_on_disk(tmp_path: Path) -> None:
    # Given: a saver on an encrypted FileStore
    folder = tmp_path / "sessions"
    note = "the launch code is 0000-swordfish"
    with StepvaultSaver(FileStore(folder, encryption_key="correct horse")) as saver:
        # When: a confidential note goes into a checkpoint
        _put(saver, "vault", {"note": note})

    # Then: neither it nor any encoding of it is on disk, and only the key reads it
    raw = b"".join(path.read_bytes() for path in folder.rglob("*") if path.is_file())
    assert note.encode() not in raw
    assert b"swordfish" not in raw
    config: Any = {"configurable": {"thread_id": "vault"}}
    with StepvaultSaver(FileStore(folder, encryption_key="correct horse")) as saver:
        found = saver.get_tuple(config)
        assert found is not None
        assert found.checkpoint["channel_values"] == {"note": note}
    with (
        StepvaultSaver(FileStore(folder, encryption_key="wrong horse")) as saver,
        pytest.raises(DecryptionError),
    ):
        saver.get_tuple(config)


def test_without_langgraph_the_import_error_names_the_extra() -> None:
    # Given: a Python where langgraph cannot be imported
    code = textwrap.dedent(
        """
        import sys
        sys.modules["langgraph"] = None
        import engine  # the engine itself never needs it
        try:
            import engine.integrations.langgraph
        except ImportError as exc:
            print(type(exc).__name__, isinstance(exc, engine.EngineError), exc)
        """
    )
    # When
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    # Then
    assert result.stdout.startswith("MissingExtraError True ")
    assert "pip install 'stepvault[langgraph]'" in result.stdout
