"""FileStore: persistence, permissions, symlinks, locks across processes, compaction, damage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    EngineError,
    FileStore,
    Lease,
    MemoryStore,
    SerializationError,
    Session,
    SessionBusyError,
    SessionManager,
    SessionNotFoundError,
    StorageError,
    Store,
    ToolResult,
    codec,
)
from engine.models import Event, utcnow
from engine.stores import file_reads
from engine.stores.base import list_pages

MakeSession = Callable[..., Session]
MakeFileStore = Callable[..., FileStore]

# -- helpers (synchronous: plain file handling, kept out of the event loop) -------


def checkpoint_for(session: Session, **changes: Any) -> Checkpoint:
    now = utcnow()
    values: dict[str, Any] = {
        "revision": session.revision + 1,
        "status": "running",
        "last_activity": now,
        "expires_at": now + timedelta(hours=1),
    }
    values.update(changes)
    return Checkpoint(**values)


def step_checkpoint(session: Session, index: int, size: int = 8) -> Checkpoint:
    now = utcnow()
    return checkpoint_for(
        session,
        step=f"step-{index}",
        output={"index": index, "pad": "é" * size},
        state_set={f"k{index % 5}": index},
        state_unset=[f"k{(index + 1) % 5}"],
        tool_results=[
            ToolResult(
                name=f"step-{index}", output=index, started_at=now, finished_at=now, duration=0.0
            )
        ],
        attempts={f"step-{index}": 1},
    )


async def commit(store: Store, lease: Lease, session: Session, checkpoint: Checkpoint) -> None:
    await store.commit(lease, checkpoint)
    session.apply(checkpoint)


async def lease_for(store: Store, session_id: str, owner: str = "runner-a") -> Lease:
    lease = await store.acquire(session_id, owner)
    assert lease is not None
    return lease


async def session_with_steps(store: FileStore, session: Session, steps: int) -> Session:
    """Create ``session`` and commit ``steps`` checkpoints; return what it should load as."""
    await store.create(session)
    lease = await lease_for(store, session.id)
    for index in range(steps):
        await commit(store, lease, session, step_checkpoint(session, index))
    await store.release(lease)
    return session


def journal_of(root: Path, session_id: str) -> Path:
    return root / session_id / "journal"


def snapshot_of(root: Path, session_id: str) -> Path:
    return root / session_id / "snapshot"


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def an_event() -> Event:
    return Event(id=str(uuid.uuid4()), name="approval", sent_at=utcnow())


def frames(path: Path) -> list[codec.Frame]:
    return codec.scan_frames(path.read_bytes(), str(path)).frames


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def inode_of(path: Path) -> int:
    return path.stat().st_ino


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with a file's bytes (None for a folder or symlink)."""
    return {
        str(path.relative_to(folder)): (
            path.read_bytes() if path.is_file() and not path.is_symlink() else None
        )
        for path in sorted(folder.rglob("*"))
    }


def modes(folder: Path) -> dict[str, tuple[bool, int]]:
    """Path -> (is a folder, permission bits), for ``folder`` and everything under it."""
    found = {".": (True, stat.S_IMODE(folder.lstat().st_mode))}
    for path in folder.rglob("*"):
        info = path.lstat()
        name = str(path.relative_to(folder))
        found[name] = (stat.S_ISDIR(info.st_mode), stat.S_IMODE(info.st_mode))
    return found


# -- persistence ----------------------------------------------------------------


