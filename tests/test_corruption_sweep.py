"""Every single-byte flip and every truncation of a small session's files.

A session is created and two checkpoints are committed, so every revision it
went through is known. Then each file of it (the snapshot, the journal, the lock
file a crashed runner left, and with encryption the session's key file) is
damaged in turn: each byte replaced by ``byte ^ mask`` for each mask, and the file
cut at every length. Each damaged copy is loaded by a new store, which must:

- detect it (``CorruptSessionError``, or ``DecryptionError`` for a sealed record
  or a key file), and then change no byte and still list the session, with its
  problem; or
- load exactly a revision the session went through: all of it, or (damage in the
  journal's last record, or a cut through it) the revision before, the last record
  dropped as a torn, never acknowledged tail; a cut through an earlier record
  loads the revision the whole records before the cut make, never a mix.

Never wrong data, never another exception. ``test_file_store.py`` and
``test_encryption.py`` cover single cases and 0xFF flips; this is the sweep.

Size: ``STEPVAULT_CORRUPTION_VALUES`` flip masks per byte (default 1: the lowest
bit; then the highest bit, all bits, and the rest: 255 tries every other value of
every byte, as the long run in benchmarks/torture.py does).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from checkpoints import applied
from reliability_report import report

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    FileStore,
    Session,
    codec,
)
from engine.models import utcnow

VALUES = int(os.environ.get("STEPVAULT_CORRUPTION_VALUES", "1"))
_FIRST_MASKS = [0x01, 0x80, 0xFF]  # a low bit, a high bit, every bit; then the rest
MASKS = (_FIRST_MASKS + [mask for mask in range(1, 256) if mask not in _FIRST_MASKS])[:VALUES]
KEY = os.urandom(32)  # a raw AES-256 key: no passphrase stretching per load


@dataclass
class SweepTally:
    """How the damaged copies loaded."""

    cases: int = 0
    detected: int = 0
    whole: int = 0
    tail_dropped: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.violations.append(message)


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place (cheaper than truncating it to zero and refilling it)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def held_by_a_dead_runner(root: Path, session_id: str, lock: bytes, encrypted: bool) -> list[Path]:
    """Put back the lock file a dead runner left; return the session's files."""
    folder = root / session_id
    write(folder / "lock", lock)
    files = [folder / "snapshot", folder / "journal", folder / "lock"]
    if encrypted:
        files += sorted((root / ".keys").glob(f"{session_id}*"))
    return files


def small_checkpoint(session: Session, index: int) -> Checkpoint:
    now = utcnow()
    return Checkpoint(
        revision=session.revision + 1,
        status="completed" if index == 1 else "running",
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        step=f"s{index}",
        output=index * 11,
        state_set={f"k{index}": index},
    )


async def build_session(root: Path, encrypted: bool) -> tuple[Session, list[Session], bytes]:
    """Create a session with two checkpoints; return it, its revisions, and a held lock."""
    store = FileStore(root, encryption_key=KEY if encrypted else None, compact_bytes=1 << 30)
    now = utcnow()
    session = Session(
        id=str(uuid.uuid4()),
        created_at=now,
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        ttl=3600.0,
        state={"seed": 1},
    )
    await store.create(session)
    history = [session.model_copy(deep=True)]
    lease = await store.acquire(session.id, "crashed-runner")
    assert lease is not None
    for index in range(2):
        checkpoint = small_checkpoint(history[-1], index)
        await store.commit(lease, checkpoint)
        history.append(applied(history[-1], checkpoint))
    # What the lock file holds when its runner dies holding it
    held_lock = read(root / session.id / "lock")
    await store.close()
    return history[-1], history, held_lock


def damaged_copies(original: bytes) -> list[tuple[str, bytes]]:
    """Every flip (for each mask) and every truncation of ``original``, labelled."""
    copies = []
    for offset in range(len(original)):
        for mask in MASKS:
            damaged = bytearray(original)
            damaged[offset] ^= mask
            copies.append((f"byte {offset} ^ {mask:#04x}", bytes(damaged)))
    copies += [(f"cut to {length} bytes", original[:length]) for length in range(len(original))]
    return copies


def allowed_revisions(name: str, original: bytes, label: str, damaged: bytes) -> range:
    """Return the revisions a damaged copy of file ``name`` may load as."""
    if name == "lock":
        return range(2, 3)  # the lock holds no data: the whole session, always
    if name != "journal":
        return range(0)  # the snapshot and the key file: only detection will do
    frames = codec.scan_frames(original, "journal").frames
    if label.startswith("cut"):
        kept = [frame for frame in frames if frame.end <= len(damaged)]
        revision = kept[-1].seq if kept else frames[0].seq - 1
        return range(revision, revision + 1)  # the whole records before the cut
    offset = int(label.split()[1])
    last = frames[-1]
    if offset >= last.offset:
        return range(last.seq - 1, last.seq + 1)  # at worst, dropped as a torn tail
    return range(last.seq, last.seq + 1)


@dataclass
class Damage:
    """One damaged copy of one file of the session."""

    path: Path
    name: str
    label: str
    original: bytes
    damaged: bytes

    @property
    def where(self) -> str:
        return f"{self.name}: {self.label}"


async def check_damage(
    store: FileStore, damage: Damage, history: list[Session], tally: SweepTally
) -> None:
    """Load the damaged session; tally what happened, and any violation."""
    session_id = history[-1].id
    try:
        loaded = await store.load(session_id)
    except (CorruptSessionError, DecryptionError) as exc:
        tally.detected += 1
        # Then nothing was repaired behind our back, and the listing reports it
        rows = await store.list()
        tally.check(
            read(damage.path) == damage.damaged,
            f"{damage.where}: {type(exc).__name__}, yet the file changed",
        )
        tally.check(
            [(row.id, row.problem is not None) for row in rows] == [(session_id, True)],
            f"{damage.where}: detected, yet listed as {rows}",
        )
        return
    except Exception as exc:  # anything else is a bug: report it with the rest
        tally.violations.append(f"{damage.where}: raised {exc!r}")
        return
    allowed = allowed_revisions(damage.name, damage.original, damage.label, damage.damaged)
    if loaded is None or loaded.revision not in allowed or loaded != history[loaded.revision]:
        got = "nothing" if loaded is None else f"revision {loaded.revision}"
        tally.violations.append(f"{damage.where}: loaded {got}, allowed {list(allowed)}")
    elif loaded == history[-1]:
        tally.whole += 1
    else:
        tally.tail_dropped += 1
    if damage.name == "lock":  # a damaged lock file must not keep runners out
        lease = await store.acquire(session_id, "next-runner")
        tally.check(lease is not None, f"{damage.where}: the session can no longer be leased")
        if lease is not None:
            await store.release(lease)


async def sweep_file(
    root: Path, path: Path, history: list[Session], tally: SweepTally, encrypted: bool
) -> None:
    """Load every damaged copy of ``path``; put the original back after each."""
    original = read(path)
    name = path.name if path.parent.name != ".keys" else "key file"
    for label, damaged in damaged_copies(original):
        tally.cases += 1
        write(path, damaged)
        store = FileStore(root, encryption_key=KEY if encrypted else None)
        try:
            await check_damage(store, Damage(path, name, label, original, damaged), history, tally)
        finally:
            await store.close()
            write(path, original)


@pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])
async def test_every_flip_and_cut_of_every_file_is_detected_or_loads_a_known_revision(
    tmp_path: Path, encrypted: bool
) -> None:
    # Given a small session with two checkpoints, whose runner died holding it
    session, history, held_lock = await build_session(tmp_path, encrypted)
    files = held_by_a_dead_runner(tmp_path, session.id, held_lock, encrypted)

    # When each file is damaged in every way in turn
    tally = SweepTally()
    for path in files:
        await sweep_file(tmp_path, path, history, tally, encrypted)

    # Then every damage was detected or loaded a revision the session really had
    size = sum(len(read(path)) for path in files)
    report(
        f"corruption: {'encrypted' if encrypted else 'clear'}",
        size=f"{len(files)} files, {size} bytes, {len(MASKS)} flip(s) a byte, every cut",
        cases=tally.cases,
        found=tally.detected,
        survived=tally.whole + tally.tail_dropped,
        lost=len(tally.violations),
        loaded_whole=tally.whole,
        tail_dropped=tally.tail_dropped,
    )
    shown = "\n".join(tally.violations[:12])
    assert tally.violations == [], f"{len(tally.violations)} of {tally.cases}:\n{shown}"
    assert tally.detected > 0
    assert tally.tail_dropped > 0
    # And the untouched files still load the whole session
    store = FileStore(tmp_path, encryption_key=KEY if encrypted else None)
    assert await store.load(session.id) == session
    await store.close()
