"""Power cuts at every I/O call of a create, a checkpoint, a compaction and a save.

``kill -9`` cannot lose what the page cache holds; a power cut can. These tests run
the real FileStore (real files, real fsync) with its I/O routed through
``disk_model.record_io``, which keeps a model of what has reached the disk. After
every call that changes the disk, the folder a crash at that moment could leave is
rebuilt under each crash model (unsynced writes lost, appends zero-filled or half
written, names on disk before data, or a plain ``kill -9``) and loaded by a new
store. For an operation taking session revision k to k + 1, every crash image must:

- load as exactly revision k or revision k + 1 (for a create: absent or created),
  never as anything else and never as an error;
- load as k + 1 once the operation has returned: what was acknowledged survives;
- load as k + 1 at every later point once it has at an earlier one: nothing that
  reached the disk is taken back;
- go on: a new store commits the next checkpoint on it, and a second power cut
  right after that commit returned keeps that checkpoint too (a recovering store
  must not build on names or bytes that never reached the disk).

Each runs in clear and encrypted (the data key file is then part of every create).

Size: ``STEPVAULT_POWERLOSS_STEPS`` checkpoints per scenario (default 12; the long
run in benchmarks/torture.py uses 60).
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from checkpoints import applied, new_session, next_checkpoint
from disk_model import CRASH_MODELS, DiskModel, IoRecorder, record_io, write_image
from reliability_report import report

from engine import EngineError, FileStore, Session
from engine.models import UNFINISHED
from engine.stores.base import Durability

STEPS = int(os.environ.get("STEPVAULT_POWERLOSS_STEPS", "12"))
POWER_CUTS = [name for name in CRASH_MODELS if name != "killed"]
KEY = os.urandom(32)  # a raw AES-256 key (a passphrase would be stretched on every open)
ENCRYPTED = pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])


def empty_folder(root: Path) -> DiskModel:
    """Create ``root`` and model it (synchronous: kept out of the event loop)."""
    root.mkdir(mode=0o700)
    return DiskModel.of_folder(root)


@dataclass
class Operation:
    """One store call recorded in a scenario: the crash points it spans and its two ends."""

    label: str
    first: int  # the crash point before its first call
    last: int  # the crash point after its last call: it has returned
    before: Session | None
    after: Session

    def calls(self, recorder: IoRecorder) -> list[str]:
        return [point.call for point in recorder.points[self.first + 1 : self.last + 1]]


@dataclass
class Scenario:
    """A store whose every I/O call is recorded, and the operations made on it."""

    root: Path
    recorder: IoRecorder
    store: FileStore
    operations: list[Operation] = field(default_factory=list)

    async def do(
        self, label: str, before: Session | None, after: Session, call: Awaitable[Any]
    ) -> None:
        first = self.recorder.mark()
        await call
        self.operations.append(Operation(label, first, self.recorder.mark(), before, after))


async def record_scenario(
    root: Path,
    steps: int,
    *,
    key: bytes | None,
    compact_bytes: int,
    save: bool = False,
    durability: Durability = "fsync",
) -> Scenario:
    """Create a session, commit ``steps`` checkpoints, optionally save it; record it all."""
    model = empty_folder(root)
    with record_io(model) as recorder:
        store = FileStore(
            root, encryption_key=key, compact_bytes=compact_bytes, durability=durability
        )
        scenario = Scenario(root, recorder, store)
        session = new_session()
        await scenario.do("create", None, session.model_copy(deep=True), store.create(session))
        lease = await store.acquire(session.id, "recorder")
        assert lease is not None
        for index in range(steps):
            checkpoint = next_checkpoint(session, index)
            after = applied(session, checkpoint)
            await scenario.do(
                f"checkpoint {index + 1}", session, after, store.commit(lease, checkpoint)
            )
            session = after
        await store.release(lease)
        if save:
            saved = session.model_copy(deep=True)
            saved.state = {"replaced": True}
            saved.metadata.tags = ["saved"]
            # save() bumps saved.revision once the new revision is on disk
            await scenario.do("save", session, saved, store.save(saved))
        await store.close()
    model.check_matches()  # the model saw every change the store made
    return scenario


@dataclass
class Outcome:
    """What the crash images of a suite recovered to, with the key its stores use."""

    key: bytes | None
    images: int = 0
    at_k: int = 0
    at_k1: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.violations.append(message)


async def load_folder(
    folder: Path, session_id: str, key: bytes | None
) -> tuple[Session | None, list[str]]:
    """Load ``session_id`` from ``folder`` with a new store; also return listing problems."""
    store = FileStore(folder, encryption_key=key)
    try:
        rows = await store.list()
        problems = [f"{row.id}: {row.problem}" for row in rows if row.problem is not None]
        problems += [f"stray session {row.id}" for row in rows if row.id != session_id]
        return await store.load(session_id), problems
    finally:
        await store.close()


async def recover_and_commit(
    folder: Path, loaded: Session | None, model: DiskModel, template: Session, key: bytes | None
) -> tuple[Session, DiskModel]:
    """Carry on from a crash image like a restarted runner; return what it acknowledged.

    On a session: commit the next checkpoint. Without one (a create that did not
    survive): create it again.
    """
    store = FileStore(folder, encryption_key=key)
    with record_io(model) as recorder:
        if loaded is None:
            expected = template.model_copy(deep=True)
            await store.create(expected)
        else:
            lease = await store.acquire(loaded.id, "recovery")
            assert lease is not None
            checkpoint = next_checkpoint(loaded, 1000)
            await store.commit(lease, checkpoint)
            expected = applied(loaded, checkpoint)
        await store.close()
    return expected, recorder.model


counter = itertools.count()


async def check_crash_images(
    scenario: Scenario, operations: list[Operation], work: Path, outcome: Outcome
) -> None:
    """Rebuild and load every crash image of every call of ``operations``; see the docstring."""
    points = scenario.recorder.points
    for op in operations:
        reached = dict.fromkeys(CRASH_MODELS, False)
        for index in range(op.first, op.last + 1):
            for crash_model in CRASH_MODELS:
                where = (
                    f"{op.label}: crash after call {index - op.first} of "
                    f"{op.last - op.first} ({points[index].call}), {crash_model} model"
                )
                await check_one_image(
                    op, index, crash_model, points[index].model, work, outcome, reached, where
                )


async def check_one_image(
    op: Operation,
    index: int,
    crash_model: str,
    model: DiskModel,
    work: Path,
    outcome: Outcome,
    reached: dict[str, bool],
    where: str,
) -> None:
    image = model.image(crash_model)
    folder = work / f"image-{next(counter)}"
    write_image(image, folder)
    outcome.images += 1
    try:
        try:
            loaded, problems = await load_folder(folder, op.after.id, outcome.key)
        except EngineError as exc:
            outcome.violations.append(f"{where}: load raised {exc!r}")
            return
        outcome.check(problems == [], f"{where}: listing problems {problems}")
        if loaded is not None and loaded.status in UNFINISHED:
            outcome.check(
                f".finished/{loaded.id}" not in image,
                f"{where}: the {loaded.status} session carries the finished mark "
                "(resume_all would skip it)",
            )
        if loaded is not None and loaded == op.after:
            outcome.at_k1 += 1
            reached[crash_model] = True
        elif loaded == op.before:
            outcome.at_k += 1
            outcome.check(index != op.last, f"{where}: the acknowledged operation was lost")
            outcome.check(not reached[crash_model], f"{where}: went back after reaching k + 1")
        else:
            revision = None if loaded is None else loaded.revision
            outcome.violations.append(f"{where}: loaded neither k nor k + 1 (revision {revision})")
            return

        # Then a restarted store carries on, and what it acknowledges survives a power cut
        base = (
            model.after_kill(folder)
            if crash_model == "killed"
            else DiskModel.of_image(folder, image)
        )
        expected, after_recovery = await recover_and_commit(
            folder, loaded, base, op.after, outcome.key
        )
        for second_cut in POWER_CUTS:
            again = work / f"image-{next(counter)}"
            write_image(after_recovery.image(second_cut), again)
            try:
                reloaded, _ = await load_folder(again, op.after.id, outcome.key)
            except EngineError as exc:
                reloaded = None
                outcome.violations.append(f"{where}, then {second_cut} cut: raised {exc!r}")
            finally:
                shutil.rmtree(again)
            outcome.check(
                reloaded == expected,
                f"{where}: recovered and committed revision {expected.revision}; a second "
                f"power cut ({second_cut}) then lost it (loaded "
                f"{None if reloaded is None else reloaded.revision})",
            )
    finally:
        shutil.rmtree(folder)


def assert_no_violations(outcome: Outcome) -> None:
    shown = "\n".join(outcome.violations[:12])
    assert outcome.violations == [], (
        f"{len(outcome.violations)} of {outcome.images} crash images went wrong:\n{shown}"
    )


async def sweep(
    tmp_path: Path,
    name: str,
    pick: Callable[[Scenario], list[Operation]],
    *,
    encrypted: bool,
    compact_bytes: int,
    save: bool = False,
    durability: Durability = "fsync",
) -> tuple[Outcome, list[Operation]]:
    key = KEY if encrypted else None
    scenario = await record_scenario(
        tmp_path / "recorded",
        STEPS,
        key=key,
        compact_bytes=compact_bytes,
        save=save,
        durability=durability,
    )
    operations = pick(scenario)
    outcome = Outcome(key)
    await check_crash_images(scenario, operations, tmp_path, outcome)
    crash_points = sum(op.last - op.first + 1 for op in operations)
    report(
        f"power loss: {name}{', encrypted' if encrypted else ''}",
        size=f"{name} x{len(operations)}: {crash_points} crash points x {len(CRASH_MODELS)} models",
        cases=outcome.images,
        found=None,
        survived=outcome.images - len(outcome.violations),
        lost=len(outcome.violations),
        recovered_k=outcome.at_k,
        recovered_k1=outcome.at_k1,
    )
    return outcome, operations


def compacted(scenario: Scenario, op: Operation) -> bool:
    """Tell whether ``op`` is a checkpoint that folded the journal into a new snapshot."""
    calls = op.calls(scenario.recorder)
    return op.label.startswith("checkpoint") and any(call.startswith("replace") for call in calls)


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_create_leaves_no_session_or_the_whole_one(
    tmp_path: Path, encrypted: bool
) -> None:
    outcome, operations = await sweep(
        tmp_path, "create", lambda s: s.operations[:1], encrypted=encrypted, compact_bytes=1 << 30
    )

    assert_no_violations(outcome)
    assert [op.label for op in operations] == ["create"]
    assert outcome.at_k > 0  # some crash points left nothing behind
    assert outcome.at_k1 > 0  # and the later ones the whole session


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_group_committed_create_leaves_none_or_the_whole_one(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given a create with group commit: built with no sync of its own, then a syncfs
    outcome, operations = await sweep(
        tmp_path,
        "group-committed create",
        lambda s: s.operations[:1],
        encrypted=encrypted,
        compact_bytes=1 << 30,
        durability="batch",
    )

    # Then every crash image holds no session or the whole one
    assert_no_violations(outcome)
    assert outcome.at_k > 0
    assert [op.label for op in operations] == ["create"]
    assert outcome.at_k1 > 0
    # And the shared syncfs is what made it durable
    probe = await record_scenario(
        tmp_path / "probe", 1, key=None, compact_bytes=1 << 30, durability="batch"
    )
    calls = probe.operations[0].calls(probe.recorder)
    renamed = next(i for i, call in enumerate(calls) if call.startswith("rename"))
    assert any(call.startswith("syncfs") for call in calls[:renamed]), calls
    assert any(call.startswith("syncfs") for call in calls[renamed:]), calls
    assert not any(call.startswith(("fsync", "fdatasync")) for call in calls), calls


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_checkpoint_recovers_k_or_k_plus_1(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given checkpoints that never compact (the journal only grows)
    outcome, operations = await sweep(
        tmp_path,
        "checkpoint",
        lambda s: [op for op in s.operations if op.label.startswith("checkpoint")],
        encrypted=encrypted,
        compact_bytes=1 << 30,
    )

    # Then every crash image of every call loads k or k + 1, and goes on
    assert_no_violations(outcome)
    assert len(operations) == STEPS
    assert outcome.at_k > 0
    assert outcome.at_k1 > 0


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_group_committed_checkpoint_recovers_k_or_k_plus_1(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given checkpoints made durable by group commit (the append, then a syncfs)
    outcome, operations = await sweep(
        tmp_path,
        "group-committed checkpoint",
        lambda s: [op for op in s.operations if op.label.startswith("checkpoint")],
        encrypted=encrypted,
        compact_bytes=1 << 30,
        durability="batch",
    )

    # Then every crash image of every call loads k or k + 1, and goes on
    assert_no_violations(outcome)
    assert len(operations) == STEPS
    assert outcome.at_k > 0
    assert outcome.at_k1 > 0

    # And what made each append durable was the shared syncfs, not a sync of its own
    # (the first commit under a lease too: the sync covers what it builds on)
    probe = await record_scenario(
        tmp_path / "probe", STEPS, key=None, compact_bytes=1 << 30, durability="batch"
    )
    for op in probe.operations[1:]:
        calls = op.calls(probe.recorder)
        assert calls[-1].startswith("syncfs"), calls
        assert not any(call.startswith("fdatasync") for call in calls), calls


async def test_a_power_cut_anywhere_as_a_session_finishes_and_resumes_never_hides_it(
    tmp_path: Path,
) -> None:
    # Given a session that fails (finished: marked), is resumed (unfinished again:
    # the mark must go first, durably), then completes (marked again)
    root = tmp_path / "recorded"
    model = empty_folder(root)
    with record_io(model) as recorder:
        store = FileStore(root, compact_bytes=1 << 30)
        scenario = Scenario(root, recorder, store)
        session = new_session()
        await scenario.do("create", None, session.model_copy(deep=True), store.create(session))
        lease = await store.acquire(session.id, "recorder")
        assert lease is not None
        for index, status in enumerate(["running", "failed", "running", "completed"]):
            checkpoint = next_checkpoint(session, index).model_copy(update={"status": status})
            after = applied(session, checkpoint)
            await scenario.do(
                f"checkpoint {status}", session, after, store.commit(lease, checkpoint)
            )
            session = after
            if status == "failed":
                # Time passes: the kernel writes everything back, the mark included
                recorder.model.sync_all(ok=True)
                recorder._changed("the kernel's write-back")
        await store.release(lease)
        await store.close()
    model.check_matches()
    assert (root / ".finished" / session.id).exists()  # completed: marked

    # When the power is cut after any call of those checkpoints
    outcome = Outcome(None)
    operations = scenario.operations[1:]
    await check_crash_images(scenario, operations, tmp_path, outcome)

    # Then no image has an unfinished session carrying the mark, and each loads k or k + 1
    assert_no_violations(outcome)
    assert outcome.at_k > 0
    assert outcome.at_k1 > 0


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_compaction_recovers_k_or_k_plus_1(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given a store that compacts as soon as the journal outgrows the snapshot
    def compactions(scenario: Scenario) -> list[Operation]:
        return [op for op in scenario.operations if compacted(scenario, op)]

    outcome, operations = await sweep(
        tmp_path, "compaction", compactions, encrypted=encrypted, compact_bytes=1
    )

    # Then the checkpoints that compacted recover like any other, at every call
    assert operations, "no checkpoint compacted: the scenario no longer tests compaction"
    assert_no_violations(outcome)
    assert outcome.at_k > 0
    assert outcome.at_k1 > 0


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_save_recovers_the_old_or_the_new_session(
    tmp_path: Path, encrypted: bool
) -> None:
    outcome, operations = await sweep(
        tmp_path,
        "save",
        lambda s: s.operations[-1:],
        encrypted=encrypted,
        compact_bytes=1 << 30,
        save=True,
    )

    assert [op.label for op in operations] == ["save"]
    assert_no_violations(outcome)
    assert outcome.at_k > 0
    assert outcome.at_k1 > 0
