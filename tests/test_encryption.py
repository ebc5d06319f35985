"""Encryption at rest: round trips, nothing in clear, tampering, keys, rotation, shredding.

Real files throughout; rekey is interrupted by SIGKILL of a real ``stepvault rekey``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid
import zlib
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
    InvalidArgumentError,
    MemoryStore,
    Runner,
    Session,
    SessionManager,
    StepContext,
    StorageError,
    ToolResult,
    Workflow,
    codec,
)
from engine.crypto import Encryption, KeyRing, generate_key
from engine.models import utcnow
from engine.stores import file_keys

MakeSession = Callable[..., Session]
MARK = "Zq7-plaintext-marker"
ROOT = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------------


def key_id(key: str | bytes) -> str:
    """The id a raw key is known by in errors and key files."""
    return Encryption(KeyRing(key)).active_key_id


def checkpoint(session: Session, index: int, **changes: Any) -> Checkpoint:
    now = utcnow()
    values: dict[str, Any] = {
        "revision": session.revision + 1,
        "status": "running",
        "last_activity": now,
        "expires_at": now + timedelta(hours=1),
        "step": f"step-{index}",
        "output": {"index": index, "secret": f"output-{index}-{MARK}"},
        "state_set": {f"k{index}": f"state-{index}-{MARK}"},
        "tool_results": [
            ToolResult(
                name=f"step-{index}",
                output=index,
                error=f"error-{index}-{MARK}",
                started_at=now,
                finished_at=now,
                duration=0.0,
            )
        ],
    }
    values.update(changes)
    return Checkpoint(**values)


async def stored_session(store: FileStore, session: Session, steps: int) -> Session:
    """Create ``session`` in ``store`` and commit ``steps`` checkpoints; return it as stored."""
    await store.create(session)
    lease = await store.acquire(session.id, "test")
    assert lease is not None
    for index in range(steps):
        step = checkpoint(session, index)
        await store.commit(lease, step)
        session.apply(step)
    await store.release(lease)
    return session


def secret_session(make_session: MakeSession) -> Session:
    return make_session(
        context={"user_id": f"user-{MARK}", "permissions": [f"perm-{MARK}"]},
        metadata={"user_agent": f"agent-{MARK}", "origin": f"origin-{MARK}", "tags": [MARK]},
        state={"secret": f"state-{MARK}"},
        input=f"input-{MARK}",
    )


def every_file(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def folder_of(root: Path, session_id: str) -> Path:
    return root / session_id


async def load(path: Path, session_id: str, key: Any = None) -> Session | None:
    store = FileStore(path, encryption_key=key)
    try:
        return await store.load(session_id)
    finally:
        await store.close()


def reseq(record: bytes, seq: int) -> bytes:
    """Rewrite a frame's sequence number with valid checksums: what a deliberate attacker does."""
    magic, fmt, flags, length, _, body_crc = struct.unpack_from("<2sBBIQI", record)
    head = struct.pack("<2sBBIQI", magic, fmt, flags, length, seq, body_crc)
    return head + struct.pack("<I", zlib.crc32(head)) + record[codec.HEADER_SIZE :]


def records(data: bytes) -> list[bytes]:
    return [data[f.offset : f.end] for f in codec.scan_frames(data, "journal").frames]


# -- round trip and what reaches the disk ---------------------------------------------


