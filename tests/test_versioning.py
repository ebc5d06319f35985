"""Code-change safety: sessions record their workflow's version and shape; a compatible
change proceeds on resume, an incompatible one raises WorkflowMismatchError saying what
changed; ``check`` / ``stepvault check`` tell before a deploy; migrations upgrade state.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from workflow_support import Stores

from engine import (
    FileStore,
    Runner,
    StepContext,
    StepFailedError,
    Workflow,
    WorkflowDefinitionError,
    WorkflowMismatchError,
)
from engine.cli import app
from engine.cli_support import WorkflowFiles


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(request.param, tmp_path / "sessions")
    yield opened
    await opened.close()


def _v1(calls: Counter[str], broken: dict[str, bool]) -> Workflow:
    """receive -> charge (fails while broken) -> ship."""
    wf = Workflow("orders", version="1")

    @wf.step
    def receive(ctx: StepContext, amount: int) -> int:
        calls["receive"] += 1
        ctx.state["n"] = amount
        return amount

    @wf.step
    def charge(ctx: StepContext, amount: int) -> int:
        calls["charge"] += 1
        if broken["on"]:
            raise ConnectionError("card network down")
        return amount * 100

    @wf.step
    def ship(ctx: StepContext, cents: int) -> str:
        calls["ship"] += 1
        return f"shipped {cents}"

    return wf


async def _failed_at_charge(stores: Stores, wf: Workflow) -> str:
    async with Runner(stores.open(), [wf]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(wf, 3)
    return failure.value.session_id


async def test_a_session_records_its_workflows_version_and_shape(stores: Stores) -> None:
    wf = _v1(Counter(), {"on": False})
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 3)
        await runner.wait(sid)

    session = await stores.load(sid)
    assert session.workflow_version == "1"
    assert session.workflow_fingerprint == wf.fingerprint
    assert session.workflow_shape == [("receive", "int"), ("charge", "int"), ("ship", "str")]
    assert session.workflow_shape == wf.shape


async def test_appended_steps_proceed_and_the_session_takes_the_new_stamp(stores: Stores) -> None:
    calls = Counter[str]()
    sid = await _failed_at_charge(stores, _v1(calls, {"on": True}))

    # When version 2 appends a step
    grown = _v1(calls, {"on": False})
    grown.version = "2"

    @grown.step
    def notify(ctx: StepContext, shipped: str) -> str:
        return shipped + ", notified"

    async with Runner(stores.open(), [grown]) as runner:
        assert await runner.resume(sid) == "shipped 300, notified"

    session = await stores.load(sid)
    assert (session.workflow_version, session.workflow_fingerprint) == ("2", grown.fingerprint)
    assert session.workflow_shape == grown.shape
    assert calls == Counter({"receive": 1, "charge": 2, "ship": 1})


async def test_a_completed_session_stays_completed_when_steps_are_appended(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    done = await _completed(stores, _v1(calls, {"on": False}))
    grown = _v1(calls, {"on": False})

    @grown.step
    def notify(ctx: StepContext, shipped: str) -> str:
        calls["notify"] += 1
        return shipped + ", notified"

    async with Runner(stores.open(), [grown]) as runner:
        assert await runner.resume(done) == "shipped 300"
    assert calls["notify"] == 0


async def test_a_session_whose_remaining_steps_were_removed_completes(stores: Stores) -> None:
    calls = Counter[str]()
    sid = await _failed_at_charge(stores, _v1(calls, {"on": True}))
    shorter = Workflow("orders", version="2")
    shorter.step(name="receive")(_v1(calls, {"on": False}).steps[0].fn)

    async with Runner(stores.open(), [shorter]) as runner:
        assert await runner.resume(sid) == 3  # the output of its last step, "receive"
    session = await stores.load(sid)
    assert (session.status, session.steps_done) == ("completed", ["receive"])


async def _completed(stores: Stores, wf: Workflow) -> str:
    async with Runner(stores.open(), [wf]) as runner:
        sid = await runner.start(wf, 3)
        await runner.wait(sid)
    return sid


async def test_a_completed_step_moved_is_incompatible_and_nothing_runs(stores: Stores) -> None:
    calls = Counter[str]()
    sid = await _failed_at_charge(stores, _v1(calls, {"on": True}))
    # receive is completed; version 2 puts a new step before it
    moved = Workflow("orders", version="2")

    @moved.step
    def validate(ctx: StepContext, amount: int) -> int:
        calls["validate"] += 1
        return amount

    v1 = _v1(calls, {"on": False})
    for step in v1.steps:
        moved.step(name=step.name)(step.fn)

    async with Runner(stores.open(), [moved]) as runner:
        with pytest.raises(WorkflowMismatchError, match="'receive' moved from step 1 to step 2"):
            await runner.resume(sid)
    assert calls == Counter({"receive": 1, "charge": 1})
    assert (await stores.load(sid)).steps_done == ["receive"]


async def test_a_completed_step_whose_output_no_longer_fits_is_incompatible(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    sid = await _failed_at_charge(stores, _v1(calls, {"on": True}))
    changed = Workflow("orders", version="2")

    @changed.step
    def receive(ctx: StepContext, amount: int) -> list[str]:  # was int
        return [str(amount)]

    @changed.step
    def charge(ctx: StepContext, items: list[str]) -> int:
        calls["charge"] += 1
        return len(items)

    async with Runner(stores.open(), [changed]) as runner:
        with pytest.raises(WorkflowMismatchError, match=r"returns list\[str\] \(it returned int"):
            await runner.resume(sid)
    assert calls["charge"] == 1


async def test_an_output_type_widened_compatibly_proceeds(stores: Stores) -> None:
    calls = Counter[str]()
    sid = await _failed_at_charge(stores, _v1(calls, {"on": True}))
    widened = Workflow("orders", version="2")

    @widened.step
    def receive(ctx: StepContext, amount: int) -> float:  # int fits float
        return float(amount)

    @widened.step
    def charge(ctx: StepContext, amount: float) -> int:
        return round(amount * 100)

    async with Runner(stores.open(), [widened]) as runner:
        assert await runner.resume(sid) == 300


async def test_check_tells_safe_reruns_and_incompatible_for_each_session(stores: Stores) -> None:
    calls = Counter[str]()
    broken = {"on": False}
    v1 = _v1(calls, broken)
    hold = asyncio.Event()

    slow = Workflow("orders", version="1")
    slow.step(name="receive")(v1.steps[0].fn)
    slow.step(name="charge")(v1.steps[1].fn)

    @slow.step(name="ship")
    async def ship(ctx: StepContext, cents: int) -> int:
        hold.set()
        await asyncio.Event().wait()
        return cents

    # Given a completed session, a failed one, and one stopped during "ship"
    async with Runner(stores.open(), [v1]) as runner:
        completed = await runner.start(v1, 1)
        await runner.wait(completed)
        broken["on"] = True
        failed = await runner.start(v1, 2)
        with pytest.raises(StepFailedError):
            await runner.wait(failed)
        broken["on"] = False
    async with Runner(stores.open(), [slow]) as runner:
        stopped = await runner.start(slow, 3)
        await asyncio.wait_for(hold.wait(), 10)

    def verdicts(checks: list[object]) -> dict[str, tuple[str, str | None]]:
        return {c.session_id: (c.verdict, c.step) for c in checks}  # type: ignore[attr-defined]

    # Then the same code is safe, except that the failed step will run again
    async with Runner(stores.open()) as runner:
        same = verdicts(await runner.check(v1))
    assert same == {
        completed: ("safe", None),
        failed: ("reruns", "charge"),
        stopped: ("safe", "ship"),
    }

    # And a rename of the first step makes every one of them incompatible
    renamed = Workflow("orders", version="2")
    renamed.step(name="accept")(v1.steps[0].fn)
    async with Runner(stores.open()) as runner:
        checks = await runner.check(renamed)
    assert {c.verdict for c in checks} == {"incompatible"}
    assert all("'receive' (step 1) was renamed or removed" in c.detail for c in checks)

    # And a new return type for "charge" breaks those that completed it; the failed
    # one was in "charge" itself, which now starts over
    retyped = Workflow("orders", version="3")
    retyped.step(name="receive")(v1.steps[0].fn)

    @retyped.step(name="charge")
    def charge_text(ctx: StepContext, amount: int) -> str:
        return str(amount)

    async with Runner(stores.open()) as runner:
        checks = await runner.check(retyped)
    assert verdicts(checks) == {
        completed: ("incompatible", "charge"),
        failed: ("reruns", "charge"),
        stopped: ("incompatible", "charge"),
    }
    assert "which changed" in next(c.detail for c in checks if c.session_id == failed)


async def test_a_step_renamed_while_in_progress_starts_over_without_the_old_record(
    stores: Stores,
) -> None:
    calls = Counter[str]()
    old = Workflow("lookup", version="1")

    def fetch(key: str) -> str:
        calls["fetch"] += 1
        return key.upper()

    @old.step
    async def find(ctx: StepContext, key: str) -> str:
        found = await ctx.tool("fetch", fetch, key)
        raise RuntimeError(f"could not parse {found}")

    async with Runner(stores.open(), [old]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(old, "k")
    sid = failure.value.session_id

    new = Workflow("lookup", version="2")

    @new.step
    async def find_better(ctx: StepContext, key: str) -> str:
        return await ctx.tool("fetch", fetch, key)

    async with Runner(stores.open()) as runner:
        (found,) = await runner.check(new)
    assert (found.verdict, found.step) == ("reruns", "find_better")
    async with Runner(stores.open(), [new]) as runner:
        assert await runner.resume(sid) == "K"
    assert calls["fetch"] == 2  # the old step's recorded call was not replayed into the new


# -- migrations ---------------------------------------------------------------------------


def _counter(version: str, calls: Counter[str], broken: dict[str, bool]) -> Workflow:
    wf = Workflow("counter", version=version)

    @wf.step
    def count(ctx: StepContext, words: list[str]) -> int:
        ctx.state["n"] = len(words)
        return len(words)

    @wf.step
    def report(ctx: StepContext, total: int) -> str:
        calls["report"] += 1
        if broken["on"]:
            raise RuntimeError("printer jammed")
        return f"{ctx.state['word_count']} words ({ctx.state.get('unit', '?')})"

    return wf


async def test_migrations_upgrade_old_sessions_state_in_a_chain(stores: Stores) -> None:
    calls = Counter[str]()
    migrated = Counter[str]()
    old = _counter("1", calls, {"on": True})
    async with Runner(stores.open(), [old]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(old, ["a", "b", "c"])
    sid = failure.value.session_id
    assert (await stores.load(sid)).state == {"n": 3}

    new = _counter("3", calls, {"on": False})

    @new.migration(from_version="1", to_version="2")
    def rename(state: dict[str, object]) -> dict[str, object]:
        migrated["1->2"] += 1
        return {"word_count": state["n"]}

    @new.migration(from_version="2")
    def add_unit(state: dict[str, object]) -> dict[str, object]:
        migrated["2->3"] += 1
        return {**state, "unit": "words"}

    async with Runner(stores.open()) as runner:
        (found,) = await runner.check(new)
    assert "its state migrates from version 1" in found.detail

    async with Runner(stores.open(), [new]) as runner:
        assert await runner.resume(sid) == "3 words (words)"
        assert await runner.resume(sid) == "3 words (words)"

    session = await stores.load(sid)
    assert session.state == {"word_count": 3, "unit": "words"}
    assert session.workflow_version == "3"
    assert migrated == Counter({"1->2": 1, "2->3": 1})


async def test_a_failing_migration_raises_mismatch_and_changes_nothing(stores: Stores) -> None:
    calls = Counter[str]()
    old = _counter("1", calls, {"on": True})
    async with Runner(stores.open(), [old]) as runner:
        with pytest.raises(StepFailedError) as failure:
            await runner.run(old, ["a"])
    sid = failure.value.session_id
    before = await stores.load(sid)

    broken = _counter("2", calls, {"on": False})

    @broken.migration(from_version="1")
    def explode(state: dict[str, object]) -> dict[str, object]:
        raise KeyError("word_count")

    not_a_dict = _counter("2", calls, {"on": False})

    @not_a_dict.migration(from_version="1")
    def wrong(state: dict[str, object]) -> dict[str, object]:
        return None  # type: ignore[return-value]

    for wf, message in [(broken, "failed: KeyError"), (not_a_dict, "returned NoneType")]:
        async with Runner(stores.open(), [wf]) as runner:
            with pytest.raises(WorkflowMismatchError, match=f"version 1 to 2 {message}"):
                await runner.resume(sid)
    after = await stores.load(sid)
    assert (after.revision, after.state, after.workflow_version) == (before.revision, {"n": 1}, "1")
    assert calls["report"] == 1


def test_migrations_are_checked_when_declared() -> None:
    wf = Workflow("m", version="3")

    @wf.migration(from_version="1")
    def first(state: dict[str, object]) -> dict[str, object]:
        return state

    with pytest.raises(WorkflowDefinitionError, match="already has a migration from version 1"):
        wf.migration(from_version="1", to_version="2")
    with pytest.raises(WorkflowDefinitionError, match="to itself"):
        wf.migration(from_version="3")
    assert [m.to_version for m in wf.migration_path("1")] == ["3"]
    assert wf.migration_path("3") == []
    assert wf.migration_path("0") == []


# -- stepvault check ---------------------------------------------------------------------


FLOW = """
from engine import StepContext, Workflow

