"""The PostgreSQL store's schema, its migrations, every statement it runs, its URLs.

Statements name the schema as ``{s}``; the store formats them once with its own.
``sessions`` holds one row per session (clear columns for listings and expiry,
the lease, and the framed snapshot), ``steps`` one framed checkpoint per row,
``inboxes`` and ``events`` the posted events, ``session_keys`` the wrapped data
keys and ``quarantine`` the records of sessions moved aside as corrupt.
"""

from __future__ import annotations

import urllib.parse
from types import ModuleType
from typing import Any

from ..errors import EngineError, StorageError
from .sql import check_complete

SCHEMA_VERSION = 3
DEFAULT_SCHEMA = "stepvault"

MIGRATIONS: dict[int, str] = {
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

STATEMENTS: dict[str, str] = {
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
        SELECT s.snapshot, s.snapshot_revision, s.revision, st.revisions, st.records,
            ev.seqs, ev.events,
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
            -- $10 (the checkpoint's inbox_seq) is NULL when it absorbs no event; $12
            -- the ids it takes: a retried post of one is the same event, not a new one
            DELETE FROM {s}.events WHERE session_id IN (SELECT id FROM fenced)
                AND (seq <= $10 OR event_id = ANY($12::text[]))
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
    "list_page": """
        SELECT id::text AS id, status, workflow, created_at, last_activity, expires_at,
            steps_done
        FROM {s}.sessions WHERE $1::uuid IS NULL OR id > $1::uuid ORDER BY id LIMIT $2""",
    "list_unfinished_page": """
        SELECT id::text AS id, status, workflow, created_at, last_activity, expires_at,
            steps_done
        FROM {s}.sessions WHERE ($1::uuid IS NULL OR id > $1::uuid) AND status = ANY($3::text[])
        ORDER BY id LIMIT $2""",
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


async def migrate(conn: Any, schema: str, sql: dict[str, str]) -> None:
    """Create or upgrade ``schema`` to this version (inside the caller's transaction).

    Raises:
        StorageError: the schema is newer than this stepvault.
    """
    # Concurrent runners starting at once take turns here. The lock is released at
    # commit, so unlike a session-level advisory lock it is safe behind PgBouncer's
    # transaction pooling.
    await conn.execute(sql["migration_lock"], f"stepvault:{schema}")
    await conn.execute(sql["migration_start"])
    current = await conn.fetchval(sql["migration_version"])
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"schema {schema} is at version {current}, newer than this "
            f"stepvault understands ({SCHEMA_VERSION}): upgrade stepvault"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        await conn.execute(MIGRATIONS[version].format(s=schema))
        await conn.execute(sql["migration_done"], version)


Records = list[tuple[int, bytes]]


def loaded_records(row: Any, source: str) -> tuple[Records, Records]:
    """Return a ``load`` row's steps and posted events, refusing missing last steps.

    Every reader of a session (a load, a check, a rekey) goes through here, so a
    session whose last step rows were deleted is never read as an older revision.
    """
    steps = list(zip(row["revisions"] or (), row["records"] or (), strict=True))
    events = list(zip(row["seqs"] or (), row["events"] or (), strict=True))
    check_complete(source, row["snapshot_revision"], steps, row["revision"])
    return steps, events


def driver() -> ModuleType:
    """Import the optional driver, or say which extra installs it."""
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415  # optional dependency
    except ImportError:
        raise EngineError(
            "PostgresStore needs the asyncpg driver: pip install 'stepvault[postgres]'"
        ) from None
    module: ModuleType = asyncpg
    return module


def split_schema(dsn: str) -> tuple[str, str | None]:
    """Take stepvault's ``schema`` parameter out of a URL (the driver would reject it)."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return dsn, None
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schemas[-1]


def where(dsn: str) -> str:
    """Name a database by host, port and name: never print a URL's password."""
    parts = urllib.parse.urlsplit(dsn)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # the driver reports the bad port itself
        port = ""
    return f"{parts.hostname or 'localhost'}{port}{parts.path or '/'}"