async def test_a_workflow_round_trips_and_no_plaintext_reaches_any_file(tmp_path: Path) -> None:
    # Given a workflow whose input, state, outputs, errors and metadata are all secrets
    key = generate_key()
    wf = Workflow("secret-flow", version="1")

    @wf.step(retries=1, backoff=0.01)
    async def fetch(ctx: StepContext, query: str) -> dict[str, str]:
        ctx.state["note"] = f"state-{MARK}"
        if ctx.attempt == 1:
            raise RuntimeError(f"error-{MARK}")
        return {"out": f"output-{MARK}"}

    @wf.step
    def finish(ctx: StepContext, value: dict[str, str]) -> str:
        return value["out"] + "-done"

    # When it runs on an encrypted file store
    async with Runner(FileStore(tmp_path, encryption_key=key), workflows=[wf]) as runner:
        result = await runner.run(
            wf,
            f"input-{MARK}",
            metadata={"user_agent": f"agent-{MARK}", "tags": [f"tag-{MARK}"]},
            context={"user_id": f"user-{MARK}"},
        )
    assert result == f"output-{MARK}-done"

    # Then a new store with the key reads everything back ...
    rows = await FileStore(tmp_path, encryption_key=key).list()
    session = await load(tmp_path, rows[0].id, key)
    assert session is not None
    assert session.state["note"] == f"state-{MARK}"
    assert session.metadata.user_agent == f"agent-{MARK}"
    assert [r.error for r in session.tool_history if r.error] == [f"RuntimeError: error-{MARK}"]
    # ... and no file holds any of it in clear (nor the JSON it is written as)
    files = every_file(tmp_path)
    assert any(path.suffix == ".key" for path in files)
    for path, data in files.items():
        assert MARK.encode() not in data, path
        assert b'"state"' not in data, path