async def test_sessions_persist_across_store_instances(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a session with committed steps, written by one store that then closes
    first = make_file_store()
    session = await session_with_steps(first, make_session(state={"v": "ü"}), 3)
    await first.close()

    # When a new store opens the same folder
    second = make_file_store()

    # Then it sees the same session, and can continue it
    assert await second.load(session.id) == session
    lease = await lease_for(second, session.id)
    await commit(second, lease, session, step_checkpoint(session, 3))
    assert await make_file_store().load(session.id) == session


async def test_the_specs_persistence_test_through_session_manager(store_path: Path) -> None:
    # Given a manager that creates and updates a session, then shuts down
    manager = SessionManager(FileStore(store_path), cleanup_interval=None)
    created = await manager.create_session(
        {"user_id": "user123", "ai_provider": "google-ai", "permissions": ["read-data"]},
        ttl=7200,
        metadata={"user_agent": "cli/1.0", "tags": ["analysis"]},
    )
    created.state["testData"] = {"value": 42}
    await manager.update_session(created)
    await manager.close()

    # When a new manager opens the same folder (a restart)
    restarted = SessionManager(FileStore(store_path), cleanup_interval=None)
    try:
        again = await restarted.get_session(created.id)
    finally:
        await restarted.close()

    # Then the session is there, whole
    assert again == created
    assert again is not None
    assert again.state["testData"] == {"value": 42}
    assert again.context.user_id == "user123"
    assert again.metadata.tags == ["analysis"]


def test_an_unknown_durability_mode_is_refused_before_touching_disk(
    tmp_path: Path, store_path: Path
) -> None:
    with pytest.raises(EngineError, match="durability"):
        FileStore(store_path, durability="sometimes")  # type: ignore[arg-type]

    assert sorted(path.name for path in tmp_path.iterdir()) == []


# -- permissions and paths ------------------------------------------------------


async def test_files_are_0600_and_folders_0700_even_with_umask_zero(
    store_path: Path, make_session: MakeSession
) -> None:
    # Given a process umask that would make everything world-writable
    previous = os.umask(0)
    try:
        # When a store writes every kind of file it has
        store = FileStore(store_path, compact_bytes=1)
        kept = make_session()
        await store.create(kept)
        lease = await lease_for(store, kept.id)
        await commit(store, lease, kept, step_checkpoint(kept, 0, size=4000))  # compacts
        await commit(store, lease, kept, step_checkpoint(kept, 1))  # a fresh journal record
        await store.release(lease)
        await store.post_event(kept.id, an_event())  # the inbox and its lock
        loaded = await store.load(kept.id)
        assert loaded is not None
        loaded.inbox_seq = 1  # absorbs it: the save rewrites the inbox through inbox.tmp
        await store.save(loaded)
        doomed = make_session()
        await store.create(doomed)
        assert await store.delete(doomed.id)
        await store.close()
    finally:
        os.umask(previous)

    # Then folders are 0700 and files 0600
    found = modes(store_path)
    assert set(found) >= {
        ".",
        ".trash",
        kept.id,
        f"{kept.id}/snapshot",
        f"{kept.id}/journal",
        f"{kept.id}/lock",
        f"{kept.id}/inbox",
        f"{kept.id}/inbox.lock",
    }
    wrong = {
        name: oct(mode)
        for name, (is_dir, mode) in found.items()
        if mode != (0o700 if is_dir else 0o600)
    }
    assert wrong == {}


def plant_symlinked_session(root: Path, elsewhere: Path, session_id: str) -> None:
    """Move a real session folder out of the store and leave a symlink to it."""
    elsewhere.mkdir()
    shutil.move(root / session_id, elsewhere / session_id)
    (root / session_id).symlink_to(elsewhere / session_id, target_is_directory=True)


async def test_a_symlink_in_place_of_a_session_folder_is_refused(
    file_store: FileStore, store_path: Path, tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a session folder replaced by a symlink to a valid session elsewhere
    session = await session_with_steps(file_store, make_session(), 2)
    elsewhere = tmp_path / "elsewhere"
    plant_symlinked_session(store_path, elsewhere, session.id)
    before = tree(elsewhere)

    # When it is read, leased, saved, created over or deleted, it is refused
    with pytest.raises(StorageError, match="symlink"):
        await file_store.load(session.id)
    with pytest.raises(StorageError):
        await file_store.acquire(session.id, "runner-a")
    with pytest.raises(StorageError):
        await file_store.save(session)
    with pytest.raises(StorageError):
        await file_store.create(session)
    with pytest.raises(StorageError):
        await file_store.delete(session.id)

    # Then the listing reports it instead of failing, and the target is untouched
    rows = await file_store.list()
    assert [(row.id, row.problem is not None) for row in rows] == [(session.id, True)]
    assert tree(elsewhere) == before
    assert (store_path / session.id).is_symlink()


@pytest.mark.parametrize("name", ["snapshot", "journal"])
async def test_a_symlink_in_place_of_a_session_file_is_refused(
    file_store: FileStore, store_path: Path, tmp_path: Path, make_session: MakeSession, name: str
) -> None:
    # Given a session's snapshot (or journal) replaced by a symlink to a copy of itself
    session = await session_with_steps(file_store, make_session(), 2)
    real = store_path / session.id / name
    decoy = tmp_path / f"decoy-{name}"
    shutil.copyfile(real, decoy)
    real.unlink()
    real.symlink_to(decoy)
    before = read(decoy)

    # When it is read or written through, it is refused
    with pytest.raises(StorageError):
        await file_store.load(session.id)
    lease = await lease_for(file_store, session.id)
    with pytest.raises(StorageError):
        await file_store.commit(lease, step_checkpoint(session, 2))
    await file_store.release(lease)

    # Then the decoy is unchanged
    assert read(decoy) == before


async def test_leftovers_of_interrupted_creates_and_deletes_are_not_listed(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    session = make_session()
    await file_store.create(session)
    stray = make_session()
    (store_path / f".creating-{stray.id}-0123").mkdir(mode=0o700)
    (store_path / ".trash" / f"{stray.id}.0123").mkdir(mode=0o700, parents=True)
    (store_path / "notes.txt").write_text("not a session")

    rows = await file_store.list()

    assert [row.id for row in rows] == [session.id]
    assert await file_store.load(stray.id) is None


async def test_a_page_skips_sessions_deleted_while_it_is_read_and_stays_full(
    file_store: FileStore, make_session: MakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given six sessions, the first two of which another process deletes just as a
    # listing reads them
    sessions = sorted((make_session() for _ in range(6)), key=lambda s: s.id)
    for session in sessions:
        await file_store.create(session)
    doomed = {sessions[0].id, sessions[1].id}
    real_read = file_reads.read_session

    def read_after_a_delete(store: FileStore, session_id: str, *args: Any) -> Any:
        if session_id in doomed:
            doomed.discard(session_id)
            store._delete_sync(session_id)
        return real_read(store, session_id, *args)

    monkeypatch.setattr(file_reads, "read_session", read_after_a_delete)

    # When the first page of two is read, Then it is full, and the walk finds the rest
    page = await file_store.list_page(None, 2)
    assert [row.id for row in page] == [sessions[2].id, sessions[3].id]
    walked = [row.id async for rows in list_pages(file_store, limit=2) for row in rows]
    assert walked == [s.id for s in sessions[2:]]


async def test_a_walk_for_resume_visits_each_session_once_as_others_come_and_go(
    file_store: FileStore, make_session: MakeSession
) -> None:
    # Given seven unfinished sessions and a walk in pages of two (the folder listed
    # once, by its first page)
    sessions = sorted((make_session(status="running") for _ in range(7)), key=lambda s: s.id)
    for session in sessions:
        await file_store.create(session)
    walked: list[str] = []
    late = make_session(status="running")

    # When, mid-walk, a session is deleted and another created
    async for page in list_pages(file_store, limit=2, unfinished=True):
        walked.extend(row.id for row in page)
        if len(walked) == 2:
            assert await file_store.delete(sessions[-1].id)
            await file_store.create(late)

    # Then every session that was there and stayed is visited once, in order
    assert walked == [s.id for s in sessions[:-1]]
    # And the next walk lists the folder again: the new session is in it
    again = [row.id async for rows in list_pages(file_store, 2, unfinished=True) for row in rows]
    assert again == sorted([late.id, *walked])


async def test_a_page_asked_for_long_after_the_last_one_lists_the_folder_again(
    file_store: FileStore, make_session: MakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a walk's first page (a cursor kept by a caller who pages slowly)
    first = sorted((make_session(status="running") for _ in range(3)), key=lambda s: s.id)
    for session in first:
        await file_store.create(session)
    page = await file_store.list_unfinished_page(None, 2)
    assert [row.id for row in page] == [s.id for s in first[:2]]

    # When a session is created, and the next page is asked for a minute later
    last = make_session(id="ffffffff-ffff-4fff-bfff-ffffffffffff", status="running")
    await file_store.create(last)
    later = time.monotonic() + file_reads.WALK_REUSE
    monkeypatch.setattr(file_reads.time, "monotonic", lambda: later)
    rest = await file_store.list_unfinished_page(page[-1].id, 10)

    # Then that page comes from a fresh listing: the new session is in it
    assert [row.id for row in rest] == [first[2].id, last.id]


# -- locks between instances and processes --------------------------------------


async def test_a_lock_held_by_one_instance_excludes_another(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given two stores on one folder, the first holding a session's lock
    first, second = make_file_store(), make_file_store()
    session = make_session()
    await first.create(session)
    held = await lease_for(first, session.id, "runner-a")

    # When the second tries to take it, or to save over it
    assert await second.acquire(session.id, "runner-b") is None
    changed = session.model_copy(deep=True)
    changed.state["x"] = 1
    with pytest.raises(SessionBusyError):
        await second.save(changed)
    assert await second.load(session.id) == session

    # Then once released, the second takes it and commits
    await first.release(held)
    lease = await lease_for(second, session.id, "runner-b")
    await commit(second, lease, session, step_checkpoint(session, 0))
    assert await first.load(session.id) == session

    # And the first, without the lock, cannot commit with its old lease
    with pytest.raises(Exception, match="lease"):
        await first.commit(held, step_checkpoint(session, 1))


async def _held_elsewhere(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> tuple[FileStore, FileStore, Session, Lease]:
    """A session held by one store (a runner's), and another store on the same folder."""
    holder, other = make_file_store(), make_file_store()
    session = make_session()
    await holder.create(session)
    return holder, other, session, await lease_for(holder, session.id)


async def test_a_session_deleted_by_another_store_takes_no_more_commits_from_its_holder(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a runner's store holding a session it has committed to (its journal open)
    holder, other, session, lease = await _held_elsewhere(make_file_store, make_session)
    await commit(holder, lease, session, step_checkpoint(session, 0))

    # When another process's store deletes it
    assert await other.delete(session.id)

    # Then the holder's next commit fails instead of writing into the removed files
    with pytest.raises(SessionNotFoundError):
        await holder.commit(lease, step_checkpoint(session, 1))
    assert await other.load(session.id) is None
    assert not [p for p in other.path.iterdir() if p.name == session.id]


async def test_a_session_deleted_and_made_again_elsewhere_takes_no_commit_from_the_old_holder(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a runner's store holding a session it has committed to (its journal open)
    holder, other, session, lease = await _held_elsewhere(make_file_store, make_session)
    await commit(holder, lease, session, step_checkpoint(session, 0))

    # When another process's store deletes it, creates a session with the same id,
    # and commits to that one (a journal again at the same path, of the same size)
    assert await other.delete(session.id)
    again = make_session(id=session.id)
    await other.create(again)
    other_lease = await lease_for(other, again.id)
    await commit(other, other_lease, again, step_checkpoint(again, 0))
    await other.release(other_lease)

    # Then the old holder's next commit fails instead of landing in the removed journal
    with pytest.raises(SessionNotFoundError):
        await holder.commit(lease, step_checkpoint(session, 1))
    loaded = await other.load(session.id)
    assert loaded is not None
    assert loaded.revision == again.revision


async def test_a_session_made_again_between_the_lease_and_the_first_commit_takes_none_of_it(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a runner's store that took a session's lease and loaded it, not committed yet
    holder, other, session, lease = await _held_elsewhere(make_file_store, make_session)
    assert await holder.load(session.id) == session

    # When another process's store deletes it and creates a session with the same id
    assert await other.delete(session.id)
    again = make_session(id=session.id, state={"owner": "the other"})
    await other.create(again)

    # Then the holder's first commit fails, and the new session is left as it was made
    with pytest.raises(SessionNotFoundError):
        await holder.commit(lease, step_checkpoint(session, 0))
    assert await other.load(session.id) == again


async def test_closing_a_store_releases_its_locks(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    first, second = make_file_store(), make_file_store()
    session = make_session()
    await first.create(session)
    await lease_for(first, session.id)
    assert await second.acquire(session.id, "runner-b") is None

    await first.close()

    assert await second.acquire(session.id, "runner-b") is not None


@pytest.mark.parametrize("owner", ["runner-a", "x" * 100, "stepvault sessions rm"])
async def test_takeovers_count_only_holders_that_died_whatever_the_owner_name(
    file_store: FileStore, store_path: Path, make_session: MakeSession, owner: str
) -> None:
    session = make_session()
    await file_store.create(session)

    # A clean release, by an owner with a long name or with spaces: no takeover
    for _ in range(3):
        lease = await lease_for(file_store, session.id, owner)
        assert lease.takeovers == 0
        await file_store.release(lease)

    # A holder that died holding it (its name left in the lock file, in the
    # format an older stepvault wrote): one more takeover than it recorded
    (store_path / session.id / "lock").write_bytes(f"{owner} 2\n".encode())
    lease = await lease_for(file_store, session.id, owner)
    assert lease.takeovers == 3
    await file_store.release(lease)
    assert (await lease_for(file_store, session.id, owner)).takeovers == 0


HOLD_LOCK = """
import asyncio, sys, time
from engine import FileStore

async def main():
    store = FileStore(sys.argv[1])
    lease = await store.acquire(sys.argv[2], "child")
    print("locked" if lease else "busy", flush=True)
    time.sleep(300)  # hold the lock until killed

asyncio.run(main())
"""


async def test_a_lock_held_by_a_killed_process_is_released_by_the_kernel(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a child process holding the session's lock
    session = make_session()
    await file_store.create(session)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LOCK, str(store_path), session.id, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        assert line.strip() == b"locked"
        assert await file_store.acquire(session.id, "parent") is None

        # When it is killed with SIGKILL (no cleanup of its own runs)
        child.kill()
        await asyncio.wait_for(child.wait(), timeout=30)

        # Then the lock is free at once
        lease = await file_store.acquire(session.id, "parent")
        assert lease is not None
        await commit(file_store, lease, session, step_checkpoint(session, 0))
        assert await file_store.load(session.id) == session
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


# -- compaction -----------------------------------------------------------------


async def replay_in_memory(session: Session, checkpoints: list[Checkpoint]) -> Session:
    """What MemoryStore makes of the same checkpoints: the reference result."""
    memory = MemoryStore()
    await memory.create(session)
    lease = await lease_for(memory, session.id)
    for checkpoint in checkpoints:
        await memory.commit(lease, checkpoint)
    loaded = await memory.load(session.id)
    assert loaded is not None
    return loaded


async def test_compaction_keeps_the_journal_small_and_loses_nothing(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a store that compacts as soon as the journal outgrows the snapshot
    store = make_file_store(compact_bytes=1)
    initial = make_session(state={"seed": True})
    await store.create(initial)
    session = initial.model_copy(deep=True)
    lease = await lease_for(store, session.id)
    journal, snapshot = journal_of(store_path, session.id), snapshot_of(store_path, session.id)

    # When 60 checkpoints of growing size are committed
    checkpoints: list[Checkpoint] = []
    rewrites = journal_shrank = 0
    for index in range(60):
        before, old_snapshot = size_of(journal), inode_of(snapshot)
        checkpoint = step_checkpoint(session, index, size=index * 40)
        await commit(store, lease, session, checkpoint)
        checkpoints.append(checkpoint)
        rewrites += inode_of(snapshot) != old_snapshot  # renamed over: a new file
        journal_shrank += size_of(journal) < before
        # Then the journal never outgrows the snapshot (loading stays bounded)
        assert size_of(journal) <= size_of(snapshot)

    # Then snapshots were rewritten many times, the journal was cut back each time,
    # and a fresh store loads exactly what a MemoryStore replay of the same
    # checkpoints holds
    assert rewrites > 5
    assert journal_shrank > 5
    assert await make_file_store().load(session.id) == await replay_in_memory(initial, checkpoints)


async def test_a_crash_between_snapshot_rename_and_journal_truncation_loads_correctly(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a store that compacts often
    store = make_file_store(compact_bytes=1)
    initial = make_session()
    await store.create(initial)
    session = initial.model_copy(deep=True)
    lease = await lease_for(store, session.id)
    journal, snapshot = journal_of(store_path, session.id), snapshot_of(store_path, session.id)

    # When a commit compacts, and the journal is put back as it was just before the
    # truncation (its old records plus the one just committed): the crash's leftovers
    checkpoints: list[Checkpoint] = []
    for index in range(40):
        old_journal, old_snapshot = read(journal) if journal.exists() else b"", inode_of(snapshot)
        checkpoint = step_checkpoint(session, index, size=100)
        await commit(store, lease, session, checkpoint)
        checkpoints.append(checkpoint)
        if inode_of(snapshot) != old_snapshot:
            break
    else:
        pytest.fail("no compaction happened")
    record = codec.encode_frame(checkpoint.revision, checkpoint.model_dump_json().encode())
    write(journal, old_journal + record)
    await store.release(lease)

    # Then a restarted store loads the session with nothing applied twice
    restarted = make_file_store(compact_bytes=1)
    assert await restarted.load(session.id) == await replay_in_memory(initial, checkpoints)

    # And it keeps committing after the stale records, through further compactions
    lease = await lease_for(restarted, session.id)
    for index in range(len(checkpoints), len(checkpoints) + 10):
        checkpoint = step_checkpoint(session, index, size=100)
        await commit(restarted, lease, session, checkpoint)
        checkpoints.append(checkpoint)
    assert await make_file_store().load(session.id) == await replay_in_memory(initial, checkpoints)


async def test_readers_see_whole_checkpoints_while_another_instance_compacts(
    make_file_store: MakeFileStore, make_session: MakeSession
) -> None:
    # Given a writer that compacts every other commit (each checkpoint replaces the
    # state, so the snapshot stays small), and a separate, lock-less reader
    writer = make_file_store(compact_bytes=1, durability="none", inline_commits=False)
    reader = make_file_store()
    session = make_session(state={"n": -1})
    await writer.create(session)
    lease = await lease_for(writer, session.id)
    done = asyncio.Event()
    seen: list[int] = []

    async def read_until_done() -> None:
        while not done.is_set():
            loaded = await reader.load(session.id)
            assert loaded is not None
            assert loaded.state["n"] == loaded.revision - 1  # a whole checkpoint
            seen.append(loaded.revision)

    # When the writer commits while the reader keeps loading (both in worker threads),
    # at least 400 times and until the reader has read ten different revisions (how
    # many commits that takes depends on the machine)
    reading = asyncio.create_task(read_until_done())
    try:
        for index in range(20_000):
            checkpoint = checkpoint_for(session, state_set={"n": index, "pad": "x" * 2000})
            await commit(writer, lease, session, checkpoint)
            if index >= 400 and len(set(seen)) >= 10:
                break
    finally:
        done.set()
        await reading  # re-raises whatever the reader hit

    # Then every read was a whole checkpoint, and no read went back in time
    assert seen == sorted(seen)
    assert len(set(seen)) >= 10  # reads landed between many different commits


# -- damage -----------------------------------------------------------------------


async def test_a_flipped_byte_inside_an_earlier_journal_record_is_corruption(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a session with three journal records
    session = await session_with_steps(make_file_store(), make_session(), 3)
    journal = journal_of(store_path, session.id)
    second = frames(journal)[1]
    original = read(journal)

    # When a byte in the middle of the second record's body flips
    write(journal, flip(original, (second.offset + codec.HEADER_SIZE + second.end) // 2))

    # Then loading fails loudly, naming the file and the record's offset
    with pytest.raises(CorruptSessionError) as caught:
        await make_file_store().load(session.id)
    assert str(journal) in str(caught.value)
    assert f"offset {second.offset}" in str(caught.value)
    # And nothing was repaired behind our back
    assert read(journal) == flip(original, (second.offset + codec.HEADER_SIZE + second.end) // 2)


async def test_a_damaged_length_in_an_earlier_record_header_is_corruption(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    session = await session_with_steps(make_file_store(), make_session(), 3)
    journal = journal_of(store_path, session.id)
    first = frames(journal)[0]
    original = read(journal)

    # The length field (bytes 4..7 of the header) claims far more than is there
    damaged = original[:4] + (1 << 30).to_bytes(4, "little") + original[8:]
    write(journal, damaged)

    with pytest.raises(CorruptSessionError, match=f"offset {first.offset}"):
        await make_file_store().load(session.id)
    # And a commit does not "repair" it by cutting the acknowledged records away
    store = make_file_store()
    lease = await lease_for(store, session.id)
    with pytest.raises(CorruptSessionError):
        await store.commit(lease, step_checkpoint(session, 3))
    assert read(journal) == damaged


async def test_every_flipped_byte_of_a_snapshot_is_corruption(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    session = await session_with_steps(make_file_store(), make_session(state={"k": "v"}), 0)
    snapshot = snapshot_of(store_path, session.id)
    original = read(snapshot)
    store = make_file_store()

    for offset in range(len(original)):
        write(snapshot, flip(original, offset))
        with pytest.raises(CorruptSessionError, match="snapshot"):
            await store.load(session.id)

    write(snapshot, original)
    assert await store.load(session.id) == session


async def test_checkpoints_overwrite_space_reserved_after_the_journal_and_a_release_frees_it(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a session leased by a runner
    store = make_file_store()
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)
    journal = journal_of(store_path, session.id)

    # When it commits checkpoints
    await commit(store, lease, session, step_checkpoint(session, 0))
    reserved = size_of(journal)
    for index in range(1, 5):
        await commit(store, lease, session, step_checkpoint(session, index))

    # Then the first one reserved zeros after its record, and the next ones were
    # written into them: the file did not grow (no new size for fdatasync to commit)
    records_end = frames(journal)[-1].end
    assert size_of(journal) == reserved > records_end
    assert read(journal)[records_end:] == bytes(reserved - records_end)

    # And while the runner holds it, another store reads it whole and verifies it ok
    reader = make_file_store()
    assert await reader.load(session.id) == session
    assert (await reader.check(session.id)).verdict == "ok"

    # And once the lease is given back, the session takes only its records' space
    await store.release(lease)
    assert size_of(journal) == records_end
    assert await reader.load(session.id) == session


async def test_group_commit_writes_no_reserved_space(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a store with group commit, whose shared syncfs commits metadata anyway
    store = make_file_store(durability="batch")
    session = make_session()
    await store.create(session)
    lease = await lease_for(store, session.id)

    # When a leased session commits checkpoints
    for index in range(3):
        await commit(store, lease, session, step_checkpoint(session, index))

    # Then its journal holds its records and nothing more
    journal = journal_of(store_path, session.id)
    assert size_of(journal) == frames(journal)[-1].end
    await store.release(lease)
    await store.close()


async def test_a_load_begun_before_a_takeover_never_lets_the_new_holder_lose_acknowledged_work(
    make_file_store: MakeFileStore,
    store_path: Path,
    make_session: MakeSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a runner (store one) whose checkpoints go into reserved zeros, and a
    # lock-free load in another store (a dashboard, say) that read the session then
    session = make_session()
    first = make_file_store()
    await first.create(session)
    first_lease = await lease_for(first, session.id)
    for index in range(2):
        await commit(first, first_lease, session, step_checkpoint(session, index))
    read_done, go_on = threading.Event(), threading.Event()
    real_read = file_reads.read_session

    def read_then_pause(*args: Any, **kwargs: Any) -> Any:
        found = real_read(*args, **kwargs)
        read_done.set()
        go_on.wait(10)
        return found

    monkeypatch.setattr(file_reads, "read_session", read_then_pause)
    second = make_file_store()
    racing_load = asyncio.ensure_future(second.load(session.id))
    await asyncio.to_thread(read_done.wait, 10)
    monkeypatch.setattr(file_reads, "read_session", real_read)

    # When the first runner commits once more (the file keeps its size), then dies
    # holding the lease (its descriptors closed as kill -9 closes them, no trim)
    await commit(first, first_lease, session, step_checkpoint(session, 2))
    acknowledged = session.model_copy(deep=True)
    lock_fd = first._locks.pop(session.id)[0]
    journal_fd = first._tails.pop(session.id).fd
    for fd in (lock_fd, journal_fd):
        assert fd is not None
        os.close(fd)

    # ... and the second store takes the lease over before the racing load ends
    second_lease = await lease_for(second, session.id)
    go_on.set()
    await racing_load

    # Then its runner's load and next commit build on the acknowledged checkpoint,
    # and giving the lease back (which cuts the reserved zeros) keeps every one
    loaded = await second.load(session.id)
    assert loaded == acknowledged
    await commit(second, second_lease, loaded, step_checkpoint(loaded, 3))
    await second.release(second_lease)
    assert await make_file_store().load(session.id) == loaded


@pytest.mark.parametrize("where", ["appended", "in reserved space"])
async def test_a_journal_torn_anywhere_inside_its_last_record_loads_the_previous_checkpoint(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession, where: str
) -> None:
    # Given a session with three checkpoints, and what it was after two
    store = make_file_store(durability="none")
    initial = make_session()
    await store.create(initial)
    lease = await lease_for(store, initial.id)
    session = initial.model_copy(deep=True)
    for index in range(2):
        await commit(store, lease, session, step_checkpoint(session, index))
    after_two = session.model_copy(deep=True)
    await commit(store, lease, session, checkpoint_for(session, step="last", output="x" * 64))
    await store.release(lease)
    journal = journal_of(store_path, session.id)
    original = read(journal)
    last = frames(journal)[-1]
    # Shorter than the torn record: torn bytes left past it would show as a torn tail
    replacement = checkpoint_for(after_two, step="next", output=2)

    # Reserved zeros after the records: what the torn write did not reach reads as zeros
    padding = bytes(4096) if where == "in reserved space" else b""

    for length in range(last.offset + 1, last.end):
        # When the journal is cut anywhere inside the last record (a torn write)
        write(journal, original[:length] + padding)
        restarted = make_file_store(durability="none")

        # Then it loads at the previous checkpoint
        assert await restarted.load(session.id) == after_two, length

        # And the next commit cuts the torn bytes: it reads back with the lease still
        # held (as after a crash), and once the lease is given back
        lease = await lease_for(restarted, session.id)
        await restarted.commit(lease, replacement)
        expected = after_two.model_copy(deep=True)
        expected.apply(replacement)
        assert await make_file_store(durability="none").load(session.id) == expected, length
        await restarted.release(lease)
        assert await restarted.load(session.id) == expected, length
        scan = codec.scan_frames(read(journal), str(journal))
        assert not scan.torn_tail
        assert [frame.seq for frame in scan.frames] == [1, 2, 3]
        await restarted.close()


@pytest.mark.parametrize("damage", ["zeros-after", "last-record-zeroed"])
async def test_a_zero_filled_tail_is_dropped(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession, damage: str
) -> None:
    # Given a session with three checkpoints
    store = make_file_store()
    initial = make_session()
    await store.create(initial)
    lease = await lease_for(store, initial.id)
    session = initial.model_copy(deep=True)
    history = []
    for index in range(3):
        await commit(store, lease, session, step_checkpoint(session, index))
        history.append(session.model_copy(deep=True))
    await store.release(lease)
    journal = journal_of(store_path, session.id)
    original, last = read(journal), frames(journal)[-1]

    # When a power cut leaves zeros: after the last record, or in place of it
    if damage == "zeros-after":
        write(journal, original + bytes(4096))
        expected = history[2]
    else:
        write(journal, original[: last.offset] + bytes(last.end - last.offset))
        expected = history[1]

    # Then the zeros are dropped and the session loads at its last whole checkpoint
    restarted = make_file_store()
    assert await restarted.load(session.id) == expected
    lease = await lease_for(restarted, session.id)
    await commit(restarted, lease, expected, step_checkpoint(expected, 9))
    assert await make_file_store().load(session.id) == expected


async def test_an_encrypted_record_without_a_key_is_a_decryption_error(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given a journal whose next record carries the encrypted flag
    session = await session_with_steps(make_file_store(), make_session(), 1)
    journal = journal_of(store_path, session.id)
    record = codec.encode_frame(2, b"\x00opaque ciphertext", flags=codec.FLAG_ENCRYPTED)
    write(journal, read(journal) + record)

    # When it is read by a store that has no key
    store = make_file_store()

    # Then that is a clear DecryptionError, and listings report the session
    with pytest.raises(DecryptionError, match="encrypted"):
        await store.load(session.id)
    rows = await store.list()
    assert [row.id for row in rows] == [session.id]
    assert rows[0].problem is not None
    assert "encrypted" in rows[0].problem


async def test_a_record_over_the_size_limit_is_refused_and_changes_nothing(
    file_store: FileStore, make_session: MakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()
    await file_store.create(session)
    lease = await lease_for(file_store, session.id)
    monkeypatch.setattr(codec, "MAX_RECORD_BYTES", 4096)

    with pytest.raises(SerializationError, match="exceeds"):
        await file_store.commit(lease, checkpoint_for(session, step="big", output="x" * 5000))

    assert await file_store.load(session.id) == session
    await commit(file_store, lease, session, checkpoint_for(session, step="small", output="x"))
    assert await file_store.load(session.id) == session


# -- corrupt sessions and the session manager -------------------------------------


async def test_a_corrupt_expired_session_is_reported_and_never_cleaned_up(
    make_file_store: MakeFileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given an expired session (and an expired healthy one), then a damaged byte
    store = make_file_store()
    manager = SessionManager(store, cleanup_interval=None)
    past = utcnow() - timedelta(hours=1)
    corrupt = make_session(
        created_at=past - timedelta(hours=1), last_activity=past, expires_at=past
    )
    healthy_expired = make_session(created_at=past, last_activity=past, expires_at=past)
    live = make_session()
    for session in (corrupt, healthy_expired, live):
        await store.create(session)
    snapshot = snapshot_of(store_path, corrupt.id)
    damaged = flip(read(snapshot), len(read(snapshot)) // 2)
    write(snapshot, damaged)

    # When listing and cleaning up
    rows = {row.id: row for row in await store.list()}
    result = await manager.perform_cleanup()

    # Then the corrupt session is reported, kept byte for byte, and loud on reads
    problem = rows[corrupt.id].problem
    assert problem is not None
    assert str(snapshot) in problem
    assert result.cleaned_sessions == 1
    assert set(result.skipped) == {corrupt.id}
    assert read(snapshot) == damaged
    assert await store.load(healthy_expired.id) is None
    assert await store.load(live.id) == live
    with pytest.raises(CorruptSessionError):
        await manager.get_session(corrupt.id)
    with pytest.raises(CorruptSessionError):
        async with manager.use_session(corrupt.id):
            pass
    metrics = await manager.collect_metrics()
    assert metrics.unreadable_sessions == 1
    assert metrics.total_sessions == 1
    await manager.close()


async def test_an_acquire_cancelled_mid_call_leaves_the_session_free(
    file_store: FileStore, make_session: Callable[..., Session]
) -> None:
    # Given a stored session
    session = make_session()
    await file_store.create(session)

    # When acquires are cancelled at once, many times (the worker thread may take the
    # lock before the cancellation lands)
    for _ in range(50):
        attempt = asyncio.ensure_future(file_store.acquire(session.id, "gone"))
        await asyncio.sleep(0)
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await attempt

    # Then no lock was left behind: the session can be taken
    lease = await file_store.acquire(session.id, "next")
    assert lease is not None
    await file_store.release(lease)
