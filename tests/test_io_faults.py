"""Disk faults at every I/O call of a checkpoint: reported, never half-applied, never lied about.

The real FileStore runs with its I/O routed through ``disk_model.record_io``, which
injects one fault at a chosen call: ``EIO`` at any call, ``ENOSPC`` at any call
that can allocate, a short write (half the bytes, then the rest goes through) and
a short write followed by ``ENOSPC`` at the next write. A failed fsync or
fdatasync follows Linux: the dirty pages are dropped, so the data is in the cache
but will never reach the disk, and a retried fsync "succeeds" without writing it.

For each fault, at each call of a commit taking a session from revision k to k + 1:

- the commit raises ``StorageError`` (not a raw ``OSError``, and not
  ``CorruptSessionError``: a disk fault is not damage), unless the fault is one
  the store can absorb: a short write it completes, or a failure while compacting
  after the checkpoint was already durable;
- the session then loads as revision k, from the same store and from a new one,
  if the fault hit before the record's fdatasync returned; at k or k + 1 after it;
- once the disk recovers, the same store goes on committing, and a power cut
  after that keeps every checkpoint a commit acknowledged. A store that retried a
  failed fsync and reported the record durable would lose it here.

Through a real Runner, a fault in a step's checkpoint fails ``wait`` with
``StorageError``, the step is not committed, and ``resume`` on the same runner
finishes the session once the disk is back, running no committed step again.

The store-level sweep runs in clear and encrypted.

Size: ``STEPVAULT_FAULT_STEPS`` checkpoints swept at the store level (default 4:
the first append, which creates the journal, plain appends and a compaction;
the long run uses 24).
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from checkpoints import applied, new_session, next_checkpoint
from disk_model import CRASH_MODELS, DiskModel, Fault, IoCall, IoRecorder, record_io, write_image
from reliability_report import report

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    EngineError,
    FileStore,
    Runner,
    Session,
    StepContext,
    StorageError,
    Workflow,
)

STEPS = int(os.environ.get("STEPVAULT_FAULT_STEPS", "4"))
KEY = os.urandom(32)  # a raw AES-256 key: no passphrase stretching on every open
POWER_CUTS = [name for name in CRASH_MODELS if name != "killed"]
ALLOCATING = frozenset(
    {"open", "pwrite", "write", "ftruncate", "fsync", "fdatasync", "replace", "rename", "mkdir"}
)


def kinds_for(call: IoCall) -> list[str]:
    """The faults worth injecting at ``call``: what that kind of call can really hit."""
    kinds = ["EIO"]
    if call.name in ALLOCATING:
        kinds.append("ENOSPC")
    if call.name in ("pwrite", "write"):
        kinds += ["short", "short+ENOSPC"]
    return kinds


@dataclass
class FaultPlan:
    """Inject fault ``kind`` at call number ``at`` counted from ``arm``; nothing once disarmed."""

    at: int
    kind: str
    base: int | None = None
    hits: list[IoCall] = field(default_factory=list)

    def arm(self, recorder: IoRecorder) -> None:
        self.base = len(recorder.calls)

    def disarm(self) -> None:
        self.base = None

    def __call__(self, call: IoCall) -> Fault | None:
        if self.base is None:
            return None
        number = call.index - self.base
        if number == self.at:
            self.hits.append(call)
            if self.kind.startswith("short"):
                return Fault(short=True)
            return Fault(errno.ENOSPC if self.kind == "ENOSPC" else errno.EIO)
        if (
            self.kind == "short+ENOSPC"
            and number > self.at
            and call.name in ("pwrite", "write")
            and len(self.hits) == 1
        ):
            self.hits.append(call)
            return Fault(errno.ENOSPC)
        return None


@dataclass
class Tally:
    """What the injected faults led to."""

    faults: int = 0
    raised: int = 0
    absorbed: int = 0
    at_k: int = 0
    at_k1: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.violations.append(message)


def assert_clean(tally: Tally) -> None:
    shown = "\n".join(tally.violations[:12])
    assert tally.violations == [], f"{len(tally.violations)} of {tally.faults} faults:\n{shown}"


def is_storage_fault(exc: BaseException) -> bool:
    """A disk fault must surface as StorageError, never as damage or a raw OSError."""
    return isinstance(exc, StorageError) and not isinstance(
        exc, (CorruptSessionError, DecryptionError)
    )


# -- synchronous folder handling (kept out of the event loop) ---------------------


def copy_folder(source: Path, target: Path) -> DiskModel:
    """Copy a store folder and model the copy as all on disk."""
    shutil.copytree(source, target)
    return DiskModel.of_folder(target)


def empty_folder(root: Path) -> DiskModel:
    root.mkdir(mode=0o700)
    return DiskModel.of_folder(root)


def write_power_cuts(model: DiskModel, work: Path, tag: str) -> dict[str, Path]:
    """Write the folder each power-cut model leaves now; return model name -> folder."""
    folders = {}
    for crash_model in POWER_CUTS:
        folder = work / f"{tag}-{crash_model}"
        write_image(model.image(crash_model), folder)
        folders[crash_model] = folder
    return folders


async def load_fresh(folder: Path, session_id: str, key: bytes | None = None) -> Session | None:
    """Load a session with a new store, as a restarted process would."""
    store = FileStore(folder, encryption_key=key)
    try:
        return await store.load(session_id)
    finally:
        await store.close()


async def survives_power_cuts(
    model: DiskModel, work: Path, tag: str, session_id: str, key: bytes | None = None
) -> dict[str, Session | str | None]:
    """Load the session from every power-cut image of ``model``; errors as their repr."""
    found: dict[str, Session | str | None] = {}
    for crash_model, folder in write_power_cuts(model, work, tag).items():
        try:
            found[crash_model] = await load_fresh(folder, session_id, key)
        except EngineError as exc:
            found[crash_model] = repr(exc)
    return found


# -- store level ------------------------------------------------------------------


@dataclass
class Template:
    """A folder holding a session at revision k, the checkpoint k + 1, and its I/O calls."""

    index: int
    compact_bytes: int
    key: bytes | None
    folder: Path
    before: Session
    checkpoint: Checkpoint
    calls: list[IoCall]

    @property
    def after(self) -> Session:
        return applied(self.before, self.checkpoint)

    @property
    def durable_at(self) -> int:
        """The number of the call that makes the record durable: the journal's fdatasync."""
        return next(
            number
            for number, call in enumerate(self.calls)
            if call.name in ("fsync", "fdatasync") and call.target.endswith("/journal")
        )

    def compacts(self) -> bool:
        return any(call.name == "replace" for call in self.calls)


