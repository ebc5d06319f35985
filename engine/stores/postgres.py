"""PostgresStore: one database shared by many runners on many machines.

The same row design as the SQLite store, in a schema of its own (``stepvault``
unless told otherwise): ``sessions`` holds one row per session (clear columns for
listings and expiry, the lease, and a framed snapshot of the whole session) and
``steps`` is append-only, one framed checkpoint per row. Records are kept as the
exact checksummed (and, with a key, encrypted) frames the other stores write, in
``bytea``: a ``jsonb`` column would re-encode the bytes and lose both.

Leases: a runner claims a session with ``SELECT ... FOR UPDATE SKIP LOCKED``,
setting itself as owner, a lease expiry on the database's clock (``now()``, so
the machines' clocks never matter) and a new epoch from a sequence. Every
checkpoint is one statement fenced ``WHERE id = $1 AND owner = $2 AND epoch = $3``:
a runner that lost its lease (paused, partitioned, presumed dead) commits nothing.
Every write a runner makes is a single statement, so no transaction is ever left
open between round trips: a runner paused or killed mid-call holds no row lock,
and no session-level advisory lock is taken (they break behind PgBouncer). The
store creates and migrates its schema itself, recording the version in
``schema_version``.

Events are taken without the lease (``engine.events.EventInbox``): ``events``
holds each posted event as a framed record numbered per session, and
``inboxes`` the last number each session handed out. Posting is one short
transaction: bump the session's counter (its row stays locked until commit, so
posts to one session commit in number order and a reader never sees event n
without the ones before it), then insert the event framed under that number. It
never touches the ``sessions`` row, so it neither waits for nor delays a
runner's fenced commit; a checkpoint that absorbs events up to n deletes them in
its own statement.

With an encryption key every record is sealed under its session's data key,
wrapped in ``session_keys`` (one row per session, written in the statement that
creates the session; see docs/security.md). A commit is fenced on the key row
too: a record in clear never joins a session whose records are sealed.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import re
import urllib.parse
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .. import codec
from ..crypto import SALT_NAME, SEAL_OVERHEAD, Encryption, KeyInput, RekeyOutcome, SessionKeys
from ..errors import (
    DecryptionError,
    EngineError,
    InvalidArgumentError,
    LeaseLostError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
)
from ..log import get_logger
from ..models import Checkpoint, Event, Session, SessionInfo
from .base import (
    DEFAULT_LEASE_TTL,
    Durability,
    Lease,
    check_durability,
    check_fresh,
    validate_session_id,
)
from .sql import (
    COMPACT_MIN_BYTES,
    Rekeyed,
    decode_events,
    encode_event,
    failed_check,
    in_clear,
    missing_key,
    not_corrupt,
    open_records,
    passed_check,
    rebuild_session,
    refuse_commit,
    rekeyed,
    sealed_record,
    unwrap,
)

SCHEMA_VERSION = 3
DEFAULT_SCHEMA = "stepvault"
_log = get_logger()

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE {s}.sessions (
        id uuid PRIMARY KEY,
        status text NOT NULL,
        workflow text,
        created_at timestamptz NOT NULL,
        last_activity timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        steps_done integer NOT NULL,
        revision bigint NOT NULL,
        snapshot bytea NOT NULL,
        snapshot_revision bigint NOT NULL,
        snapshot_bytes bigint NOT NULL,
        steps_bytes bigint NOT NULL DEFAULT 0,
        owner text,
        lease_expires timestamptz,
        epoch bigint NOT NULL DEFAULT 0,
        takeovers integer NOT NULL DEFAULT 0
    ) WITH (fillfactor = 80);  -- room for the in-place (HOT) updates every commit makes
    CREATE TABLE {s}.steps (
        session_id uuid NOT NULL REFERENCES {s}.sessions (id) ON DELETE CASCADE,
        revision bigint NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (session_id, revision)
    );
    -- One sequence for every epoch: a session deleted and created again never
    -- hands out an epoch that a lease from its earlier life still carries.
    CREATE SEQUENCE {s}.lease_epochs;
    """,
    # Events posted without the lease. The counter has a table of its own so that
    # posting never locks the sessions row a runner's commit updates; a session
    # created by an older stepvault still running gets its row on its first post.
    2: """
    CREATE TABLE {s}.inboxes (
        session_id uuid PRIMARY KEY REFERENCES {s}.sessions (id) ON DELETE CASCADE,
        last_seq bigint NOT NULL
    );
    CREATE TABLE {s}.events (
        session_id uuid NOT NULL REFERENCES {s}.inboxes (session_id) ON DELETE CASCADE,
        seq bigint NOT NULL,
        event_id text NOT NULL,
        record bytea NOT NULL,
        PRIMARY KEY (session_id, seq),
        UNIQUE (session_id, event_id)
    );
    INSERT INTO {s}.inboxes (session_id, last_seq) SELECT id, 0 FROM {s}.sessions;
    """,
    # Encryption at rest: each session's wrapped data key (and the passphrase salt,
    # under crypto.SALT_NAME, hence text names), and sessions moved aside as corrupt.
    3: """
    CREATE TABLE {s}.session_keys (
        name text PRIMARY KEY,
        record bytea NOT NULL
    );
    CREATE TABLE {s}.quarantine (
        session_id uuid NOT NULL,
        moved_at timestamptz NOT NULL,
        kind text NOT NULL,
        seq bigint NOT NULL,
        record bytea NOT NULL
    );
    """,
}
_SESSION = Session.__name__  # record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__

