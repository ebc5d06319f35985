"""The file store's compaction: folding a session's journal into a new snapshot.

A checkpoint costs one append, whatever the session's history. Once the journal
outgrows the snapshot (and ``compact_bytes``), the lease holder writes the whole
session as the new snapshot and empties the journal, which keeps loading bounded
while the copying stays amortised constant per byte. Posted events a durable
checkpoint has absorbed are dropped from the inbox the same way. Each function
takes the store: it works on the store's cached journal tails and keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import codec
from ..errors import EngineError
from ..log import get_logger
from . import file_inbox, file_reads
from .file_inbox import INBOX

if TYPE_CHECKING:
    from .file import FileStore
    from .file_records import Tail

_log = get_logger()


def limit(store: FileStore, tail: Tail) -> int:
    """Return the size past which the journal (or the inbox) is folded into the snapshot."""
    return max(store.compact_bytes, tail.snapshot_size)


def due(store: FileStore, session_id: str, absorbs: int | None) -> bool:
    """Tell whether the journal (or the inbox, when events are absorbed) outgrew its limit."""
    tail = store._tails.get(session_id)
    if tail is None:
        return False
    most = limit(store, tail)
    return tail.end > most or (absorbs is not None and file_inbox.size(tail.folder) > most)


def compact_if_due(store: FileStore, session_id: str, absorbs: int | None) -> None:
    """Compact the journal if it outgrew the limit, else the inbox if it did."""
    tail = store._tails.get(session_id)
    if tail is None:
        return
    most = limit(store, tail)
    if tail.end > most:
        _compact_quietly(store, session_id)
    elif absorbs is not None and file_inbox.size(tail.folder) > most:
        compact_inbox_quietly(store, tail.folder, session_id, absorbs)


def _compact_quietly(store: FileStore, session_id: str) -> None:
    """Fold the journal into the snapshot; a failure here loses nothing committed."""
    try:
        found = file_reads.read_session(store, session_id)
        if found is not None:
            session = found[0]
            folder = store._root() / session_id
            frame = codec.encode_model(
                session.revision, session, f"session {session_id}", store._keys(session_id)
            )
            store._replace_whole(folder, frame, session)
            compact_inbox(store, folder, session_id, session.inbox_seq)
    except (OSError, EngineError) as exc:
        store._forget_tail(session_id)
        _log.warning("compaction.failed", session_id=session_id, error=str(exc))


def compact_inbox(
    store: FileStore, folder: Path, session_id: str, absorbed: int, *, reseal: bool = False
) -> None:
    """Drop the posted events numbered ``absorbed`` or less: the session holds them.

    Only once a durable checkpoint (or snapshot) says so. With ``reseal``, every
    record left is sealed again under the session's current keys (a rekey).
    """
    if file_inbox.size(folder) == 0:
        return
    with file_inbox.locked(folder, session_id):
        rewrite_inbox(store, folder, session_id, absorbed, reseal=reseal)


def rewrite_inbox(
    store: FileStore, folder: Path, session_id: str, absorbed: int, *, reseal: bool = False
) -> None:
    """``compact_inbox``'s work, for a caller that holds ``inbox.lock`` already."""
    keys = store._keys(session_id)
    data = file_inbox.read(folder)
    posted = file_inbox.decode(data, folder / INBOX, keys, above=absorbed)
    if posted.absorbed or (reseal and posted.size) or posted.end != posted.size:
        rewritten = file_inbox.rewritten(posted, keys, session_id)
        file_inbox.replace(folder, rewritten, sync=store._sync)


def compact_inbox_quietly(store: FileStore, folder: Path, session_id: str, absorbed: int) -> None:
    """Drop absorbed events; a failure loses nothing (loads skip them anyway)."""
    try:
        compact_inbox(store, folder, session_id, absorbed)
    except (OSError, EngineError) as exc:
        _log.warning("compaction.failed", session_id=session_id, error=str(exc))
