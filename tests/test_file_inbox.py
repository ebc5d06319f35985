"""The file store's inbox file: events posted without the lease, on disk.

The inbox's behaviour is in the contract suite (test_store_contract.py) and the
cross-process delivery in test_events.py and test_event_delivery.py; this module
covers what is the file store's own: the ``inbox`` file's records, its torn tail
and corruption, the rewrite that drops absorbed events, encryption, rekeying and
shredding, a disk fault in a post, and power cuts at every call of posts and of a
checkpoint that absorbs posted events (through ``disk_model``, as
test_power_loss.py does for checkpoints).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from checkpoints import new_session
from disk_model import CRASH_MODELS, DiskModel, Fault, IoCall, record_io, write_image

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    EngineError,
    FileStore,
    Session,
    SessionNotFoundError,
    StorageError,
    codec,
)
from engine.crypto import KeyRing, generate_key
from engine.models import Event, utcnow
from engine.stores import file_compaction, file_inbox

MakeSession = Callable[..., Session]
KEY = os.urandom(32)  # a raw AES-256 key: no passphrase stretching on every open
POWER_CUTS = [name for name in CRASH_MODELS if name != "killed"]
ENCRYPTED = pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])


def an_event(name: str = "approval", payload: Any = None) -> Event:
    return Event(id=str(uuid.uuid4()), name=name, payload=payload, sent_at=utcnow())


def inbox_of(root: Path, session_id: str) -> Path:
    return root / session_id / "inbox"


def records(path: Path) -> list[codec.Frame]:
    return codec.scan_frames(path.read_bytes(), str(path)).frames


def numbered(session: Session | None) -> list[tuple[int | None, Any]]:
    assert session is not None
    return [(event.seq, event.payload) for event in session.inbox]


def taking(session: Session, *, added: int = 0) -> Checkpoint:
    """The checkpoint a step commits when it takes the last event posted to ``session``.

    The ``added`` oldest posted events become part of the session; the others,
    numbered below the one taken, are taken too.
    """
    posted = [e for e in session.inbox if e.seq is not None and e.seq > session.inbox_seq]
    assert posted, "nothing posted to take"
    now = utcnow()
    return Checkpoint(
        revision=session.revision + 1,
        status="running",
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        events_added=posted[:added],
        events_consumed=[e.id for e in posted[added:]],
        inbox_seq=posted[-1].seq,
    )


async def take(store: FileStore, session_id: str, *, added: int = 0) -> Session:
    """Take the posted events under a lease, as a runner's step does; return the session."""
    lease = await store.acquire(session_id, "runner")
    assert lease is not None
    try:
        session = await store.load(session_id)
        assert session is not None
        checkpoint = taking(session, added=added)
        await store.commit(lease, checkpoint)
        session.apply(checkpoint)
        return session
    finally:
        await store.release(lease)


# -- the file ---------------------------------------------------------------------