_SQL = {
    "migration_lock": "SELECT pg_advisory_xact_lock(hashtext($1))",
    "migration_start": """
        CREATE SCHEMA IF NOT EXISTS {s};
        CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)""",
    "migration_version": "SELECT coalesce(max(version), 0) FROM {s}.schema_version",
    "migration_done": "INSERT INTO {s}.schema_version VALUES ($1)",
    # The key row ($11, NULL in clear) is written only with the session: a row left
    # under this id without a session (it cannot be its) is replaced or removed.
    "create": """
        WITH made AS (
            INSERT INTO {s}.sessions (id, status, workflow, created_at, last_activity,
                expires_at, steps_done, revision, snapshot, snapshot_revision, snapshot_bytes)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, length($9::bytea))
            ON CONFLICT (id) DO NOTHING
            RETURNING id
        ), keyed AS (
            INSERT INTO {s}.session_keys (name, record)
            SELECT id::text, $11::bytea FROM made WHERE $11::bytea IS NOT NULL
            ON CONFLICT (name) DO UPDATE SET record = excluded.record
        ), unkeyed AS (
            DELETE FROM {s}.session_keys
            WHERE name IN (SELECT id::text FROM made) AND $11::bytea IS NULL
        )
        INSERT INTO {s}.inboxes (session_id, last_seq) SELECT id, $10 FROM made""",
    # One statement, so the snapshot, the steps after it and the posted events
    # come from one snapshot.
    "load": """
        SELECT s.snapshot, s.snapshot_revision, st.revisions, st.records, ev.seqs, ev.events,
            (SELECT record FROM {s}.session_keys WHERE name = s.id::text) AS key_record
        FROM {s}.sessions AS s CROSS JOIN LATERAL (
            SELECT array_agg(revision ORDER BY revision) AS revisions,
                   array_agg(record ORDER BY revision) AS records
            FROM {s}.steps WHERE session_id = s.id AND revision > s.snapshot_revision
        ) AS st CROSS JOIN LATERAL (
            SELECT array_agg(seq ORDER BY seq) AS seqs, array_agg(record ORDER BY seq) AS events
            FROM {s}.events WHERE session_id = s.id
        ) AS ev
        WHERE s.id = $1""",
    # A lease that ran out is void once the session is replaced: the owner is cleared.
    "save": """
        WITH saved AS (
            UPDATE {s}.sessions SET status = $2, workflow = $3, last_activity = $4,
                expires_at = $5, steps_done = $6, revision = $7, snapshot = $8,
                snapshot_revision = $7, snapshot_bytes = length($8::bytea), steps_bytes = 0,
                owner = NULL, lease_expires = NULL
            WHERE id = $1 AND revision = $7 - 1 AND (owner IS NULL OR lease_expires <= now())
            RETURNING id
        ), dropped AS (
            DELETE FROM {s}.steps WHERE session_id IN (SELECT id FROM saved)
        ), absorbed AS (
            DELETE FROM {s}.events WHERE session_id IN (SELECT id FROM saved) AND seq <= $9
        )
        SELECT count(*) FROM saved""",
    "why_not_saved": """
        SELECT revision, owner IS NOT NULL AND lease_expires > now() AS busy
        FROM {s}.sessions WHERE id = $1""",
    # $11: whether the record is sealed; it must be exactly when the session has a key.
    "commit": """
        WITH fenced AS (
            UPDATE {s}.sessions AS ses SET status = $5, last_activity = $6, expires_at = $7,
                steps_done = steps_done + $8, revision = $4,
                steps_bytes = steps_bytes + length($9::bytea)
            WHERE id = $1 AND owner = $2 AND epoch = $3 AND revision = $4 - 1
                AND EXISTS (SELECT 1 FROM {s}.session_keys WHERE name = ses.id::text) = $11
            RETURNING id, snapshot_bytes, steps_bytes
        ), added AS (
            INSERT INTO {s}.steps (session_id, revision, record) SELECT id, $4, $9 FROM fenced
        ), absorbed AS (
            -- $10 (the checkpoint's inbox_seq) is NULL when it absorbs no event
            DELETE FROM {s}.events WHERE session_id IN (SELECT id FROM fenced) AND seq <= $10
        )
        SELECT snapshot_bytes, steps_bytes FROM fenced""",
    "why_not_committed": """
        SELECT owner, epoch, revision,
            (SELECT record FROM {s}.session_keys WHERE name = ses.id::text) AS key_record
        FROM {s}.sessions AS ses WHERE id = $1""",
    "compact": """
        WITH folded AS (
            UPDATE {s}.sessions SET snapshot = $2, snapshot_revision = $3,
                snapshot_bytes = length($2::bytea), steps_bytes = 0
            WHERE id = $1 AND revision = $3
            RETURNING id
        )
        DELETE FROM {s}.steps WHERE session_id IN (SELECT id FROM folded) AND revision <= $3""",
    # Posting, in one transaction: bump the counter (its row stays locked until
    # commit), then insert the event unless this id is posted already.
    "inbox_bump": """
        INSERT INTO {s}.inboxes AS inbox (session_id, last_seq)
        SELECT id, 1 FROM {s}.sessions WHERE id = $1
        ON CONFLICT (session_id) DO UPDATE SET last_seq = inbox.last_seq + 1
        RETURNING last_seq""",
    # Every earlier post to this session committed before the bump got its lock,
    # so this statement's snapshot shows a duplicate if there is one.
    "post": """
        WITH added AS (
            INSERT INTO {s}.events (session_id, seq, event_id, record)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (session_id, event_id) DO NOTHING
            RETURNING seq
        )
        SELECT seq, true AS added FROM added
        UNION ALL
        SELECT seq, false FROM {s}.events WHERE session_id = $1 AND event_id = $3""",
    # Steps, inbox and events cascade; the key row goes in the same statement.
    "delete": """
        WITH gone AS (DELETE FROM {s}.sessions WHERE id = $1 RETURNING id),
        unkeyed AS (DELETE FROM {s}.session_keys WHERE name IN (SELECT id::text FROM gone))
        SELECT count(*) FROM gone""",
    "key": "SELECT record FROM {s}.session_keys WHERE name = $1",
    "add_key": """
        INSERT INTO {s}.session_keys (name, record) VALUES ($1, $2)
        ON CONFLICT (name) DO NOTHING""",
    "put_key": """
        INSERT INTO {s}.session_keys (name, record) VALUES ($1, $2)
        ON CONFLICT (name) DO UPDATE SET record = excluded.record""",
    "delete_key": "DELETE FROM {s}.session_keys WHERE name = $1",
    "lock_session": """
        SELECT snapshot, owner IS NOT NULL AND lease_expires > now() AS busy
        FROM {s}.sessions WHERE id = $1 FOR UPDATE""",
    "lock_inbox": "SELECT last_seq FROM {s}.inboxes WHERE session_id = $1 FOR UPDATE",
    "rekey": """
        WITH rewritten AS (
            UPDATE {s}.sessions SET revision = $2, snapshot = $3, snapshot_revision = $2,
                snapshot_bytes = length($3::bytea), steps_bytes = 0,
                owner = NULL, lease_expires = NULL
            WHERE id = $1
            RETURNING id
        )
        DELETE FROM {s}.steps WHERE session_id IN (SELECT id FROM rewritten)""",
    "reseal_event": "UPDATE {s}.events SET record = $3 WHERE session_id = $1 AND seq = $2",
    "quarantine": """
        INSERT INTO {s}.quarantine (session_id, moved_at, kind, seq, record)
        SELECT id, $2::timestamptz, 'snapshot', snapshot_revision, snapshot
        FROM {s}.sessions WHERE id = $1
        UNION ALL
        SELECT session_id, $2, 'step', revision, record FROM {s}.steps WHERE session_id = $1
        UNION ALL
        SELECT session_id, $2, 'event', seq, record FROM {s}.events WHERE session_id = $1
        UNION ALL
        SELECT name::uuid, $2, 'key', 0, record FROM {s}.session_keys WHERE name = $1::text""",
    "list": """
        SELECT id::text AS id, status, workflow, created_at, last_activity, expires_at,
            steps_done
        FROM {s}.sessions ORDER BY id""",
    "acquire": """
        WITH candidate AS (
            SELECT id, owner FROM {s}.sessions
            WHERE id = $1 AND (owner IS NULL OR lease_expires <= now())
            FOR UPDATE SKIP LOCKED
        )
        UPDATE {s}.sessions AS held SET owner = $2,
            lease_expires = now() + make_interval(secs => $3),
            epoch = nextval('{s}.lease_epochs'),
            takeovers = held.takeovers + (candidate.owner IS NOT NULL)::int
        FROM candidate WHERE held.id = candidate.id
        RETURNING held.epoch, held.takeovers""",
    "exists": "SELECT true FROM {s}.sessions WHERE id = $1",
    "renew": """
        UPDATE {s}.sessions SET lease_expires = now() + make_interval(secs => $4)
        WHERE id = $1 AND owner = $2 AND epoch = $3""",
    "release": """
        UPDATE {s}.sessions SET owner = NULL, lease_expires = NULL, takeovers = 0
        WHERE id = $1 AND owner = $2 AND epoch = $3""",
}


