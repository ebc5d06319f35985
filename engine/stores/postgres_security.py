"""The PostgreSQL store's integrity operations: shred, quarantine, rekey.

Each runs inside a transaction the store opened on one pooled connection
(``conn``), with the store's formatted statements (``sql``); the store keeps the
bookkeeping (its leases, its cached keys) and turns driver errors into
``StorageError``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..crypto import Encryption, RekeyOutcome, SessionKeys
from ..errors import SessionNotFoundError
from ..models import Event, Session
from .postgres_sql import loaded_records
from .sql import (
    Rekeyed,
    decode_events,
    in_clear,
    open_records,
    rebuild_session,
    rekeyed,
    sealed_record,
)


async def shred(conn: Any, sql: dict[str, str], session_id: str) -> bool:
    """Delete the session's key row and its rows; return whether there was either.

    Raises:
        StorageError: the session is stored in clear (the caller's transaction
            rolls back: nothing is removed).
    """
    row = await conn.fetchrow(sql["lock_session"], session_id)
    destroyed: bool = await conn.execute(sql["delete_key"], session_id) == "DELETE 1"
    if not destroyed and row is not None and not sealed_record(row["snapshot"]):
        in_clear(session_id)
    existed = bool(await conn.fetchval(sql["delete"], session_id))
    return destroyed or existed


async def quarantine(conn: Any, sql: dict[str, str], session_id: str) -> Any:
    """Copy every record of the session (and its key) aside, then delete them.

    The caller has checked that the session is corrupt. Returns the ``moved_at``
    (the server's clock) the rows are filed under.
    """
    moved_at = await conn.fetchval("SELECT now()")
    # The key goes with the records: they stay readable for repair.
    await conn.execute(sql["quarantine"], session_id, moved_at)
    await conn.fetchval(sql["delete"], session_id)
    return moved_at


async def rekey(
    conn: Any, sql: dict[str, str], encryption: Encryption, session_id: str, source: str
) -> tuple[RekeyOutcome, SessionKeys | None]:
    """Rewrite the session under a fresh data key, holding its and its inbox's rows.

    Returns the outcome and, once rekeyed, the new keys (to cache after commit).

    Raises:
        SessionNotFoundError: no such session.
        EngineError: the session is unreadable (nothing is rewritten then).
    """
    locked = await conn.fetchrow(sql["lock_session"], session_id)
    if locked is None:
        raise SessionNotFoundError(f"session {session_id} not found")
    if locked["busy"]:
        return "busy", None
    await conn.fetchval(sql["lock_inbox"], session_id)  # posts wait for us
    row = await conn.fetchrow(sql["load"], session_id)
    key_record = row["key_record"]
    if key_record is not None and encryption.is_current(session_id, key_record):
        return "current", None
    new = await asyncio.to_thread(_rekeyed, encryption, session_id, row, source)
    await conn.execute(sql["rekey"], session_id, new.session.revision, new.snapshot)
    for seq, record in new.events:
        await conn.execute(sql["reseal_event"], session_id, seq, record)
    await conn.execute(sql["put_key"], session_id, new.key_record)
    return "rekeyed", new.keys


def _rekeyed(encryption: Encryption, session_id: str, row: Any, source: str) -> Rekeyed:
    """Decode a session's rows under its current keys and seal them anew."""
    # Missing last steps are refused: a rewrite would make the rollback permanent.
    steps, events = loaded_records(row, source)

    def decode(keys: SessionKeys | None) -> tuple[Session, list[Event]]:
        session = rebuild_session(
            source, session_id, row["snapshot"], row["snapshot_revision"], steps, (), keys
        )
        return session, decode_events(source, events, keys)

    session, posted = open_records(encryption, session_id, row["key_record"], decode)
    return rekeyed(encryption, session, posted)
