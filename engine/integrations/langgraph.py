"""LangGraph checkpoints in any stepvault store: ``StepvaultSaver``.

Give a compiled graph ``checkpointer=StepvaultSaver(store)`` and its threads
persist through stepvault: each thread is one session (TTL, checksums, encryption
when the store has a key, ``stepvault sessions`` to inspect it), and each
``put``/``put_writes`` is one atomic checkpoint of that session holding only what
changed: a checkpoint record plus the channel values whose version moved. Storage
grows with the steps taken, not with the square of them.

Sync and async methods both work: every store call runs on one private event loop
thread, so a store is never shared between loops.
"""

from __future__ import annotations

import builtins
import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

from ..errors import InvalidArgumentError
from ..models import to_seconds
from ..stores.base import Store
from . import MissingExtraError
from . import _deltas as deltas
from ._background import BackgroundLoop
from ._threads import (
    THREAD_KEY,
    WORKFLOW,
    Changes,
    Thread,
    ThreadStore,
    blob_key,
    checkpoint_key,
    session_id_for,
    write_key,
)

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        DeltaChannelHistory,
        get_checkpoint_id,
        get_serializable_checkpoint_metadata,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:
    raise MissingExtraError.naming("langgraph", "engine.integrations.langgraph", exc) from exc

from ._records import Records, config_for

__all__ = ["THREAD_KEY", "WORKFLOW", "StepvaultSaver", "session_id_for"]

DEFAULT_TTL = 7 * 24 * 3600.0
"""A thread lives a week after its last checkpoint unless told otherwise."""


class StepvaultSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpoint saver backed by any stepvault ``Store``.

    Args:
        store: where threads live; the saver closes it when it closes.
        ttl: seconds (or a timedelta) a new thread lives after its last write
            (each write slides it); an expired thread reads as absent and is
            removed by ``stepvault cleanup`` or a ``SessionManager`` sweep.
        lease_wait: seconds a write waits for another process's lease on the
            same thread before ``SessionBusyError``.
        lease_hold: seconds the saver keeps a thread's lease after its last write,
            so the checkpoints of one run share one lease; another process that
            writes to the same thread waits at most this long.
        serde: LangGraph's serializer for values (default: its JSON+msgpack one,
            which never unpickles).

    Use it as a (sync or async) context manager, or call ``close``/``aclose``.
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float | timedelta = DEFAULT_TTL,
        lease_wait: float = 30.0,
        lease_hold: float = 1.0,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if not (lease_wait >= 0 and lease_hold >= 0):
            raise InvalidArgumentError(
                f"lease_wait and lease_hold are seconds, at least 0: got {lease_wait}, {lease_hold}"
            )
        self.store = store
        self._threads = ThreadStore(
            store, ttl=to_seconds(ttl), lease_wait=lease_wait, hold=lease_hold
        )
        self._loop = BackgroundLoop("stepvault-langgraph")

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the store and stop the saver's loop thread; closing twice is harmless."""
        if not self._loop.closed:
            self._loop.run(self._threads.close())
        self._loop.close()

    async def aclose(self) -> None:
        """Close the store and stop the saver's loop thread, from async code."""
        if not self._loop.closed:
            await self._loop.run_async(self._threads.close())
        self._loop.close()

    def __enter__(self) -> StepvaultSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> StepvaultSaver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the async interface (what LangGraph's async graphs and the conformance suite call)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Return the checkpoint ``config`` names (the thread's latest without an id)."""
        return await self._loop.run_async(self._get_tuple(config))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Yield matching checkpoints, newest first."""
        found = await self._loop.run_async(self._list(config, filter, before, limit))
        for item in found:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Commit a checkpoint with the channel values whose versions are new."""
        return await self._loop.run_async(self._put(config, checkpoint, metadata, new_versions))

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Commit a task's pending writes against the checkpoint ``config`` names."""
        await self._loop.run_async(self._put_writes(config, writes, task_id, task_path))

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete a thread's session with every checkpoint and write in it."""
        await self._loop.run_async(self._threads.delete(str(thread_id)))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) made by the given runs, in every thread."""
        await self._loop.run_async(self._delete_for_runs(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread into another."""
        await self._loop.run_async(self._copy_thread(str(source_thread_id), str(target_thread_id)))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Keep only each namespace's latest checkpoint (``keep_latest``), or ``delete`` all."""
        await self._loop.run_async(self._prune(thread_ids, strategy))

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Walk the parent chain once for ``DeltaChannel`` replay, from one read of the thread."""
        return await self._loop.run_async(self._delta_history(config, channels))

    # -- the sync interface (graph.invoke / graph.stream) ---------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Return the checkpoint ``config`` names (the thread's latest without an id)."""
        return self._loop.run(self._get_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Return matching checkpoints, newest first."""
        return iter(self._loop.run(self._list(config, filter, before, limit)))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Commit a checkpoint with the channel values whose versions are new."""
        return self._loop.run(self._put(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Commit a task's pending writes against the checkpoint ``config`` names."""
        self._loop.run(self._put_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        """Delete a thread's session with every checkpoint and write in it."""
        self._loop.run(self._threads.delete(str(thread_id)))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints (and their writes) made by the given runs, in every thread."""
        self._loop.run(self._delete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of one thread into another."""
        self._loop.run(self._copy_thread(str(source_thread_id), str(target_thread_id)))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Keep only each namespace's latest checkpoint (``keep_latest``), or ``delete`` all."""
        self._loop.run(self._prune(thread_ids, strategy))

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """Walk the parent chain once for ``DeltaChannel`` replay, from one read of the thread."""
        return self._loop.run(self._delta_history(config, channels))

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Return the next channel version: zero-padded count, then a random tiebreak.

        Values are stored per version; the random part keeps a fork's new value
        from overwriting the value an older branch stored at the same count.
        """
        if current is None:
            count = 0
        elif isinstance(current, int):
            count = current
        else:
            count = int(str(current).split(".")[0])
        return f"{count + 1:032}.{random.random():016}"

    # -- implementation: runs on the saver's loop ---------------------------------

    @property
    def _records(self) -> Records:
        return Records(self.serde)  # read at call time: with_allowlist swaps the serde

    async def _get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, ns, checkpoint_id = _target(config)
        records = self._records

        def view(thread: Thread | None) -> CheckpointTuple | None:
            if thread is None:
                return None
            ids = thread.checkpoint_ids(ns or "")
            wanted = checkpoint_id if checkpoint_id is not None else max(ids, default=None)
            if wanted is None or wanted not in ids:
                return None
            return records.checkpoint_tuple(thread, ns or "", wanted)

        return await self._threads.read(thread_id, view)

    async def _list(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> builtins.list[CheckpointTuple]:
        ns, checkpoint_id = (None, None) if config is None else _target(config)[1:]
        before_id = get_checkpoint_id(before) if before is not None else None
        records = self._records

        def view(thread: Thread) -> builtins.list[CheckpointTuple]:
            namespaces = [ns] if ns is not None else thread.namespaces()
            candidates = sorted(
                ((cid, n) for n in namespaces for cid in thread.checkpoint_ids(n)), reverse=True
            )
            found: builtins.list[CheckpointTuple] = []
            for cid, n in candidates:
                if limit is not None and len(found) >= limit:
                    break
                if (checkpoint_id is not None and cid != checkpoint_id) or (
                    before_id is not None and cid >= before_id
                ):
                    continue
                metadata = records.metadata(thread, n, cid)
                if filter and any(metadata.get(k) != v for k, v in filter.items()):
                    continue
                found.append(records.checkpoint_tuple(thread, n, cid, metadata))
            return found

        if config is None:
            found = await self._threads.read_all(view)
        else:
            found = await self._threads.read(
                _target(config)[0], lambda thread: [] if thread is None else view(thread)
            )
        return found if limit is None else found[: max(limit, 0)]

    async def _put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        thread_id, ns, parent_id = _target(config)
        ns = ns or ""
        records = self._records
        stored: dict[str, Any] = dict(checkpoint)
        values: dict[str, Any] = stored.pop("channel_values", {})
        full_metadata = get_serializable_checkpoint_metadata(config, metadata)
        cid = checkpoint["id"]
        record: dict[str, Any] = {
            "parent": parent_id,
            "checkpoint": deltas.whole(*records.serialize(stored, f"checkpoint {cid}")),
            "metadata": deltas.whole(*records.serialize(full_metadata, f"metadata of {cid}")),
        }
        run_id = full_metadata.get("run_id")
        if isinstance(run_id, str):  # kept plain so delete_for_runs decodes nothing
            record["run_id"] = run_id
        # Serialized once, outside the plan: the plan may run twice (a stale mirror).
        encoded = {
            channel: (version, records.serialize(values[channel], f"channel {channel!r}"))
            for channel, version in new_versions.items()
            if channel in values  # a channel without a value at a new version is empty
        }

        def plan(thread: Thread | None) -> Changes:
            changes: dict[str, Any] = {checkpoint_key(ns, cid): record}
            for channel, (version, typed) in encoded.items():
                changes[blob_key(ns, channel, version)] = records.value_record(
                    thread, ns, channel, parent_id, typed
                )
                if thread is not None:  # the next write of this channel appends to it
                    thread.memo[ns, channel] = (version, *typed)
            return Changes(set=changes)

        await self._threads.change(thread_id, plan)
        return config_for(thread_id, ns, cid)

    async def _put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> None:
        thread_id, ns, checkpoint_id = _target(config)
        if checkpoint_id is None:
            raise InvalidArgumentError("put_writes needs config['configurable']['checkpoint_id']")
        records = self._records
        entries = []
        for idx, (channel, value) in enumerate(writes):
            slot = WRITES_IDX_MAP.get(channel, idx)  # special channels get one fixed slot
            key = write_key(ns or "", checkpoint_id, task_id, slot)
            typed = records.serialize(value, f"write to channel {channel!r}")
            entries.append((key, slot, [task_path, channel, *deltas.whole(*typed)]))

        def plan(thread: Thread | None) -> Changes:
            # A regular write already stored is a replay of the same task: keep the first.
            return Changes(
                set={
                    key: record
                    for key, slot, record in entries
                    if slot < 0 or thread is None or key not in thread.records
                }
            )

        await self._threads.change(thread_id, plan)

    async def _delete_for_runs(self, run_ids: Sequence[str]) -> None:
        runs = set(run_ids)
        if not runs:
            return
        records = self._records

        def made_by_runs(ns: str, cid: str, record: Any) -> bool:
            return isinstance(record, dict) and record.get("run_id") in runs

        def affected(thread: Thread) -> builtins.list[str]:
            hit = any(
                made_by_runs(n, cid, thread.records[checkpoint_key(n, cid)])
                for n in thread.namespaces()
                for cid in thread.checkpoint_ids(n)
            )
            return [thread.thread_id] if hit else []

        for thread_id in await self._threads.read_all(affected):
            await self._threads.change(thread_id, lambda t: records.drop(t, made_by_runs))

    async def _copy_thread(self, source: str, target: str) -> None:
        copied = await self._threads.read(
            source, lambda thread: None if thread is None else dict(thread.records)
        )
        if copied:
            await self._threads.change(target, lambda _: Changes(set=copied))

    async def _prune(self, thread_ids: Sequence[str], strategy: str) -> None:
        if strategy not in ("keep_latest", "delete"):
            raise InvalidArgumentError(
                f"prune strategy must be 'keep_latest' or 'delete', got {strategy!r}"
            )
        for thread_id in thread_ids:
            if strategy == "delete":
                await self._threads.delete(str(thread_id))
            else:
                await self._threads.change(str(thread_id), self._records.keep_latest)

    async def _delta_history(
        self, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        if not channels:
            return {}
        thread_id, ns, checkpoint_id = _target(config)
        records = self._records
        return await self._threads.read(
            thread_id,
            lambda thread: records.delta_history(thread, ns or "", checkpoint_id, channels),
        )


def _target(config: RunnableConfig) -> tuple[str, str | None, str | None]:
    """Return the thread id, namespace (None if absent) and checkpoint id of a config."""
    configurable = config.get("configurable") or {}
    thread_id = configurable.get("thread_id")
    if thread_id is None:
        raise InvalidArgumentError("a LangGraph config needs config['configurable']['thread_id']")
    return str(thread_id), configurable.get("checkpoint_ns"), get_checkpoint_id(config)
