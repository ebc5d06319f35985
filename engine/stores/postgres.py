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
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .. import codec
from ..crypto import SALT_NAME, Encryption, KeyInput, RekeyOutcome, SessionKeys
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
from ..models import UNFINISHED, Checkpoint, Event, Session, SessionInfo
from . import postgres_security as security
from .base import (
    DEFAULT_LEASE_TTL,
    LIST_PAGE,
    Durability,
    Lease,
    check_durability,
    check_fresh,
    new_session_body,
    to_the_end,
    validate_session_id,
)
from .postgres_sql import (
    DEFAULT_SCHEMA,
    SCHEMA_VERSION,
    STATEMENTS,
    driver,
    loaded_records,
    migrate,
    split_schema,
    where,
)
from .sql import (
    COMPACT_MIN_BYTES,
    encode_event,
    failed_check,
    missing_key,
    not_corrupt,
    open_records,
    passed_check,
    rebuild_session,
    refuse_commit,
    unwrap,
)

_log = get_logger()
_SESSION = Session.__name__  # record kinds, bound into each sealed record
_CHECKPOINT = Checkpoint.__name__


COMMITTER_RETRY = 30.0
"""Seconds before a store tries again to open its commit connection, after a failure."""


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
            commit), ``"batch"`` (the same as ``"fsync"``: the server already
            flushes the log once for the commits of concurrent connections that
            arrive together) or ``"none"`` (``synchronous_commit=off``, for tests).
        min_connections, max_connections: the connection pool's bounds. Commits have
            a connection of their own besides.
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
        self.dsn, from_url = split_schema(dsn)
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
        self.durability = check_durability(durability, supported=("fsync", "batch", "none"))
        self.compact_bytes = compact_bytes
        self._encryption = Encryption.of(encryption_key)
        self._pool_bounds = (min_connections, max_connections)
        self._sql = {name: query.format(s=self.schema) for name, query in STATEMENTS.items()}
        # What errors name: made once, as every statement (every commit) may need it.
        self._place = f"PostgreSQL {where(self.dsn)} schema {self.schema}"
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._held: dict[str, Lease] = {}
        self._committer: Any = None  # the connection of commits (``_commit_row``)
        self._committer_retry = 0.0  # when to try opening one again, after a failure
        self._commit_task: asyncio.Task[Any] | None = None  # the commit using it, if any

    def __repr__(self) -> str:
        encrypted = ", encrypted" if self._encryption is not None else ""
        return f"PostgresStore({where(self.dsn)!r}, schema={self.schema!r}{encrypted})"

    # -- the Store protocol ---------------------------------------------------

    async def create(self, session: Session) -> None:
        """Insert a new session row with its snapshot (and its data key, when encrypted)."""
        body = new_session_body(session, sealed=self._encryption is not None)
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
        source = f"postgres {self.schema} session {session_id}"
        steps, events = loaded_records(row, source)
        if not posted:
            events = []
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
        with self._errors(self._place):
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
        row = await to_the_end(
            self._commit_row(
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
                list(checkpoint.events_consumed),
            )
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
            with self._errors(self._place):
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
        self._dropped(session_id)
        return bool(count)

    async def list(self) -> builtins.list[SessionInfo]:
        """Return a row per session from the clear columns, without decoding snapshots."""
        rows = await self._call("fetch", "list")
        return [SessionInfo.model_validate(dict(row)) for row in rows]

    async def list_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Return up to ``limit`` rows whose ids sort after ``after``, in id order."""
        if after is not None:
            validate_session_id(after)
        rows = await self._call("fetch", "list_page", after, limit)
        return [SessionInfo.model_validate(dict(row)) for row in rows]

    async def list_unfinished_page(
        self, after: str | None = None, limit: int = LIST_PAGE
    ) -> builtins.list[SessionInfo]:
        """Like ``list_page``, for the unfinished sessions only (their clear status)."""
        if after is not None:
            validate_session_id(after)
        statuses = sorted(UNFINISHED)
        rows = await self._call("fetch", "list_unfinished_page", after, limit, statuses)
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
        commit = self._commit_task
        try:
            if commit is not None and commit is not asyncio.current_task():
                await asyncio.wait([commit])  # a commit in flight ends first, as with the pool
        finally:
            # Even when this close is cancelled: nothing would close that connection later.
            committer, self._committer = self._committer, None
            try:
                if committer is not None:
                    if commit is None or commit.done():
                        await committer.close()
                    else:
                        committer.terminate()  # still running: cut it
            finally:
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
        async with self._transaction() as conn:
            destroyed = await security.shred(conn, self._sql, session_id)
        self._dropped(session_id)
        return destroyed

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
        async with self._transaction() as conn:
            moved_at = await security.quarantine(conn, self._sql, session_id)
        self._dropped(session_id)
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
        source = f"postgres {self.schema} session {session_id}"
        async with self._transaction() as conn:
            outcome, keys = await security.rekey(conn, self._sql, encryption, session_id, source)
        if keys is not None:
            encryption.remember(keys)
        return outcome

    def _dropped(self, session_id: str) -> None:
        """Forget what this store held of a session just removed: its lease, its keys."""
        self._held.pop(session_id, None)
        self._forget_keys(session_id)

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

    def _server_settings(self) -> dict[str, str]:
        return {"synchronous_commit": "off"} if self.durability == "none" else {}

    async def _open_pool(self) -> Any:
        asyncpg = driver()
        low, high = self._pool_bounds
        with self._errors(f"cannot connect to PostgreSQL at {where(self.dsn)}"):
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=low,
                max_size=high,
                server_settings=self._server_settings(),
                reset=_rollback_if_open,
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
        async with pool.acquire() as conn, conn.transaction():
            await migrate(conn, self.schema, self._sql)

    async def _prepare(self, pool: Any) -> None:
        """Derive the master keys once; a passphrase needs the store's salt, made once."""
        encryption = self._encryption
        if encryption is None or encryption.prepared:
            return
        await pool.execute(self._sql["add_key"], SALT_NAME, encryption.new_salt_record())
        record = await pool.fetchval(self._sql["key"], SALT_NAME)
        await asyncio.to_thread(encryption.use_salt, record)  # scrypt: tens of milliseconds

    async def _commit_row(self, *args: Any) -> Any:
        """Run the commit statement and return its row.

        Commits go through a connection of their own, outside the pool: a pool's
        acquire and release cost about 40 µs a commit (measured), a tenth of a step.
        A commit that finds it in use (another session's) takes a pooled one.
        """
        if self._commit_task is not None:
            return await self._call("fetchrow", "commit", *args)
        self._commit_task = asyncio.current_task()
        try:
            conn = await self._commit_connection()
            if conn is None:
                return await self._call("fetchrow", "commit", *args)
            try:
                with self._errors(self._place):
                    return await conn.fetchrow(self._sql["commit"], *args)
            except BaseException:
                # Broken, maybe, or left mid-statement: the next commit opens another.
                self._committer = None
                conn.terminate()
                raise
        finally:
            self._commit_task = None

    async def _commit_connection(self) -> Any:
        """Return the commits' own connection, opened if need be; None: use the pool.

        One that cannot be opened (the server's or the role's connection limit, say)
        sends commits to the pool, and none is tried again for ``COMMITTER_RETRY``.
        """
        await self._connect()  # the pool first: its opening migrates the schema
        conn = self._committer
        if conn is not None and not conn.is_closed():
            return conn
        self._committer = None  # dropped by the server or the network, if any
        if time.monotonic() < self._committer_retry:
            return None
        asyncpg = driver()
        try:
            self._committer = await asyncpg.connect(
                self.dsn, server_settings=self._server_settings()
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            self._committer_retry = time.monotonic() + COMMITTER_RETRY
            _log.warning("commit_connection.failed", error=str(exc), retry_in=COMMITTER_RETRY)
        return self._committer

    async def _call(self, method: str, statement: str, *args: Any) -> Any:
        """Run one named statement on a pooled connection (its own transaction)."""
        pool = await self._connect()
        with self._errors(self._place):
            return await getattr(pool, method)(self._sql[statement], *args)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        """Yield a pooled connection inside a transaction, committed on leaving."""
        pool = await self._connect()
        with self._errors(self._place):
            async with pool.acquire() as conn, conn.transaction():
                yield conn

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn the driver's and the network's errors into ``StorageError``."""
        asyncpg = driver()
        try:
            yield
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StorageError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _rollback_if_open(conn: Any) -> None:
    """Ready a connection for the pool's next user, without asyncpg's reset round trip.

    The default reset sends ``RESET ALL; CLOSE ALL; UNLISTEN *; ...`` on every
    release: a round trip per statement, a third of a commit's time. The store sets
    no session state (no SET, LISTEN, cursors or advisory locks), so only a
    transaction left open, after an error, needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class _PostedBefore(Exception):  # noqa: N818  # control flow, never raised to callers
    """An event with this id is in the inbox already: roll back, answer its number."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq
