"""The file store's security and integrity operations: shred, check, quarantine, rekey.

Each function runs on a worker thread for one ``FileStore`` method and takes the
store itself: they work through its folders, leases and cached keys, the same
bookkeeping its storage primitives keep, so no second copy of it can drift.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .. import codec
from ..crypto import RekeyOutcome
from ..errors import (
    CorruptSessionError,
    DecryptionError,
    EngineError,
    SessionBusyError,
    SessionNotFoundError,
    StorageError,
)
from . import file_compaction, file_expiry, file_inbox, file_index, file_reads
from .base import Lease
from .file_inbox import INBOX
from .file_records import JOURNAL, SNAPSHOT
from .fsutil import private_folder, read_file

if TYPE_CHECKING:
    from .file import FileStore

QUARANTINE = ".quarantine"


def shred(store: FileStore, session_id: str) -> bool:
    """Destroy the session's data key, then its folder; return whether either existed."""
    folder = store._session_dir(session_id)
    if folder is None:  # a key left behind by an interrupted remove is shredded too
        return _destroy_key(store, session_id)
    try:
        # Under the inbox lock: a rekey holds it while it rewrites the key file, and
        # would otherwise write back the very key destroyed here.
        with file_inbox.locked(folder, session_id):
            destroyed = _destroy_key(store, session_id)
    except SessionNotFoundError:  # removed meanwhile: its key may be all that is left
        return _destroy_key(store, session_id)
    if not destroyed and not _sealed(folder / SNAPSHOT):
        raise StorageError(
            f"session {session_id} is stored in clear: it can be removed, but it has "
            "no data key to shred"
        )
    if not destroyed and not store.keys_path.is_dir():
        # Its key must be somewhere else (a keys folder not mounted, or not this
        # one): deleting the records would report a shred that left the key alive.
        raise StorageError(
            f"session {session_id} is encrypted but the keys folder {store.keys_path} "
            "is missing: its data key cannot be destroyed, so nothing was removed"
        )
    return store._delete_sync(session_id)


def _destroy_key(store: FileStore, session_id: str) -> bool:
    destroyed = store._vault.delete_key(session_id)  # first: from here on, copies are dead
    store._forget_keys(session_id)
    return destroyed


def check(store: FileStore, session_id: str) -> codec.SessionCheck:
    """Check every live record of the session, and report the first problem found."""
    folder = store._root() / session_id
    for retried in (False, True):
        try:
            found = file_reads.read_session(store, session_id)
            keys = store._keys(session_id)
            posted = file_inbox.decode(file_inbox.read(folder), folder / INBOX, keys)
            break
        except (DecryptionError, CorruptSessionError) as exc:
            if not retried:
                # Rekeyed by another process between reading the session and its
                # inbox? Read both again with the keys as they are now.
                store._forget_keys(session_id)
                continue
            verdict: codec.Verdict = (
                "undecryptable" if isinstance(exc, DecryptionError) else "corrupt"
            )
            return codec.SessionCheck(session_id, verdict, str(exc))
        except (StorageError, OSError) as exc:  # a symlink in place, permissions, I/O
            return codec.SessionCheck(session_id, "unreadable", str(exc))
    if found is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    journal, tail = folder / JOURNAL, found[1]
    reserved = tail.size > tail.end  # zeros after the records: space for the next ones
    size = tail.end if reserved or not journal.exists() else journal.lstat().st_size
    torn = _torn_tail(session_id, journal, size, tail.end) or _torn_tail(
        session_id, folder / INBOX, posted.size, posted.end
    )
    if torn is not None:
        return torn
    return codec.SessionCheck(session_id, "ok", "encrypted" if keys is not None else "in clear")


def quarantine(store: FileStore, session_id: str) -> str:
    """Move a corrupt session's folder into ``.quarantine``; return where it went.

    Checked again under the session's lock, so a rekey or a runner at work in
    another process (whose rewrite can read as damage mid-way) is never mistaken
    for corruption and moved away.
    """
    if not store._acquire_sync(Lease(session_id, "quarantine", next(store._tokens))):
        raise SessionBusyError(f"session {session_id} is in use: quarantine it once it is free")
    try:
        verdict = check(store, session_id).verdict
        if verdict != "corrupt":
            raise StorageError(
                f"session {session_id} is {verdict}, not corrupt: only corrupt sessions "
                "are quarantined"
            )
        return _move_aside(store, session_id)
    finally:
        store._unlock(session_id)