@dataclass
class FaultedCommit:
    """One commit made under a fault plan, and the store and lease it used."""

    error: BaseException | None
    calls: list[IoCall]
    returned: DiskModel | None  # the disk as the commit returned, if it did
    store: FileStore
    lease: Any


async def commit_under_plan(
    template: Template, folder: Path, model: DiskModel, plan: FaultPlan
) -> FaultedCommit:
    """Take the lease on ``folder`` and commit the template's checkpoint, ``plan`` armed."""
    store = FileStore(folder, encryption_key=template.key, compact_bytes=template.compact_bytes)
    with record_io(model, plan) as recorder:
        lease = await store.acquire(template.before.id, "faults")
        assert lease is not None
        plan.arm(recorder)
        first = len(recorder.calls)
        error: BaseException | None = None
        try:
            await store.commit(lease, template.checkpoint)
        except Exception as exc:
            error = exc
        plan.disarm()
        returned = copy.deepcopy(recorder.model) if error is None else None
        return FaultedCommit(error, recorder.calls[first:], returned, store, lease)


async def build_templates(
    work: Path, steps: int, *, compact_bytes: int, key: bytes | None
) -> list[Template]:
    """Commit ``steps`` checkpoints, copying the folder and dry-running each commit first."""
    root = work / f"base-{compact_bytes}"
    store = FileStore(root, encryption_key=key, compact_bytes=compact_bytes)
    session = new_session()
    await store.create(session)
    templates = []
    for index in range(steps):
        checkpoint = next_checkpoint(session, index)
        folder = work / f"template-{compact_bytes}-{index}"
        copy_folder(root, folder)
        template = Template(index, compact_bytes, key, folder, session, checkpoint, [])
        scratch = work / f"dry-run-{compact_bytes}-{index}"
        dry = await commit_under_plan(
            template, scratch, copy_folder(folder, scratch), FaultPlan(-1, "none")
        )
        await dry.store.close()
        assert dry.error is None, dry.error
        template.calls = dry.calls
        templates.append(template)
        lease = await store.acquire(session.id, "faults")
        assert lease is not None
        await store.commit(lease, checkpoint)
        await store.release(lease)
        session = applied(session, checkpoint)
    await store.close()
    return templates