class PostgresStore:
    """Store sessions in PostgreSQL, shared by runners on many machines.

    Args:
        dsn: a ``postgresql://`` URL; a ``schema`` query parameter names the schema.
        encryption_key: encrypt every record (AES-256-GCM) as ``FileStore`` does:
            32 bytes, a base64 string of 32 bytes, a passphrase, or a
            ``crypto.KeyRing`` holding old keys too. None stores records in clear.
        schema: the schema holding stepvault's tables (default ``stepvault``),
            created and migrated on first use.
        durability: ``"fsync"`` (the server's own setting, normally durable at
            commit) or ``"none"`` (``synchronous_commit=off``, for tests).
        min_connections, max_connections: the connection pool's bounds.
        compact_bytes: step bytes below which no compaction happens.
    """

    def __init__(
        self,
        dsn: str,
        *,
        encryption_key: KeyInput | None = None,
        schema: str | None = None,
        durability: Durability = "fsync",
        min_connections: int = 1,
        max_connections: int = 10,
        compact_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        self.dsn, from_url = _split_schema(dsn)
        if schema is not None and from_url is not None and schema != from_url:
            raise InvalidArgumentError(
                f"schema {schema!r} given twice, differently ({from_url!r} in the URL)"
            )
        self.schema = schema or from_url or DEFAULT_SCHEMA
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
            raise InvalidArgumentError(
                f"schema must be a lowercase SQL identifier, got {self.schema!r}"
            )
        if not 1 <= min_connections <= max_connections:
            raise InvalidArgumentError(
                f"need 1 <= min_connections <= max_connections, got "
                f"{min_connections} and {max_connections}"
            )
        self.durability = check_durability(durability)
        self.compact_bytes = compact_bytes
        self._encryption = Encryption.of(encryption_key)
        self._pool_bounds = (min_connections, max_connections)
        self._sql = {name: query.format(s=self.schema) for name, query in _SQL.items()}
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._held: dict[str, Lease] = {}

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"PostgresStore({_where(self.dsn)!r}, schema={self.schema!r}{encrypted})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Insert a new session row with its snapshot (and its data key, when encrypted)."""
        validate_session_id(session.id)
        body = codec.dump_json(session, f"session {session.id}")
        overhead = SEAL_OVERHEAD if self._encryption is not None else 0
        codec.check_record_size(session.revision, len(body) + overhead)
        await self._connect()  # a passphrase needs the store's salt first
        keys, key_record = None, None
        if self._encryption is not None:
            key_record = self._encryption.new_session_record(session.id)
            keys = self._encryption.open_session_keys(session.id, key_record)
        snapshot = codec.seal_frame(session.revision, _SESSION, body, keys)
        status = await self._call(
            "execute",
            "create",
            session.id,
            session.status,
            session.workflow,
            session.created_at,
            session.last_activity,
            session.expires_at,
            session.cursor,
            session.revision,
            snapshot,
            session.inbox_seq,
            key_record,
        )
        if status != "INSERT 0 1":
            raise SessionExistsError(f"session {session.id} already exists")
        if keys is not None and self._encryption is not None:
            self._encryption.remember(keys)

    async def load(self, session_id: str) -> Session | None:
        """Return the session rebuilt from its snapshot, later steps and posted events."""
        return await self._load(validate_session_id(session_id), posted=True)

    async def _load(self, session_id: str, *, posted: bool) -> Session | None:
        """Rebuild the session; with ``posted``, its posted events join its inbox."""
        return (await self._read(session_id, posted=posted))[0]

    async def _read(self, session_id: str, *, posted: bool) -> tuple[Session | None, bool]:
        """Return the session (None if absent) and whether it is encrypted."""
        row = await self._call("fetchrow", "load", session_id)
        if row is None:
            return None, False
        steps = list(zip(row["revisions"] or (), row["records"] or (), strict=True))
        events = list(zip(row["seqs"] or (), row["events"] or (), strict=True)) if posted else []
        source = f"postgres {self.schema} session {session_id}"
        key_record = row["key_record"]

        def decode(keys: SessionKeys | None) -> Session:
            snapshot, revision = row["snapshot"], row["snapshot_revision"]
            return rebuild_session(source, session_id, snapshot, revision, steps, events, keys)

        # Decoding a large session takes a while: never on the event loop.
        session = await asyncio.to_thread(
            open_records, self._encryption, session_id, key_record, decode
        )
        return session, key_record is not None

    async def _keys(self, conn: Any, session_id: str) -> SessionKeys | None:
        """Return the keys to seal a write without the lease with (None: in clear).

        Read from the key row on ``conn`` (inside the caller's transaction): another
        runner may have rekeyed the session since its keys were cached here.

        Raises:
            DecryptionError: the session is encrypted and this store has no key.
        """
        record = await conn.fetchval(self._sql["key"], session_id)
        if self._encryption is None:
            if record is not None:
                raise missing_key(session_id, DecryptionError(""), record, None)
            return None
        return unwrap(self._encryption, session_id, record)

    async def _commit_keys(self, session_id: str) -> SessionKeys | None:
        """Return the keys a lease holder seals with: cached since ``acquire`` forgot them."""
        if self._encryption is None:
            return None
        keys = self._encryption.cached(session_id)
        if keys is None:
            record = await self._call("fetchval", "key", session_id)
            keys = unwrap(self._encryption, session_id, record)
        return keys

    async def save(self, session: Session) -> None:
        """Replace the session whole; ``SessionBusyError`` while a runner's lease is live."""
        validate_session_id(session.id)
        revision = session.revision + 1
        saved = session.model_copy(update={"revision": revision})
        body = codec.dump_json(saved, f"session {session.id}")
        pool = await self._connect()
        with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
            async with pool.acquire() as conn:
                # A rekey between this read and the save bumps the revision: refused.
                keys = await self._keys(conn, session.id)
        snapshot = codec.seal_frame(revision, _SESSION, body, keys)
        count = await self._call(
            "fetchval",
            "save",
            session.id,
            saved.status,
            saved.workflow,
            saved.last_activity,
            saved.expires_at,
            saved.cursor,
            revision,
            snapshot,
            saved.inbox_seq,
        )
        if count != 1:
            row = await self._call("fetchrow", "why_not_saved", session.id)
            if row is None:
                raise SessionNotFoundError(f"session {session.id} not found")
            check_fresh(session.id, session.revision, row["revision"])
            raise SessionBusyError(f"session {session.id} is being run by a runner")
        session.revision = revision

    async def commit(self, lease: Lease, checkpoint: Checkpoint) -> None:
        """Insert one step and update the session row in one statement, fenced by the lease."""
        session_id = validate_session_id(lease.session_id)
        what = f"checkpoint {checkpoint.revision} of session {session_id}"
        body = codec.dump_json(checkpoint, what)
        keys = await self._commit_keys(session_id)
        record = codec.seal_frame(checkpoint.revision, _CHECKPOINT, body, keys)
        row = await self._call(
            "fetchrow",
            "commit",
            session_id,
            lease.owner,
            lease.token,
            checkpoint.revision,
            checkpoint.status,
            checkpoint.last_activity,
            checkpoint.expires_at,
            int(checkpoint.step is not None),
            record,
            checkpoint.inbox_seq,
            keys is not None,
        )
        if row is None:
            found = await self._call("fetchrow", "why_not_committed", session_id)
            if found is None:
                refuse_commit(lease, checkpoint, None)
            held = (found["owner"], found["epoch"], found["revision"])
            if held == (lease.owner, lease.token, checkpoint.revision - 1):
                # Only the key fence refused it: sealed and clear records never mix.
                self._forget_keys(session_id)
                problem = DecryptionError(f"{what} cannot be written in clear or under this key")
                raise missing_key(session_id, problem, found["key_record"], self._encryption)
            refuse_commit(lease, checkpoint, held)
        if row["steps_bytes"] > max(self.compact_bytes, row["snapshot_bytes"]):
            await self._compact_quietly(session_id)

    async def _compact_quietly(self, session_id: str) -> None:
        """Fold the steps into the snapshot; a failure here loses nothing committed."""
        try:
            # Posted events stay apart until a checkpoint absorbs them.
            session = await self._load(session_id, posted=False)
            if session is not None:
                what = f"session {session_id}"
                keys = await self._commit_keys(session_id)
                snapshot = await asyncio.to_thread(
                    codec.encode_model, session.revision, session, what, keys
                )
                await self._call("execute", "compact", session_id, snapshot, session.revision)
        except EngineError as exc:
            _log.warning("compaction.failed", session_id=session_id, error=str(exc))

    async def post_event(self, session_id: str, event: Event) -> int:
        """Append ``event`` to the session's inbox without the lease; return its number.

        Posting an ``event.id`` the inbox still holds returns its number again.

        Raises:
            SessionNotFoundError: no such session.
            SerializationError: the payload is not JSON.
        """
        validate_session_id(session_id)
        pool = await self._connect()
        try:
            with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
                async with pool.acquire() as conn, conn.transaction():
                    seq = await conn.fetchval(self._sql["inbox_bump"], session_id)
                    if seq is None:
                        raise SessionNotFoundError(f"session {session_id} not found")
                    keys = await self._keys(conn, session_id)
                    record = encode_event(session_id, seq, event, keys)
                    row = await conn.fetchrow(self._sql["post"], session_id, seq, event.id, record)
                    if not row["added"]:
                        raise _PostedBefore(row["seq"])
        except _PostedBefore as before:
            return before.seq  # its transaction rolled back: the number was not used
        number: int = seq
        return number

    async def delete(self, session_id: str) -> bool:
        """Remove a session, its steps and its posted events; return whether it existed."""
        count = await self._call("fetchval", "delete", validate_session_id(session_id))
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        return bool(count)

    async def list(self) -> builtins.list[SessionInfo]:
        """Return a row per session from the clear columns, without decoding snapshots."""
        rows = await self._call("fetch", "list")
        return [SessionInfo.model_validate(dict(row)) for row in rows]

    async def acquire(
        self, session_id: str, owner: str, *, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        """Claim the session if it is free or its holder's lease ran out."""
        validate_session_id(session_id)
        row = await self._call("fetchrow", "acquire", session_id, owner, float(ttl))
        if row is None:
            if not await self._call("fetchval", "exists", session_id):
                raise SessionNotFoundError(f"session {session_id} not found")
            return None
        lease = self._held[session_id] = Lease(session_id, owner, row["epoch"], row["takeovers"])
        self._forget_keys(session_id)  # another runner may have rekeyed it
        return lease

    async def renew(self, lease: Lease, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        """Extend a lease; ``LeaseLostError`` if another runner took the session."""
        validate_session_id(lease.session_id)
        args = (lease.session_id, lease.owner, lease.token, float(ttl))
        if await self._call("execute", "renew", *args) != "UPDATE 1":
            raise LeaseLostError(f"session {lease.session_id}: lease lost to another runner")

    async def release(self, lease: Lease) -> None:
        """Give a lease back if it is still this one; otherwise do nothing."""
        validate_session_id(lease.session_id)
        await self._call("execute", "release", lease.session_id, lease.owner, lease.token)
        if self._held.get(lease.session_id) == lease:
            del self._held[lease.session_id]

    async def close(self) -> None:
        """Release this store's leases and close its connection pool. Idempotent."""
        if self._pool is None:
            return
        for lease in list(self._held.values()):
            try:
                await self.release(lease)
            except EngineError as exc:  # it runs out on its own; closing goes on
                _log.warning("lease.release_failed", session_id=lease.session_id, error=str(exc))
        self._held.clear()
        pool, self._pool = self._pool, None
        await pool.close()

    async def migrate(self) -> int:
        """Create or upgrade the schema now rather than on first use; return its version."""
        await self._connect()
        return SCHEMA_VERSION

    # -- security: shredding, verification, rekeying ----------------------------

    async def shred(self, session_id: str) -> bool:
        """Destroy the session's data key with its rows, in one transaction.

        Once this returns no reader of the database can decrypt the session, and
        a copy of its records made without the key row never can. The deleted
        rows stay in the table's pages until ``VACUUM`` reuses them, and in the
        server's write-ahead log and backups (see docs/security.md).

        Raises:
            StorageError: the session is stored in clear: there is no key to destroy.
        """
        validate_session_id(session_id)
        sql = self._sql
        pool = await self._connect()
        with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(sql["lock_session"], session_id)
                destroyed = await conn.execute(sql["delete_key"], session_id) == "DELETE 1"
                if not destroyed and row is not None and not sealed_record(row["snapshot"]):
                    in_clear(session_id)  # raises: rolled back, nothing removed
                existed = bool(await conn.fetchval(sql["delete"], session_id))
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        return destroyed or existed

    async def check(self, session_id: str) -> codec.SessionCheck:
        """Decode every live record of the session (checksums, tags); change nothing."""
        validate_session_id(session_id)
        try:
            session, sealed = await self._read(session_id, posted=True)
        except StorageError as exc:
            return failed_check(session_id, exc)
        return passed_check(session_id, session, sealed=sealed)

    async def quarantine(self, session_id: str) -> str:
        """Move a corrupt session's records (and key) to the ``quarantine`` table.

        Raises:
            StorageError: the session is not corrupt (an undecryptable one is never moved).
        """
        check = await self.check(session_id)
        if check.verdict != "corrupt":
            not_corrupt(check)
        sql = self._sql
        pool = await self._connect()
        with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
            async with pool.acquire() as conn, conn.transaction():
                moved_at = await conn.fetchval("SELECT now()")
                # The key goes with the records: they stay readable for repair.
                await conn.execute(sql["quarantine"], session_id, moved_at)
                await conn.fetchval(sql["delete"], session_id)
        self._held.pop(session_id, None)
        self._forget_keys(session_id)
        return (
            f"schema {self.schema} table quarantine, session_id {session_id}, moved_at {moved_at}"
        )

    async def rekey(self, session_id: str) -> RekeyOutcome:
        """Rewrite a session under a fresh data key wrapped by the active master key.

        One transaction, holding the session's and its inbox's rows: the session
        is rewritten whole (steps folded into the snapshot, posted events sealed
        again) with its new key row, or not at all. Returns ``"current"`` when there
        is nothing to do and ``"busy"`` while a runner's lease is live.

        Raises:
            EngineError: the store has no key; the session is unreadable (nothing
                is rewritten then).
        """
        validate_session_id(session_id)
        encryption = self._encryption
        if encryption is None:
            raise EngineError("rekey needs an encryption key: set SESSION_ENCRYPTION_KEY")
        sql = self._sql
        pool = await self._connect()
        with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
            async with pool.acquire() as conn, conn.transaction():
                locked = await conn.fetchrow(sql["lock_session"], session_id)
                if locked is None:
                    raise SessionNotFoundError(f"session {session_id} not found")
                if locked["busy"]:
                    return "busy"
                await conn.fetchval(sql["lock_inbox"], session_id)  # posts wait for us
                row = await conn.fetchrow(sql["load"], session_id)
                key_record = row["key_record"]
                if key_record is not None and encryption.is_current(session_id, key_record):
                    return "current"
                new = await asyncio.to_thread(self._rekeyed, encryption, session_id, row)
                await conn.execute(sql["rekey"], session_id, new.session.revision, new.snapshot)
                for seq, record in new.events:
                    await conn.execute(sql["reseal_event"], session_id, seq, record)
                await conn.execute(sql["put_key"], session_id, new.key_record)
        encryption.remember(new.keys)
        return "rekeyed"

    def _rekeyed(self, encryption: Encryption, session_id: str, row: Any) -> Rekeyed:
        """Decode a session's rows under its current keys and seal them anew."""
        source = f"postgres {self.schema} session {session_id}"
        steps = list(zip(row["revisions"] or (), row["records"] or (), strict=True))
        events = list(zip(row["seqs"] or (), row["events"] or (), strict=True))

        def decode(keys: SessionKeys | None) -> tuple[Session, builtins.list[Event]]:
            session = rebuild_session(
                source, session_id, row["snapshot"], row["snapshot_revision"], steps, (), keys
            )
            return session, decode_events(source, events, keys)

        session, posted = open_records(encryption, session_id, row["key_record"], decode)
        return rekeyed(encryption, session, posted)

    def _forget_keys(self, session_id: str) -> None:
        if self._encryption is not None:
            self._encryption.forget(session_id)

    # -- connection, schema, errors -------------------------------------------

    async def _connect(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._pool is not None:
            if self._loop is not loop:
                # Connections belong to the event loop that opened them.
                raise StorageError(
                    f"{self!r} is connected under another event loop: close it "
                    "(await store.close()) before that loop ends, and it reconnects"
                )
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is None:
                self._pool = await self._open_pool()
                self._loop = loop
        return self._pool

    async def _open_pool(self) -> Any:
        asyncpg = _asyncpg()
        low, high = self._pool_bounds
        settings = {"synchronous_commit": "off"} if self.durability == "none" else {}
        with self._errors(f"cannot connect to PostgreSQL at {_where(self.dsn)}"):
            pool = await asyncpg.create_pool(
                self.dsn, min_size=low, max_size=high, server_settings=settings
            )
        try:
            with self._errors(f"cannot migrate schema {self.schema}"):
                await self._migrate(pool)
                await self._prepare(pool)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def _migrate(self, pool: Any) -> None:
        sql = self._sql
        async with pool.acquire() as conn, conn.transaction():
            # Concurrent runners starting at once take turns here. The lock is
            # released at commit, so unlike a session-level advisory lock it is safe
            # behind PgBouncer's transaction pooling.
            await conn.execute(sql["migration_lock"], f"stepvault:{self.schema}")
            await conn.execute(sql["migration_start"])
            current = await conn.fetchval(sql["migration_version"])
            if current > SCHEMA_VERSION:
                raise StorageError(
                    f"schema {self.schema} is at version {current}, newer than this "
                    f"stepvault understands ({SCHEMA_VERSION}): upgrade stepvault"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                await conn.execute(_MIGRATIONS[version].format(s=self.schema))
                await conn.execute(sql["migration_done"], version)

    async def _prepare(self, pool: Any) -> None:
        """Derive the master keys once; a passphrase needs the store's salt, made once."""
        encryption = self._encryption
        if encryption is None or encryption.prepared:
            return
        await pool.execute(self._sql["add_key"], SALT_NAME, encryption.new_salt_record())
        record = await pool.fetchval(self._sql["key"], SALT_NAME)
        await asyncio.to_thread(encryption.use_salt, record)  # scrypt: tens of milliseconds

    async def _call(self, method: str, statement: str, *args: Any) -> Any:
        """Run one named statement on a pooled connection (its own transaction)."""
        pool = await self._connect()
        with self._errors(f"PostgreSQL {_where(self.dsn)} schema {self.schema}"):
            return await getattr(pool, method)(self._sql[statement], *args)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn the driver's and the network's errors into ``StorageError``."""
        asyncpg = _asyncpg()
        try:
            yield
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc


class _PostedBefore(Exception):  # noqa: N818  # control flow, never raised to callers
    """An event with this id is in the inbox already: roll back, answer its number."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


def _asyncpg() -> ModuleType:
    """Import the optional driver, or say which extra installs it."""
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415  # optional dependency
    except ImportError:
        raise EngineError(
            "PostgresStore needs the asyncpg driver: pip install 'stepvault[postgres]'"
        ) from None
    module: ModuleType = asyncpg
    return module


def _split_schema(dsn: str) -> tuple[str, str | None]:
    """Take stepvault's ``schema`` parameter out of a URL (the driver would reject it)."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return dsn, None
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schemas[-1]


def _where(dsn: str) -> str:
    """Name a database by host, port and name: never print a URL's password."""
    parts = urllib.parse.urlsplit(dsn)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # the driver reports the bad port itself
        port = ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or '/'}"