def _move_aside(store: FileStore, session_id: str) -> str:
    root = store._root()
    folder = private_folder(root / QUARANTINE, create=True)
    assert folder is not None  # created above
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{session_id}.{stamp}"
    # The key stays in place: the quarantined records stay readable for repair.
    (root / session_id).rename(target)
    store._sync_dir(root)
    store._sync_dir(folder)
    store._forget_tail(session_id)
    store._forget_keys(session_id)
    file_index.forget(root, session_id)
    file_expiry.forget(root, session_id)
    return str(target)


def rekey(store: FileStore, session_id: str) -> RekeyOutcome:
    """Rewrite the session under a fresh data key, holding its lease throughout."""
    encryption = store._encryption
    if encryption is None:
        raise EngineError("rekey needs an encryption key: set SESSION_ENCRYPTION_KEY")
    if not store._acquire_sync(Lease(session_id, "rekey", next(store._tokens))):
        return "busy"
    vault = store._vault
    try:
        encryption.prepare(vault)
        record = vault.get_key(session_id)
        if record is not None and encryption.is_current(session_id, record):
            return "current"
        found = file_reads.read_session(store, session_id)  # unreadable: raise, rewrite nothing
        if found is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        session, folder = found[0], store._root() / session_id
        # Senders wait until the rekey is done: one that read the key file before a
        # step below would seal its event under a key the next step drops.
        with file_inbox.locked(folder, session_id):
            # The inbox too: unreadable, raise and rewrite nothing.
            file_inbox.decode(file_inbox.read(folder), folder / INBOX, store._keys(session_id))
            in_use, clear_in_use = _keys_in_use(folder)
            # 1. the new data key joins the ones the records still use ...
            keys, record = encryption.begin_rekey(
                session_id, store._keys(session_id), in_use, clear_in_use
            )
            vault.put_key(session_id, record)
            encryption.remember(keys)
            # 2. ... the whole session is rewritten under it (atomically), posted
            # events too, their numbers kept ...
            what = f"session {session_id}"
            store._replace_whole(
                folder, codec.encode_model(session.revision, session, what, keys), session
            )
            file_compaction.rewrite_inbox(store, folder, session_id, session.inbox_seq, reseal=True)
            # 3. ... and only then are the old keys dropped.
            keys, record = encryption.finish_rekey(session_id, keys)
            vault.put_key(session_id, record)
            encryption.remember(keys)
        return "rekeyed"
    finally:
        store._unlock(session_id)


def _torn_tail(session_id: str, path: Path, size: int, end: int) -> codec.SessionCheck | None:
    """Report the bytes after a file's last complete record: an append never acknowledged."""
    if size <= end:
        return None
    cut_by = "next event posted" if path.name == INBOX else "next checkpoint"
    return codec.SessionCheck(
        session_id,
        "torn tail",
        f"{path}: {size - end} bytes after the last complete record (offset {end}): an "
        f"interrupted append, never acknowledged; the {cut_by} cuts it off",
    )


def _sealed(snapshot: Path) -> bool:
    """Tell whether a snapshot's record is encrypted (its header alone says so)."""
    head = read_file(snapshot, codec.HEADER_SIZE) or b""
    return len(head) == codec.HEADER_SIZE and bool(head[3] & codec.FLAG_ENCRYPTED)


def _keys_in_use(folder: Path) -> tuple[set[str], bool]:
    """Return the data key ids a session's live records use, and whether any is in clear."""
    snapshot = codec.scan_frames(read_file(folder / SNAPSHOT) or b"", str(folder / SNAPSHOT))
    journal = codec.scan_frames(read_file(folder / JOURNAL) or b"", str(folder / JOURNAL))
    revision = snapshot.frames[0].seq if snapshot.frames else 0
    live = snapshot.frames + [frame for frame in journal.frames if frame.seq > revision]
    ids = {codec.frame_key_id(frame) for frame in live} | file_inbox.key_ids(folder)
    return {key_id for key_id in ids if key_id is not None}, None in ids