async def inject(template: Template, at: int, kind: str, work: Path, tally: Tally) -> None:
    """Fault call ``at`` of the template's commit with ``kind``; check everything after."""
    call = template.calls[at]
    where = f"checkpoint {template.index + 1}: {kind} at call {at} ({call.name} {call.target})"
    tag = f"case-{tally.faults}"
    tally.faults += 1
    folder = work / tag
    model = copy_folder(template.folder, folder)
    before, after = template.before, template.after
    plan = FaultPlan(at, kind)

    # When the commit hits the fault
    run = await commit_under_plan(template, folder, model, plan)
    if not plan.hits or plan.hits[0].name != call.name:
        tally.violations.append(f"{where}: the fault hit {plan.hits} (the calls changed)")
        await run.store.close()
        return
    before_durable = at <= template.durable_at
    if run.error is None:
        # Then only a completed short write, or a failed compaction after the record
        # was durable, may go unreported; and what was acknowledged is on disk
        tally.absorbed += 1
        tally.check(kind == "short" or not before_durable, f"{where}: the commit returned")
        assert run.returned is not None
        cut = await survives_power_cuts(run.returned, work, f"{tag}-acked", before.id, template.key)
        tally.check(
            all(found == after for found in cut.values()),
            f"{where}: acknowledged, then a power cut lost it: {cut}",
        )
    else:
        # Then it is reported as a storage fault
        tally.raised += 1
        tally.check(is_storage_fault(run.error), f"{where}: raised {run.error!r}")
        tally.check(kind != "short", f"{where}: a short write was not completed")

    # Then the same store and a restarted one see the same revision: k before the
    # record's fdatasync returned, k or k + 1 after it
    try:
        same = await run.store.load(before.id)
        fresh = await load_fresh(folder, before.id, template.key)
    except EngineError as exc:
        tally.violations.append(f"{where}: loading afterwards raised {exc!r}")
        await run.store.close()
        return
    tally.check(same == fresh, f"{where}: the store that saw the fault has a stale view")
    if fresh == after:
        tally.at_k1 += 1
        tally.check(
            run.error is None or not before_durable,
            f"{where}: reported as failed, yet revision k + 1 loads",
        )
    elif fresh == before:
        tally.at_k += 1
        tally.check(run.error is not None, f"{where}: acknowledged, yet revision k loads")
    else:
        tally.violations.append(f"{where}: loads neither k nor k + 1")
        await run.store.close()
        return

    # When the disk recovers, the same store (same lease) goes on committing
    expected = fresh
    try:
        with record_io(model):
            if fresh == before:
                await run.store.commit(run.lease, template.checkpoint)
                expected = after
            following = next_checkpoint(expected, 500)
            await run.store.commit(run.lease, following)
            expected = applied(expected, following)
            await run.store.close()
    except EngineError as exc:
        tally.violations.append(f"{where}: after the disk recovered, commit raised {exc!r}")
        await run.store.close()
        return

    # Then a power cut keeps every acknowledged checkpoint
    cut = await survives_power_cuts(model, work, f"{tag}-recovered", before.id, template.key)
    tally.check(
        all(found == expected for found in cut.values()),
        f"{where}: recovered to revision {expected.revision}, then a power cut left "
        f"{ {name: getattr(found, 'revision', found) for name, found in cut.items()} }",
    )


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
async def test_a_fault_at_any_io_call_of_a_checkpoint_is_reported_and_loses_nothing(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given a session before each of several checkpoints, and the calls each makes:
    # appends to a journal that never compacts (the first one creates the journal),
    # and the checkpoints of a store compacting often that do compact
    key = KEY if encrypted else None
    appends = await build_templates(tmp_path, STEPS, compact_bytes=1 << 30, key=key)
    compacting = await build_templates(tmp_path, STEPS, compact_bytes=1, key=key)
    templates = appends + [template for template in compacting if template.compacts()]
    assert not any(template.compacts() for template in appends)
    assert len(templates) > len(appends), "no checkpoint compacts"

    # When each call of each commit fails, in each way that call can fail
    tally = Tally()
    for template in templates:
        for at, call in enumerate(template.calls):
            for kind in kinds_for(call):
                await inject(template, at, kind, tmp_path, tally)

    # Then every fault was reported or harmlessly absorbed, and nothing was lost
    calls = sum(len(template.calls) for template in templates)
    report(
        f"I/O faults: store{', encrypted' if encrypted else ''}",
        size=f"{len(templates)} checkpoints, {calls} I/O calls",
        cases=tally.faults,
        found=tally.raised,
        survived=tally.faults - len(tally.violations),
        lost=len(tally.violations),
        absorbed=tally.absorbed,
        recovered_k=tally.at_k,
        recovered_k1=tally.at_k1,
    )
    assert_clean(tally)
    assert tally.raised > 0
    assert tally.at_k > 0


# -- through a runner -------------------------------------------------------------

EXPECTED_OUTPUT = ((1 + 1) * 10) + 3


@dataclass
class StepLog:
    """Which steps ran, and where the I/O calls of step two's checkpoint start and end."""

    runs: list[str] = field(default_factory=list)
    first: int | None = None
    last: int | None = None


def three_steps(log: StepLog, plan: FaultPlan, recorder: IoRecorder) -> Workflow:
    """A workflow whose second step arms ``plan`` for its own checkpoint."""
    workflow = Workflow("disk-faults", version="1")

    @workflow.step
    def one(ctx: StepContext, value: int) -> int:
        log.runs.append("one")
        return value + 1

    @workflow.step
    async def two(ctx: StepContext, value: int) -> int:
        log.runs.append("two")
        ctx.state["two"] = value
        if log.first is None:  # the first run: the runner's next I/O is its checkpoint
            plan.arm(recorder)
            log.first = len(recorder.calls)
        return value * 10

    @workflow.step
    def three(ctx: StepContext, value: int) -> int:
        log.runs.append("three")
        if log.last is None:
            log.last = len(recorder.calls)
        return value + 3

    return workflow


@dataclass
class RunnerCase:
    """What one run under a fault plan did, and the calls of step two's checkpoint."""

    session_id: str
    error: BaseException | None
    after_fault: Session | None
    resumed: Any
    runs: list[str]
    calls: list[IoCall]


async def run_with_fault(folder: Path, model: DiskModel, plan: FaultPlan) -> RunnerCase:
    """Run the workflow with ``plan``; then, the disk recovered, resume on the same runner."""
    log = StepLog()
    with record_io(model, plan) as recorder:
        workflow = three_steps(log, plan, recorder)
        async with Runner(FileStore(folder), [workflow], cleanup_interval=None) as runner:
            session_id = await runner.start(workflow, 1)
            error: BaseException | None = None
            try:
                await runner.wait(session_id)
            except Exception as exc:
                error = exc
            plan.disarm()  # the disk recovers
            after_fault = await load_fresh(folder, session_id)
            resumed = await runner.resume(session_id)
    calls = recorder.calls[log.first : log.last] if log.first is not None else []
    return RunnerCase(session_id, error, after_fault, resumed, log.runs, calls)


def check_runner_case(case: RunnerCase, durable_at: int, at: int, kind: str, tally: Tally) -> str:
    """Check what the run reported and ran; return a description of the case."""
    call = case.calls[at] if at < len(case.calls) else None
    where = f"step two's checkpoint: {kind} at call {at} ({call})"
    if case.error is None:
        tally.absorbed += 1
        tally.check(kind == "short" or at > durable_at, f"{where}: the run did not fail")
    else:
        tally.raised += 1
        tally.check(is_storage_fault(case.error), f"{where}: the run raised {case.error!r}")
    committed = case.after_fault is not None and "two" in case.after_fault.steps_done
    if case.error is not None and at <= durable_at:
        tally.check(not committed, f"{where}: reported failed, yet step two is committed")
    if committed:
        tally.at_k1 += 1
    else:
        tally.at_k += 1
    tally.check(case.resumed == EXPECTED_OUTPUT, f"{where}: resumed to {case.resumed!r}")
    runs = {name: case.runs.count(name) for name in ("one", "two", "three")}
    expected_runs = {"one": 1, "two": 1 if committed else 2, "three": 1}
    tally.check(runs == expected_runs, f"{where}: steps ran {runs}, not {expected_runs}")
    return where


async def test_a_fault_in_a_step_checkpoint_fails_the_run_and_the_runner_resumes_later(
    tmp_path: Path,
) -> None:
    # Given the calls step two's checkpoint makes when the disk is healthy
    dry = await run_with_fault(tmp_path / "dry", empty_folder(tmp_path / "dry"), FaultPlan(-1, ""))
    assert dry.error is None
    assert dry.resumed == EXPECTED_OUTPUT
    durable_at = next(
        number
        for number, call in enumerate(dry.calls)
        if call.name == "fdatasync" and call.target.endswith("/journal")
    )

    # When each of those calls fails, in each way it can, and the disk then recovers
    tally = Tally()
    for at, call in enumerate(dry.calls):
        for kind in kinds_for(call):
            tally.faults += 1
            folder = tmp_path / f"case-{tally.faults}"
            model = empty_folder(folder)
            plan = FaultPlan(at, kind)
            case = await run_with_fault(folder, model, plan)
            if not plan.hits or plan.hits[0].name != call.name:
                tally.violations.append(f"{kind} at call {at} ({call}) hit {plan.hits}")
                continue
            where = check_runner_case(case, durable_at, at, kind, tally)

            # Then the resumed session is whole, each step committed once, and a
            # power cut afterwards keeps all of it
            cut = await survives_power_cuts(model, tmp_path, f"cut-{tally.faults}", case.session_id)
            for crash_model, found in cut.items():
                ok = (
                    isinstance(found, Session)
                    and found.status == "completed"
                    and found.steps_done == ["one", "two", "three"]
                    and [(r.name, r.attempt, r.error) for r in found.tool_history]
                    == [("one", 1, None), ("two", 1, None), ("three", 1, None)]
                )
                tally.check(ok, f"{where}: after a {crash_model} power cut: {found!r}")

    report(
        "I/O faults: runner",
        size=f"{len(dry.calls)} I/O calls of a step's checkpoint",
        cases=tally.faults,
        found=tally.raised,
        survived=tally.faults - len(tally.violations),
        lost=len(tally.violations),
        absorbed=tally.absorbed,
        not_committed=tally.at_k,
        committed=tally.at_k1,
    )
    assert_clean(tally)
    assert tally.raised > 0
    assert tally.at_k > 0


@dataclass
class FailNextSync:
    """Fail the first fsync or fdatasync once armed: a disk that cannot make data durable."""

    armed: bool = False
    hits: list[IoCall] = field(default_factory=list)

    def __call__(self, call: IoCall) -> Fault | None:
        if self.armed and not self.hits and call.name in ("fsync", "fdatasync"):
            self.hits.append(call)
            return Fault(errno.EIO)
        return None


async def test_a_failed_attempt_that_cannot_be_recorded_is_not_retried_blind(
    tmp_path: Path,
) -> None:
    # Given a step that fails its first attempt and may retry, on a disk whose next
    # fdatasync (the one recording that failed attempt) fails
    workflow = Workflow("unrecordable-failure", version="1")
    attempts: list[int] = []
    plan = FailNextSync()

    @workflow.step(retries=3, backoff=0.01)
    def flaky(ctx: StepContext, value: int) -> int:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            plan.armed = True
            raise RuntimeError("the first attempt fails")
        return value + 1

    with record_io(empty_folder(tmp_path / "store"), plan):
        async with Runner(
            FileStore(tmp_path / "store"), [workflow], cleanup_interval=None
        ) as runner:
            session_id = await runner.start(workflow, 41)

            # When recording the failed attempt fails
            with pytest.raises(StorageError, match="injected at fdatasync"):
                await runner.wait(session_id)

            # Then the step is not retried on a disk that cannot record its attempts
            assert attempts == [1]
            assert [call.target.rsplit("/", 1)[-1] for call in plan.hits] == ["journal"]

            # And once the disk recovers, resume runs it again and finishes
            plan.armed = False
            assert await runner.resume(session_id) == 42
    assert len(attempts) == 2
    stored = await load_fresh(tmp_path / "store", session_id)
    assert stored is not None
    assert [(r.name, r.error) for r in stored.tool_history] == [("flaky", None)]