async def test_checkpoints_and_compaction_stay_encrypted_and_round_trip(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a store that compacts early, so snapshots are rewritten many times
    key = os.urandom(32)
    store = FileStore(tmp_path, encryption_key=key, compact_bytes=1)

    # When many checkpoints are committed
    session = await stored_session(store, secret_session(make_session), 12)

    # Then every record is sealed, the session reads back whole, and nothing is in clear
    assert await load(tmp_path, session.id, key) == session
    for path, data in every_file(tmp_path).items():
        assert MARK.encode() not in data, path
    snapshot = (folder_of(tmp_path, session.id) / "snapshot").read_bytes()
    assert all(f.flags == codec.FLAG_ENCRYPTED for f in codec.scan_frames(snapshot, "s").frames)


async def test_key_files_are_0600_in_a_0700_folder_apart_from_the_records(
    tmp_path: Path, make_session: MakeSession
) -> None:
    old = os.umask(0)
    try:
        session = await stored_session(
            FileStore(tmp_path, encryption_key=generate_key()), make_session(), 1
        )
    finally:
        os.umask(old)

    keys = tmp_path / ".keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    key_file = keys / f"{session.id}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not any(p.suffix == ".key" for p in folder_of(tmp_path, session.id).iterdir())


async def test_a_symlink_in_place_of_a_key_file_or_the_key_folder_is_refused(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an encrypted session whose key file is replaced by a symlink to a copy
    key = generate_key()
    root = tmp_path / "store"
    session = await stored_session(FileStore(root, encryption_key=key), make_session(), 1)
    key_file = root / ".keys" / f"{session.id}.key"
    elsewhere = tmp_path / "elsewhere.key"
    key_file.rename(elsewhere)
    key_file.symlink_to(elsewhere)

    # Then the store refuses to follow it
    with pytest.raises(StorageError):
        await load(root, session.id, key)

    # And a symlinked key folder is refused too
    key_file.unlink()
    elsewhere.rename(key_file)
    (root / ".keys").rename(tmp_path / "keys-elsewhere")
    (root / ".keys").symlink_to(tmp_path / "keys-elsewhere")
    with pytest.raises(StorageError, match="not a folder"):
        await load(root, session.id, key)


# -- keys ----------------------------------------------------------------------------------


async def test_raw_bytes_and_their_base64_are_the_same_key(
    tmp_path: Path, make_session: MakeSession
) -> None:
    raw = os.urandom(32)
    session = await stored_session(FileStore(tmp_path, encryption_key=raw), make_session(), 1)

    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        assert await load(tmp_path, session.id, text) == session
        assert await load(tmp_path, session.id, f"  {text}\n") == session
    assert not (tmp_path / ".keys" / "kdf-salt.key").exists()  # raw keys need no salt


async def test_a_passphrase_is_stretched_with_the_stores_own_salt(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given the same passphrase on two stores
    first, second = tmp_path / "first", tmp_path / "second"
    session = await stored_session(FileStore(first, encryption_key="hunter2"), make_session(), 1)
    await stored_session(FileStore(second, encryption_key="hunter2"), make_session(), 0)

    # Then each has a random salt of its own, and the passphrase reads its sessions
    salts = [(root / ".keys" / "kdf-salt.key").read_bytes() for root in (first, second)]
    assert salts[0] != salts[1]
    assert await load(first, session.id, "hunter2") == session

    # But the session's files and key moved under the other salt cannot be read:
    # the key is derived from passphrase and salt, never from a bare hash
    shutil.copytree(folder_of(first, session.id), folder_of(second, session.id))
    shutil.copy(first / ".keys" / f"{session.id}.key", second / ".keys")
    with pytest.raises(DecryptionError, match="master key"):
        await load(second, session.id, "hunter2")


async def test_a_damaged_salt_is_a_decryption_error_and_changes_nothing(
    tmp_path: Path, make_session: MakeSession
) -> None:
    session = await stored_session(FileStore(tmp_path, encryption_key="pass"), make_session(), 1)
    salt = tmp_path / ".keys" / "kdf-salt.key"
    salt.write_bytes(salt.read_bytes()[:-1])
    before = every_file(tmp_path)

    with pytest.raises(DecryptionError, match="salt"):
        await load(tmp_path, session.id, "pass")
    assert every_file(tmp_path) == before


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (b"short", "32 bytes"),
        (os.urandom(33), "32 bytes"),
        ("", "empty"),
        (12345, "bytes or str"),
        ("\udcff", "valid text"),
    ],
)
def test_a_malformed_key_is_refused_at_once(tmp_path: Path, key: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        FileStore(tmp_path, encryption_key=key)
    assert not tmp_path.joinpath(".keys").exists()


async def test_base64_that_is_not_32_bytes_is_a_passphrase(
    tmp_path: Path, make_session: MakeSession
) -> None:
    raw = os.urandom(16)
    text = base64.b64encode(raw).decode()
    await stored_session(FileStore(tmp_path, encryption_key=text), make_session(), 0)

    assert (tmp_path / ".keys" / "kdf-salt.key").exists()


def test_key_rings_read_from_the_environment() -> None:
    new, old1, old2 = generate_key(), generate_key(), "an old passphrase"

    ring = KeyRing.from_env(
        {"SESSION_ENCRYPTION_KEY": new, "SESSION_ENCRYPTION_OLD_KEYS": f"{old1}, {old2} ,"}
    )

    assert ring is not None
    assert [s.passphrase for s in ring.secrets] == [False, False, True]
    assert KeyRing.from_env({"SESSION_ENCRYPTION_KEY": ""}) is None
    assert KeyRing.from_env({}) is None
    with pytest.raises(InvalidArgumentError, match="SESSION_ENCRYPTION_KEY is not"):
        KeyRing.from_env({"SESSION_ENCRYPTION_OLD_KEYS": old1})
    assert new not in repr(ring)


# -- tampering -----------------------------------------------------------------------------


async def test_every_single_byte_flip_of_an_encrypted_session_is_detected(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a small encrypted session: a snapshot, two checkpoints and a key file
    key = generate_key()
    store = FileStore(tmp_path, encryption_key=key, durability="none")
    session = await stored_session(store, secret_session(make_session), 1)
    before_last = session.model_copy(deep=True)
    lease = await store.acquire(session.id, "test")
    assert lease is not None
    last = checkpoint(session, 1)
    await store.commit(lease, last)
    await store.release(lease)
    session.apply(last)
    folder = folder_of(tmp_path, session.id)
    files = [folder / "snapshot", folder / "journal", tmp_path / ".keys" / f"{session.id}.key"]
    last_record = codec.scan_frames(files[1].read_bytes(), "j").frames[-1]
    flips = 0

    # When each byte of each file is flipped in turn
    for path in files:
        original = path.read_bytes()
        for offset in range(len(original)):
            damaged = bytearray(original)
            damaged[offset] ^= 0xFF
            path.write_bytes(bytes(damaged))
            reader = FileStore(tmp_path, encryption_key=key)
            try:
                loaded = await reader.load(session.id)
            except (CorruptSessionError, DecryptionError):
                flips += 1
                continue
            finally:
                path.write_bytes(original)
            # Then the only flip that loads is inside the last record: it reads as a
            # torn (never acknowledged) tail, drops that record, and verify reports it
            # (a power cut can leave a record's body without its header, or the reverse)
            in_last_record = path == files[1] and offset >= last_record.offset
            assert in_last_record, f"{path.name} offset {offset}: tampering was accepted"
            assert loaded == before_last
            flips += 1
    assert flips == sum(len(p.read_bytes()) for p in files)
    assert await load(tmp_path, session.id, key) == session


async def test_records_swapped_between_sessions_are_detected(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given two encrypted sessions with one checkpoint each
    key = generate_key()
    store = FileStore(tmp_path, encryption_key=key)
    first = await stored_session(store, make_session(), 1)
    second = await stored_session(store, make_session(), 1)
    keys = tmp_path / ".keys"

    for name in ("journal", "snapshot"):
        # When one session's record is put in the other's place
        target = folder_of(tmp_path, second.id) / name
        original = target.read_bytes()
        shutil.copy(folder_of(tmp_path, first.id) / name, target)

        # Then loading it fails: the record names another session's data key
        with pytest.raises(CorruptSessionError, match="not a key of session"):
            await load(tmp_path, second.id, key)
        target.write_bytes(original)

    # And moving the key file along does not help: it is bound to its session's id
    shutil.copy(folder_of(tmp_path, first.id) / "journal", folder_of(tmp_path, second.id))
    shutil.copy(keys / f"{first.id}.key", keys / f"{second.id}.key")
    with pytest.raises(DecryptionError, match="fails authentication"):
        await load(tmp_path, second.id, key)


async def test_reordered_or_replayed_records_are_detected(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an encrypted session with three checkpoints
    key = generate_key()
    session = await stored_session(FileStore(tmp_path, encryption_key=key), make_session(), 3)
    journal = folder_of(tmp_path, session.id) / "journal"
    one, two, three = records(journal.read_bytes())

    # When two records swap places, their sequence numbers give it away
    journal.write_bytes(one + three + two)
    with pytest.raises(CorruptSessionError, match="does not follow"):
        await load(tmp_path, session.id, key)

    # When an attacker also rewrites the sequence numbers (with valid checksums),
    # the sequence number bound into each record's tag gives it away
    journal.write_bytes(one + reseq(three, 2) + reseq(two, 3))
    with pytest.raises(CorruptSessionError, match="fails authentication"):
        await load(tmp_path, session.id, key)

    # And replaying a record in a later position is caught the same way
    journal.write_bytes(one + two + reseq(two, 3))
    with pytest.raises(CorruptSessionError, match="fails authentication"):
        await load(tmp_path, session.id, key)


async def test_a_record_in_clear_inside_an_encrypted_session_is_corruption(
    tmp_path: Path, make_session: MakeSession
) -> None:
    key = generate_key()
    session = await stored_session(FileStore(tmp_path, encryption_key=key), make_session(), 1)
    journal = folder_of(tmp_path, session.id) / "journal"
    forged = codec.encode_model(2, checkpoint(session, 1), "forged")  # well formed, in clear
    journal.write_bytes(journal.read_bytes() + forged)

    with pytest.raises(CorruptSessionError, match="in clear inside an encrypted session"):
        await load(tmp_path, session.id, key)


# -- wrong, missing and rotated keys -------------------------------------------------------


async def test_a_wrong_or_missing_key_names_the_key_and_changes_nothing(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an expired encrypted session written under one key (no checkpoint: one
    # would slide its expiry an hour ahead)
    right = generate_key()
    session = make_session(expires_at=utcnow() - timedelta(seconds=1))
    await stored_session(FileStore(tmp_path, encryption_key=right), session, 0)
    before = every_file(tmp_path)

    for key, message in [(generate_key(), "which this store was not given"), (None, "without")]:
        # When a store with the wrong key, or none, reads, cleans up, writes and rekeys
        store = FileStore(tmp_path, encryption_key=key)
        manager = SessionManager(store, cleanup_interval=None)

        # Then every read is a DecryptionError naming the missing key, never "corrupt"
        with pytest.raises(DecryptionError, match=message) as caught:
            await store.load(session.id)
        assert key_id(right) in str(caught.value)
        rows = await store.list()
        assert [row.id for row in rows] == [session.id]
        assert rows[0].problem is not None
        assert key_id(right) in rows[0].problem
        # cleanup skips the expired session it cannot read, and says so
        result = await manager.perform_cleanup()
        assert result.cleaned_sessions == 0
        assert list(result.skipped) == [session.id]
        # writes refuse, because they read first
        lease = await store.acquire(session.id, "test")
        assert lease is not None
        with pytest.raises(DecryptionError):
            await store.commit(lease, checkpoint(session, 9))
        await store.release(lease)
        with pytest.raises(DecryptionError):
            await store.save(session)
        check = await store.check(session.id)
        assert check.verdict == "undecryptable"
        with pytest.raises(StorageError, match="not corrupt"):
            await store.quarantine(session.id)
        if key is not None:
            with pytest.raises(DecryptionError):
                await store.rekey(session.id)
        await manager.close()

        # And not a byte changed
        assert every_file(tmp_path) == before


async def test_a_rotated_key_reads_old_sessions_and_writes_new_ones(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a session under the old key
    old, new = generate_key(), "the new passphrase"
    first = await stored_session(FileStore(tmp_path, encryption_key=old), make_session(), 1)

    # When the store is opened with the new key as active and the old one for reading
    rotated = FileStore(tmp_path, encryption_key=KeyRing(new, old=[old]))
    second = await stored_session(rotated, make_session(), 1)

    # Then it reads the old session and writes on under it, and the new session
    # needs only the new key
    assert await rotated.load(first.id) == first
    lease = await rotated.acquire(first.id, "test")
    assert lease is not None
    step = checkpoint(first, 1)
    await rotated.commit(lease, step)
    first.apply(step)
    await rotated.release(lease)
    assert await load(tmp_path, first.id, KeyRing(new, old=[old])) == first
    assert await load(tmp_path, second.id, new) == second
    with pytest.raises(DecryptionError, match=key_id(old)):
        await load(tmp_path, first.id, new)

    # And after a rekey, the old key is needed by nothing
    assert await rotated.rekey(first.id) == "rekeyed"
    assert await rotated.rekey(second.id) == "current"
    assert await load(tmp_path, first.id, new) == first
    assert await load(tmp_path, second.id, new) == second


async def test_rekey_encrypts_a_session_written_in_clear(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a session written before encryption was turned on
    session = await stored_session(FileStore(tmp_path), secret_session(make_session), 2)
    key = generate_key()
    store = FileStore(tmp_path, encryption_key=key)

    # Then an encrypted store still reads it, and verify says it is in clear
    assert await store.load(session.id) == session
    assert (await store.check(session.id)).detail == "in clear"

    # When it is rekeyed, it is encrypted and nothing of it stays in clear
    assert await store.rekey(session.id) == "rekeyed"
    assert await load(tmp_path, session.id, key) == session
    assert (await FileStore(tmp_path, encryption_key=key).check(session.id)).detail == "encrypted"
    for path, data in every_file(tmp_path).items():
        assert MARK.encode() not in data, path


@pytest.mark.parametrize("stop_at", ["pending key", "rewrite", "final key"])
async def test_a_rekey_stopped_after_any_write_loses_nothing_and_a_rerun_finishes(
    tmp_path: Path,
    make_session: MakeSession,
    monkeypatch: pytest.MonkeyPatch,
    stop_at: str,
) -> None:
    # Given a session under the old key, with a checkpoint in its journal
    old, new = generate_key(), generate_key()
    session = await stored_session(FileStore(tmp_path, encryption_key=old), make_session(), 2)
    ring = KeyRing(new, old=[old])

    # When the rekey's write number N fails (as a crash right there would leave it)
    calls: list[str] = []
    real_put, real_replace = file_keys.KeyFiles.put_key, FileStore._replace_whole

    def put_key(self: file_keys.KeyFiles, name: str, record: bytes) -> None:
        calls.append("pending key" if "pending key" not in calls else "final key")
        if calls[-1] == stop_at:
            raise OSError("injected crash")
        real_put(self, name, record)

    def replace_whole(self: FileStore, *args: Any) -> None:
        calls.append("rewrite")
        if stop_at == "rewrite":
            raise OSError("injected crash")
        real_replace(self, *args)

    monkeypatch.setattr(file_keys.KeyFiles, "put_key", put_key)
    monkeypatch.setattr(FileStore, "_replace_whole", replace_whole)
    with pytest.raises(StorageError, match="injected crash"):
        await FileStore(tmp_path, encryption_key=ring).rekey(session.id)
    monkeypatch.undo()

    # Then the session reads whole, and a rerun finishes the rekey
    assert await load(tmp_path, session.id, ring) == session
    assert await FileStore(tmp_path, encryption_key=ring).rekey(session.id) == "rekeyed"
    assert await load(tmp_path, session.id, new) == session
    assert await FileStore(tmp_path, encryption_key=ring).rekey(session.id) == "current"


def rekey_process(root: Path, new: str, old: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "STEPVAULT_"))}
    env |= {"SESSION_ENCRYPTION_KEY": new, "SESSION_ENCRYPTION_OLD_KEYS": old}
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "rekey", "--store", str(root), "--json"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def rekeyed_ids(root: Path, ids: list[str], new: str) -> set[str]:
    """Sessions whose key file is already current under ``new`` (read from outside)."""
    encryption = Encryption(KeyRing(new))
    done = set()
    for session_id in ids:
        record = (root / ".keys" / f"{session_id}.key").read_bytes()
        if encryption.is_current(session_id, record):
            done.add(session_id)
    return done


async def test_rekey_killed_mid_run_loses_nothing_and_a_rerun_finishes(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given many sessions under the old key
    old, new = generate_key(), generate_key()
    store = FileStore(tmp_path, encryption_key=old, durability="none")
    sessions = [await stored_session(store, make_session(), i % 3) for i in range(150)]
    ids = [session.id for session in sessions]

    # When `stepvault rekey` is killed with SIGKILL twice, soon after it starts work
    for round_ in (1, 2):
        process = rekey_process(tmp_path, new, old)
        deadline = time.monotonic() + 60
        while len(rekeyed_ids(tmp_path, ids, new)) < 10 * round_:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "rekey made no progress"
            await asyncio.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
        if process.stderr:
            process.stderr.close()
        done = rekeyed_ids(tmp_path, ids, new)
        assert len(done) < len(ids), "rekey finished before it could be interrupted"

        # Then every session still reads whole with the key ring
        ring = KeyRing(new, old=[old])
        for session in sessions:
            assert await load(tmp_path, session.id, ring) == session

    # When it runs again, to the end
    process = rekey_process(tmp_path, new, old)
    assert process.wait(timeout=120) == 0
    if process.stderr:
        process.stderr.close()

    # Then every session is under the new key alone, unchanged
    assert rekeyed_ids(tmp_path, ids, new) == set(ids)
    for session in sessions:
        assert await load(tmp_path, session.id, new) == session


# -- crypto-shredding --------------------------------------------------------------------


async def test_a_shredded_sessions_copied_files_cannot_be_decrypted(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given an encrypted session, and a copy of its files (a backup, a lost disk)
    key = generate_key()
    root = tmp_path / "sessions"
    store = FileStore(root, encryption_key=key)
    manager = SessionManager(store, cleanup_interval=None)
    session = await stored_session(store, secret_session(make_session), 2)
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copytree(folder_of(root, session.id), folder_of(backup, session.id))
    # (the copy is real: with the live key folder it reads back whole)
    with_keys = FileStore(backup, encryption_key=key, keys_path=root / ".keys")
    assert await with_keys.load(session.id) == session

    # When the session is removed with shred=True (while another store has its key cached)
    watcher = FileStore(root, encryption_key=key)
    assert await watcher.load(session.id) == session
    assert await manager.remove_session(session.id, shred=True) is True

    # Then its data key is gone, and the copy cannot be decrypted, even with the master key
    assert not (root / ".keys" / f"{session.id}.key").exists()
    assert not folder_of(root, session.id).exists()
    with pytest.raises(DecryptionError, match="no data key"):
        await FileStore(backup, encryption_key=key, keys_path=root / ".keys").load(session.id)
    shutil.copytree(folder_of(backup, session.id), folder_of(root, session.id))
    with pytest.raises(DecryptionError, match="shredded"):
        await load(root, session.id, key)
    with pytest.raises(DecryptionError, match="shredded"):
        await watcher.load(session.id)
    assert (await FileStore(root, encryption_key=key).check(session.id)).verdict == (
        "undecryptable"
    )
    await manager.close()


async def test_a_shred_interrupted_after_the_key_is_finished_by_another(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a shred that destroyed the key and stopped before removing the files
    key = generate_key()
    session = await stored_session(FileStore(tmp_path, encryption_key=key), make_session(), 1)
    (tmp_path / ".keys" / f"{session.id}.key").unlink()

    # When it is shredded again (by a store without the key, even)
    assert await FileStore(tmp_path).shred(session.id) is True

    # Then nothing of it is left
    assert not folder_of(tmp_path, session.id).exists()
    assert await FileStore(tmp_path).shred(session.id) is False


async def test_shredding_a_session_in_clear_is_refused_and_removes_nothing(
    tmp_path: Path, make_session: MakeSession
) -> None:
    session = await stored_session(FileStore(tmp_path), make_session(), 1)
    manager = SessionManager(FileStore(tmp_path), cleanup_interval=None)

    with pytest.raises(StorageError, match="stored in clear"):
        await manager.remove_session(session.id, shred=True)
    assert await load(tmp_path, session.id) == session

    memory = SessionManager(MemoryStore(), cleanup_interval=None)
    kept = await memory.create_session()
    with pytest.raises(EngineError, match="cannot shred"):
        await memory.remove_session(kept.id, shred=True)
    assert await memory.get_session(kept.id) is not None
    await manager.close()
    await memory.close()


async def test_removing_an_encrypted_session_removes_its_key_too(
    tmp_path: Path, make_session: MakeSession
) -> None:
    key = generate_key()
    session = await stored_session(FileStore(tmp_path, encryption_key=key), make_session(), 1)
    manager = SessionManager(FileStore(tmp_path, encryption_key=key), cleanup_interval=None)

    assert await manager.remove_session(session.id) is True

    assert list((tmp_path / ".keys").glob("*.key")) == []
    assert await manager.remove_session(str(uuid.uuid4())) is False
    await manager.close()


async def test_an_id_created_again_after_another_store_removed_it_gets_a_fresh_key(
    tmp_path: Path, make_session: MakeSession
) -> None:
    # Given a store that has read a session (and holds its keys), which another removes
    key = generate_key()
    reader, remover = (FileStore(tmp_path, encryption_key=key) for _ in range(2))
    old = await stored_session(reader, make_session(), 1)
    assert await reader.load(old.id) == old
    assert await remover.delete(old.id) is True

    # When the first store creates a session with the same id again
    new = make_session(id=old.id, state={"again": True})
    await reader.create(new)

    # Then the new session has a key of its own, and any store reads it
    assert (tmp_path / ".keys" / f"{new.id}.key").exists()
    assert await load(tmp_path, new.id, key) == new