wf = Workflow("billing", version="{version}")


@wf.step
def {first}(ctx: StepContext, amount: int) -> int:
    return amount


@wf.step
def bill(ctx: StepContext, amount: int) -> str:
    raise ConnectionError("billing down")
"""


def _flow(tmp_path: Path, version: str, first: str) -> Path:
    path = tmp_path / f"billing_v{version}.py"
    path.write_text(textwrap.dedent(FLOW.format(version=version, first=first)))
    return path


def test_stepvault_check_exits_1_only_when_a_session_is_incompatible(tmp_path: Path) -> None:
    # Given a failed session of version 1
    store = tmp_path / "sessions"
    v1 = WorkflowFiles().select(_flow(tmp_path, "1", "take"), None)

    async def fail_once() -> str:
        async with Runner(FileStore(store), [v1]) as runner:
            with pytest.raises(StepFailedError) as failure:
                await runner.run(v1, 5)
        return failure.value.session_id

    sid = asyncio.run(fail_once())
    cli = CliRunner()

    # When version 2 keeps the completed step, and version 3 renames it
    same = cli.invoke(app, ["check", str(_flow(tmp_path, "2", "take")), "--store", str(store)])
    broken = cli.invoke(
        app, ["check", str(_flow(tmp_path, "3", "accept")), "--store", str(store), "--json"]
    )

    # Then version 2 passes, saying the failed step runs again, and version 3 does not
    assert same.exit_code == 0, same.output
    assert "will re-run" in same.stdout
    assert broken.exit_code == 1
    (found,) = json.loads(broken.stdout)
    assert (found["session_id"], found["verdict"], found["step"]) == (sid, "incompatible", "take")
    assert "1 of 1 session(s) of workflow 'billing' do not fit this code" in broken.stderr
    empty = cli.invoke(app, ["check", str(_flow(tmp_path, "1", "take")), "--store", str(tmp_path)])
    assert empty.exit_code == 0
    assert "no stored session" in empty.stderr