async def test_each_event_is_one_record_numbered_as_posted_in_a_0600_file(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    session = make_session()
    await file_store.create(session)

    numbers = [await file_store.post_event(session.id, an_event(payload=n)) for n in range(3)]

    inbox = inbox_of(store_path, session.id)
    assert numbers == [1, 2, 3]
    assert [frame.seq for frame in records(inbox)] == [1, 2, 3]
    for path in (inbox, inbox.with_name("inbox.lock")):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert numbered(await file_store.load(session.id)) == [(1, 0), (2, 1), (3, 2)]


async def test_a_torn_tail_is_dropped_then_cut_off_by_the_next_post(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given an inbox whose last append was cut short (a crash mid-post)
    session = make_session()
    await file_store.create(session)
    await file_store.post_event(session.id, an_event(payload="kept"))
    inbox = inbox_of(store_path, session.id)
    whole = inbox.read_bytes()
    torn = codec.encode_frame(2, b'{"never": "acknowledged"}')
    inbox.write_bytes(whole + torn[: len(torn) // 2])

    # Then loads drop it, and verification says what it is
    assert numbered(await file_store.load(session.id)) == [(1, "kept")]
    check = await file_store.check(session.id)
    assert (check.verdict, str(inbox) in check.detail) == ("torn tail", True)

    # When the next event is posted, it takes the torn record's place and number
    assert await file_store.post_event(session.id, an_event(payload="next")) == 2
    assert numbered(await file_store.load(session.id)) == [(1, "kept"), (2, "next")]
    assert inbox.read_bytes()[: len(whole)] == whole
    assert (await file_store.check(session.id)).verdict == "ok"


async def test_damage_before_the_last_record_is_corruption_everywhere(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    # Given two posted events, the first damaged on disk
    session = make_session()
    await file_store.create(session)
    for n in range(2):
        await file_store.post_event(session.id, an_event(payload=n))
    inbox = inbox_of(store_path, session.id)
    data = bytearray(inbox.read_bytes())
    data[codec.HEADER_SIZE + 3] ^= 0xFF
    inbox.write_bytes(bytes(data))
    damaged = inbox.read_bytes()

    # Then every read reports it, naming the file and offset, and nothing is written
    with pytest.raises(CorruptSessionError, match=rf"{inbox}.*offset 0"):
        await file_store.load(session.id)
    with pytest.raises(CorruptSessionError, match="inbox"):
        await file_store.post_event(session.id, an_event())
    (row,) = await file_store.list()
    assert row.problem is not None
    assert "inbox" in row.problem
    assert (await file_store.check(session.id)).verdict == "corrupt"
    assert inbox.read_bytes() == damaged

    # And quarantine moves the inbox aside with the rest of the session
    moved = Path(await file_store.quarantine(session.id))
    assert (moved / "inbox").read_bytes() == damaged
    assert await file_store.load(session.id) is None


async def test_absorbed_events_are_dropped_at_compaction_and_numbers_go_on(
    make_file_store: Callable[..., FileStore], store_path: Path, make_session: MakeSession
) -> None:
    # Given a store that compacts at every checkpoint, and three posted events
    store = make_file_store(compact_bytes=1)
    session = make_session()
    await store.create(session)
    for n in range(3):
        await store.post_event(session.id, an_event(payload=n))
    inbox = inbox_of(store_path, session.id)

    # When a step takes the second (the first joins the session itself)
    taken = await take_up_to(store, session.id, 2, added=1)

    # Then the file keeps only a floor at 2 and the third event
    assert [(f.seq, len(f.body) > 0) for f in records(inbox)] == [(2, False), (3, True)]
    loaded = await store.load(session.id)
    assert loaded is not None
    assert (loaded.inbox_seq, loaded.revision) == (2, taken.revision)
    assert numbered(loaded) == [(1, 0), (3, 2)]

    # And once the last one is taken too and the session saved, the floor alone
    # keeps the numbering
    await take(store, session.id)
    copy = await store.load(session.id)
    assert copy is not None
    await store.save(copy)
    assert [f.seq for f in records(inbox)] == [3]
    assert await store.post_event(session.id, an_event(payload="later")) == 4
    assert numbered(await make_file_store().load(session.id)) == [(1, 0), (4, "later")]


async def take_up_to(store: FileStore, session_id: str, number: int, *, added: int) -> Session:
    """Take the posted events numbered up to ``number``, ``added`` of them into the session."""
    lease = await store.acquire(session_id, "runner")
    assert lease is not None
    try:
        session = await store.load(session_id)
        assert session is not None
        up_to = session.model_copy(
            update={"inbox": [e for e in session.inbox if e.seq is not None and e.seq <= number]}
        )
        checkpoint = taking(up_to, added=added)
        await store.commit(lease, checkpoint)
        up_to.apply(checkpoint)
        return up_to
    finally:
        await store.release(lease)


async def test_a_saved_copy_drops_the_events_it_absorbed_from_the_file(
    file_store: FileStore, store_path: Path, make_session: MakeSession
) -> None:
    session = make_session()
    await file_store.create(session)
    for n in range(2):
        await file_store.post_event(session.id, an_event(payload=n))
    copy = await file_store.load(session.id)
    assert copy is not None

    copy.inbox = copy.inbox[1:]
    copy.inbox_seq = 1
    await file_store.save(copy)

    assert [f.seq for f in records(inbox_of(store_path, session.id))] == [1, 2]
    assert len(records(inbox_of(store_path, session.id))[0].body) == 0  # the floor
    assert numbered(await file_store.load(session.id)) == [(2, 1)]
    assert await file_store.post_event(session.id, an_event()) == 3


async def test_delete_and_shred_remove_the_inbox(
    make_file_store: Callable[..., FileStore], store_path: Path, make_session: MakeSession
) -> None:
    store = make_file_store(encryption_key=KEY)
    deleted, shredded = make_session(), make_session()
    for session in (deleted, shredded):
        await store.create(session)
        await store.post_event(session.id, an_event())

    assert await store.delete(deleted.id)
    assert await store.shred(shredded.id)

    for session in (deleted, shredded):
        assert not (store_path / session.id).exists()
        with pytest.raises(SessionNotFoundError, match=session.id):
            await store.post_event(session.id, an_event())
    assert inbox_files(store_path) == []


def inbox_files(root: Path) -> list[Path]:
    return list(root.rglob("inbox*"))


# -- encryption -------------------------------------------------------------------


async def test_posted_events_are_sealed_under_the_sessions_key(
    make_file_store: Callable[..., FileStore], store_path: Path, make_session: MakeSession
) -> None:
    store = make_file_store(encryption_key=KEY)
    session = make_session()
    await store.create(session)
    secret = f"secret-{uuid.uuid4().hex}"

    await store.post_event(session.id, an_event(payload={"card": secret}))

    inbox = inbox_of(store_path, session.id)
    assert secret.encode() not in inbox.read_bytes()
    assert all(frame.flags & codec.FLAG_ENCRYPTED for frame in records(inbox))
    assert numbered(await make_file_store(encryption_key=KEY).load(session.id)) == [
        (1, {"card": secret})
    ]
    # Without the key: refused, and nothing posted in clear beside the sealed records
    keyless = make_file_store()
    with pytest.raises(DecryptionError, match=session.id):
        await keyless.post_event(session.id, an_event())
    assert len(records(inbox)) == 1


async def test_a_record_moved_to_another_position_fails_authentication(
    make_file_store: Callable[..., FileStore], store_path: Path, make_session: MakeSession
) -> None:
    store = make_file_store(encryption_key=KEY)
    session = make_session()
    await store.create(session)
    for n in range(2):
        await store.post_event(session.id, an_event(payload=n))
    inbox = inbox_of(store_path, session.id)
    first, second = (inbox.read_bytes()[f.offset : f.end] for f in records(inbox))

    # When the second record is relabelled as number 3 with valid checksums
    body = second[codec.HEADER_SIZE :]
    inbox.write_bytes(first + codec.encode_frame(3, body, codec.FLAG_ENCRYPTED))

    with pytest.raises(CorruptSessionError):
        await make_file_store(encryption_key=KEY).load(session.id)


async def test_rekey_reseals_the_inbox_keeping_numbers_and_a_stale_sender_follows(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an encrypted session with posted events, and a sender that has its keys cached
    old, new = generate_key(), generate_key()
    root = tmp_path / "sessions"
    creator = FileStore(root, encryption_key=old)
    session = make_session()
    await creator.create(session)
    for n in range(2):
        await creator.post_event(session.id, an_event(payload=n))
    sender = FileStore(root, encryption_key=KeyRing(new, [old]))
    assert await sender.post_event(session.id, an_event(payload=2)) == 3
    inbox = inbox_of(root, session.id)
    before = {codec.frame_key_id(frame) for frame in records(inbox)}

    # When another store rekeys the session under the new master key
    rekeyer = FileStore(root, encryption_key=KeyRing(new, [old]))
    assert await rekeyer.rekey(session.id) == "rekeyed"

    # Then every inbox record is under the new data key, numbers kept
    after = {codec.frame_key_id(frame) for frame in records(inbox)}
    assert len(after) == 1
    assert after.isdisjoint(before)
    assert [frame.seq for frame in records(inbox)] == [1, 2, 3]
    assert numbered(await rekeyer.load(session.id)) == [(1, 0), (2, 1), (3, 2)]

    # And the sender, its cached keys now stale, posts under the new data key
    assert await sender.post_event(session.id, an_event(payload=3)) == 4
    assert {codec.frame_key_id(frame) for frame in records(inbox)} == after
    assert (await rekeyer.check(session.id)).verdict == "ok"
    assert (await rekeyer.rekey(session.id)) == "current"
    for store in (creator, sender, rekeyer):
        await store.close()


@pytest.mark.parametrize("posted_before", [0, 2], ids=["first event", "more events"])
async def test_a_rekey_waits_for_a_sender_that_holds_the_inbox(
    tmp_path: Path, make_session: MakeSession, monkeypatch: pytest.MonkeyPatch, posted_before: int
) -> None:
    # Given an encrypted session, and a sender that has read the key file and is
    # about to append its event (holding inbox.lock) when a rekey starts elsewhere
    old, new = generate_key(), generate_key()
    root = tmp_path / "sessions"
    sender = FileStore(root, encryption_key=old)
    session = make_session()
    await sender.create(session)
    for n in range(posted_before):
        await sender.post_event(session.id, an_event(payload=n))
    rekeyer = FileStore(root, encryption_key=KeyRing(new, [old]))
    rekey_done = threading.Event()
    outcomes: list[str] = []

    def rekey_elsewhere() -> None:
        outcomes.append(asyncio.run(rekeyer.rekey(session.id)))
        rekey_done.set()

    real_append = file_inbox.append

    def append_while_a_rekey_starts(folder: Path, record: bytes, end: int, *, sync: bool) -> None:
        threading.Thread(target=rekey_elsewhere, daemon=True).start()
        # When the rekey runs while the sender holds the inbox, it must wait for it:
        # finishing now would drop the data key this record is sealed under.
        assert not rekey_done.wait(timeout=1.0), "the rekey did not wait for the sender"
        real_append(folder, record, end, sync=sync)

    monkeypatch.setattr(file_inbox, "append", append_while_a_rekey_starts)
    number = await sender.post_event(session.id, an_event(payload="late"))
    monkeypatch.setattr(file_inbox, "append", real_append)
    assert await asyncio.to_thread(rekey_done.wait, 30)

    # Then the rekey went through after the post, and the posted event is readable
    assert outcomes == ["rekeyed"]
    reader = FileStore(root, encryption_key=KeyRing(new, [old]))
    loaded = await reader.load(session.id)
    assert loaded is not None
    assert [event.seq for event in loaded.inbox][-1] == number == posted_before + 1
    assert (await reader.check(session.id)).verdict == "ok"


async def test_a_shred_during_a_rekey_waits_and_its_key_stays_destroyed(
    tmp_path: Path, make_session: MakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an encrypted session being rekeyed, and a shred arriving mid-way
    old, new = generate_key(), generate_key()
    root = tmp_path / "sessions"
    store = FileStore(root, encryption_key=old)
    session = make_session()
    await store.create(session)
    await store.post_event(session.id, an_event())
    shredder = FileStore(root, encryption_key=KeyRing(new, [old]))
    shred_done = threading.Event()
    shredded: list[bool] = []

    def shred_elsewhere() -> None:
        shredded.append(asyncio.run(shredder.shred(session.id)))
        shred_done.set()

    real_rewrite = file_compaction.rewrite_inbox

    def rewrite_while_a_shred_starts(*args: Any, **kwargs: Any) -> None:
        threading.Thread(target=shred_elsewhere, daemon=True).start()
        # When the shred runs while the rekey is rewriting, it must wait for it:
        # otherwise the rekey writes the destroyed key back right after
        assert not shred_done.wait(timeout=1.0), "the shred did not wait for the rekey"
        real_rewrite(*args, **kwargs)

    monkeypatch.setattr(file_compaction, "rewrite_inbox", rewrite_while_a_shred_starts)
    rekeyer = FileStore(root, encryption_key=KeyRing(new, [old]))
    assert await rekeyer.rekey(session.id) == "rekeyed"
    assert await asyncio.to_thread(shred_done.wait, 30)

    # Then the shred went through after the rekey: no key and no session are left
    assert shredded == [True]
    assert not (root / ".keys" / f"{session.id}.key").exists()
    assert not (root / session.id).exists()


async def test_shred_refuses_when_the_keys_folder_is_missing(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an encrypted session whose keys live in a folder of their own
    root, keys = tmp_path / "sessions", tmp_path / "keys"
    store = FileStore(root, encryption_key=KEY, keys_path=keys)
    session = make_session()
    await store.create(session)

    # When that folder is not there (not mounted, or another path configured)
    hidden = keys.rename(tmp_path / "keys-elsewhere")

    # Then shred refuses, and removes nothing: the key it cannot reach would live on
    with pytest.raises(StorageError, match="keys folder"):
        await store.shred(session.id)
    assert (root / session.id).is_dir()
    hidden.rename(keys)
    assert await store.shred(session.id)
    assert not (root / session.id).exists()


# -- a disk fault and power cuts ---------------------------------------------------


async def test_a_failed_sync_of_a_post_is_reported_and_never_found_later(
    tmp_path: Path,
) -> None:
    # Given a session, and a disk that fails the first sync of the inbox file
    root = tmp_path / "sessions"
    model = empty_folder(root)
    hits: list[IoCall] = []

    def fail_inbox_sync(call: IoCall) -> Fault | None:
        if call.name == "fdatasync" and call.target.endswith("inbox") and not hits:
            hits.append(call)
            return Fault(errno.EIO)
        return None

    with record_io(model, fail_inbox_sync) as recorder:
        store = FileStore(root)
        session = new_session()
        await store.create(session)

        # When an event is posted
        with pytest.raises(StorageError, match="inbox"):
            await store.post_event(session.id, an_event(payload="lost"))

        # Then it is not there, and the next post takes its number and is durable
        assert hits
        assert numbered(await store.load(session.id)) == []
        assert await store.post_event(session.id, an_event(payload="kept")) == 1
        await store.close()
    for cut in POWER_CUTS:
        image = tmp_path / f"image-{cut}"
        write_image(recorder.model.image(cut), image)
        assert numbered(await FileStore(image).load(session.id)) == [(1, "kept")], cut


def empty_folder(root: Path) -> DiskModel:
    """Create ``root`` and model it."""
    root.mkdir(mode=0o700)
    return DiskModel.of_folder(root)


@dataclass
class Operation:
    """One recorded store call: the crash points it spans, and the session at each end."""

    label: str
    first: int
    last: int
    before: Session
    after: Session


async def record_scenario(root: Path, key: bytes | None) -> tuple[Any, list[Operation], str]:
    """Posts (one creating the inbox), then a checkpoint taking events, then a post.

    The store compacts at every checkpoint, so the taking checkpoint also rewrites
    the inbox without the events it absorbed.
    """
    model = empty_folder(root)
    operations: list[Operation] = []
    with record_io(model) as recorder:
        store = FileStore(root, encryption_key=key, compact_bytes=1)
        session = new_session()
        await store.create(session)

        async def do(label: str, call: Callable[[], Any]) -> None:
            before = await store.load(session.id)
            first = recorder.mark()
            await call()
            last = recorder.mark()
            after = await store.load(session.id)
            assert before is not None
            assert after is not None
            operations.append(Operation(label, first, last, before, after))

        for n in range(3):
            await do(f"post {n + 1}", lambda n=n: store.post_event(session.id, an_event(payload=n)))
        lease = await store.acquire(session.id, "runner")
        assert lease is not None
        running = await store.load(session.id)
        assert running is not None
        up_to_2 = running.model_copy(update={"inbox": running.inbox[:2]})
        # Big enough to outgrow the snapshot: the journal is folded, the inbox rewritten
        pad = {"state_set": {"pad": "p" * 2000}}
        checkpoint = taking(up_to_2, added=1).model_copy(update=pad)
        await do("taking checkpoint", lambda: store.commit(lease, checkpoint))
        await do("post 4 (lease held)", lambda: store.post_event(session.id, an_event(payload=3)))
        await store.release(lease)
        await store.close()
    model.check_matches()
    return recorder, operations, session.id


async def load_image(folder: Path, session_id: str, key: bytes | None) -> Session | None:
    store = FileStore(folder, encryption_key=key)
    try:
        problems = [row.problem for row in await store.list() if row.problem is not None]
        assert problems == [], problems
        return await store.load(session_id)
    finally:
        await store.close()


async def recover(
    folder: Path, model: DiskModel, session_id: str, key: bytes | None
) -> tuple[Session, DiskModel, str]:
    """Carry on like a restarted runner: take what is posted, then post one more.

    Returns the session it then loads, the disk model, and the new event's id.
    """
    store = FileStore(folder, encryption_key=key)
    later = an_event(payload="after recovery")
    with record_io(model) as recorder:
        loaded = await store.load(session_id)
        assert loaded is not None
        if any(e.seq is not None and e.seq > loaded.inbox_seq for e in loaded.inbox):
            await take(store, session_id)
        await store.post_event(session_id, later)
        expected = await store.load(session_id)
        await store.close()
    assert expected is not None
    return expected, recorder.model, later.id


@dataclass
class Sweep:
    """The crash images checked so far, and what went wrong with them."""

    work: Path
    key: bytes | None
    images: int = 0
    violations: list[str] | None = None

    def __post_init__(self) -> None:
        self.violations = []

    def fail(self, message: str) -> None:
        assert self.violations is not None
        self.violations.append(message)


async def check_image(
    sweep: Sweep, op: Operation, model: DiskModel, crash_model: str, last: bool, where: str
) -> bool | None:
    """Load one crash image, then recover from it; return whether it loaded ``op.after``.

    Every image loads as before or after the call (after, once it returned), and a
    restarted runner takes what is there and posts again, kept by a second power cut.
    """
    image = model.image(crash_model)
    folder = sweep.work / f"image-{sweep.images}"
    sweep.images += 1
    write_image(image, folder)
    try:
        loaded = await load_image(folder, op.after.id, sweep.key)
    except (EngineError, AssertionError) as exc:
        sweep.fail(f"{where}: load raised {exc!r}")
        return None
    if loaded not in (op.before, op.after):
        sweep.fail(f"{where}: loaded neither before nor after: {loaded}")
        return None
    if last and loaded != op.after:
        sweep.fail(f"{where}: the acknowledged {op.label} was lost")
    base = (
        model.after_kill(folder) if crash_model == "killed" else DiskModel.of_image(folder, image)
    )
    expected, after, later = await recover(folder, base, op.after.id, sweep.key)
    if later not in [e.id for e in expected.inbox]:
        sweep.fail(f"{where}: the post after recovery is not loaded")
    for cut in POWER_CUTS:
        again = sweep.work / f"image-{sweep.images}-{cut}"
        write_image(after.image(cut), again)
        try:
            if await load_image(again, op.after.id, sweep.key) != expected:
                sweep.fail(f"{where}, recovered, then {cut}: lost what it did")
        except (EngineError, AssertionError) as exc:
            sweep.fail(f"{where}, recovered, then {cut}: raised {exc!r}")
        shutil.rmtree(again)
    shutil.rmtree(folder)
    return loaded == op.after


@ENCRYPTED
async def test_a_power_cut_anywhere_in_a_post_or_a_taking_checkpoint_loses_nothing_acknowledged(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given posts, a checkpoint taking two events (rewriting the inbox), a post under the lease
    sweep = Sweep(tmp_path, KEY if encrypted else None)
    recorder, operations, _ = await record_scenario(tmp_path / "recorded", sweep.key)
    points = recorder.points
    taking_calls = [p.call for p in points[operations[3].first : operations[3].last + 1]]
    assert any("inbox.tmp -> " in call for call in taking_calls), "the inbox was not rewritten"

    # When the power is cut after any of their calls, under every crash model
    for op in operations:
        reached = dict.fromkeys(CRASH_MODELS, False)
        for index in range(op.first, op.last + 1):
            for crash_model in CRASH_MODELS:
                where = f"{op.label}: crash after {points[index].call} ({crash_model})"
                model = points[index].model
                new = await check_image(sweep, op, model, crash_model, index == op.last, where)
                # Then nothing that reached the disk is taken back
                if new is False and reached[crash_model]:
                    sweep.fail(f"{where}: went back after reaching the new state")
                reached[crash_model] = reached[crash_model] or bool(new)

    shown = "\n".join((sweep.violations or [])[:12])
    assert sweep.violations == [], f"{len(sweep.violations or [])} of {sweep.images}:\n{shown}"
    assert all(op.before != op.after for op in operations)
