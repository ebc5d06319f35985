"""LangGraph values and a thread's records, both ways, through LangGraph's serializer.

Imported by ``langgraph.py`` once LangGraph is known to be installed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    Checkpoint,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..errors import CorruptSessionError, SerializationError
from . import _deltas as deltas
from ._threads import Changes, Thread, blob_key, checkpoint_key

ABSENT = object()
"""A channel with no value at a version (LangGraph's "empty")."""


def config_for(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    """Return the config that names one checkpoint."""
    return {
        "configurable": {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint_id,
        }
    }


@dataclass(frozen=True, slots=True)
class Records:
    """Read and plan a thread's records with one serializer (the saver's, at call time)."""

    serde: SerializerProtocol

    # -- writing -----------------------------------------------------------------------

    def serialize(self, value: Any, what: str) -> tuple[str, bytes]:
        """Serialize a value; ``SerializationError`` naming ``what`` if it cannot be."""
        try:
            return self.serde.dumps_typed(value)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"LangGraph {what} cannot be serialized: {exc}") from exc

    def value_record(
        self,
        thread: Thread | None,
        ns: str,
        channel: str,
        parent_id: str | None,
        typed: tuple[str, bytes],
    ) -> Any:
        """Return a value's record: the items it appends to the channel's last value, if so."""
        type_, data = typed
        if thread is None or type_ != deltas.APPENDABLE:
            return deltas.whole(type_, data)
        last = thread.memo.get((ns, channel))
        if last is None or blob_key(ns, channel, last[0]) not in thread.records:
            last = self._parent_value(thread, ns, channel, parent_id)
        if last is not None and last[1] == type_:
            delta = deltas.appended(str(last[0]), last[2], data)
            if delta is not None:
                return delta
        return deltas.whole(type_, data)

    def _parent_value(
        self, thread: Thread, ns: str, channel: str, parent_id: str | None
    ) -> tuple[object, str, bytes] | None:
        """Return the channel's ``(version, type, bytes)`` at the parent checkpoint."""
        record = thread.records.get(checkpoint_key(ns, parent_id)) if parent_id else None
        if record is None:
            return None
        versions = self.versions(thread, record, parent_id)
        if channel not in versions:
            return None
        found = deltas.value_bytes(thread.records, ns, channel, versions[channel], _what(thread))
        return None if found is None else (versions[channel], *found)

    # -- reading -----------------------------------------------------------------------

    def checkpoint_tuple(
        self, thread: Thread, ns: str, checkpoint_id: str, metadata: Any = None
    ) -> CheckpointTuple:
        """Rebuild one checkpoint with its channel values and pending writes."""
        record = thread.records[checkpoint_key(ns, checkpoint_id)]
        checkpoint = self.decode(record["checkpoint"], thread, f"checkpoint {checkpoint_id}")
        values = {}
        for channel, version in checkpoint["channel_versions"].items():
            value = self.value(thread, ns, channel, version)
            if value is not ABSENT:
                values[channel] = value
        parent = record["parent"]
        return CheckpointTuple(
            config=config_for(thread.thread_id, ns, checkpoint_id),
            checkpoint=cast(Checkpoint, {**checkpoint, "channel_values": values}),
            metadata=self.metadata(thread, ns, checkpoint_id) if metadata is None else metadata,
            parent_config=config_for(thread.thread_id, ns, parent) if parent else None,
            pending_writes=self.ordered_writes(thread, ns, checkpoint_id),
        )

    def metadata(self, thread: Thread, ns: str, checkpoint_id: str) -> Any:
        """Return a checkpoint's metadata."""
        record = thread.records[checkpoint_key(ns, checkpoint_id)]
        return self.decode(record["metadata"], thread, f"metadata of checkpoint {checkpoint_id}")

    def ordered_writes(self, thread: Thread, ns: str, checkpoint_id: str) -> list[PendingWrite]:
        """Return a checkpoint's pending writes in the order LangGraph applies them."""
        writes = sorted(
            thread.writes_of(ns, checkpoint_id),
            key=lambda w: writes_sort_key(w.record[0], w.task_id, w.idx),
        )
        what = f"a write of checkpoint {checkpoint_id}"
        return [(w.task_id, w.record[1], self.decode(w.record[2:], thread, what)) for w in writes]

    def versions(self, thread: Thread, record: Any, checkpoint_id: object) -> dict[str, Any]:
        """Return the channel versions of a checkpoint record."""
        checkpoint = self.decode(record["checkpoint"], thread, f"checkpoint {checkpoint_id}")
        versions: dict[str, Any] = checkpoint["channel_versions"]
        return versions

    def value(self, thread: Thread, ns: str, channel: str, version: object) -> Any:
        """Return a channel's value at a version, or ``ABSENT`` if it had none."""
        found = deltas.value_bytes(thread.records, ns, channel, version, _what(thread))
        if found is None:
            return ABSENT
        return self._loads(found, thread, f"channel {channel!r}")

    def decode(self, record: Any, thread: Thread, what: str) -> Any:
        """Decode a ``[type, base64]`` record."""
        try:
            type_, data = record
            raw = base64.b64decode(data, validate=True)
        except (TypeError, ValueError, binascii.Error) as exc:
            raise CorruptSessionError(f"{_what(thread)}: {what} is malformed: {exc}") from exc
        return self._loads((type_, raw), thread, what)

    def _loads(self, typed: tuple[str, bytes], thread: Thread, what: str) -> Any:
        try:
            return self.serde.loads_typed(typed)
        except (TypeError, ValueError) as exc:
            raise CorruptSessionError(f"{_what(thread)}: {what} cannot be decoded: {exc}") from exc

    def delta_history(
        self,
        thread: Thread | None,
        ns: str,
        checkpoint_id: str | None,
        channels: Sequence[str],
    ) -> dict[str, DeltaChannelHistory]:
        """Collect ``DeltaChannel`` replay data along the parent chain (LangGraph's contract).

        Each channel gathers its writes from the target's parent back to the nearest
        ancestor that stored a value for it (the seed, whose own writes count too).
        """
        collected: dict[str, list[PendingWrite]] = {ch: [] for ch in channels}
        seeds: dict[str, Any] = {}
        remaining = set(channels)
        ids = set() if thread is None else thread.checkpoint_ids(ns)
        target = checkpoint_id if checkpoint_id is not None else max(ids, default=None)
        cursor = None
        if thread is not None and target in ids:
            cursor = thread.records[checkpoint_key(ns, target)]["parent"]
        while thread is not None and cursor in ids and remaining:
            record = thread.records[checkpoint_key(ns, cursor)]
            versions = self.versions(thread, record, cursor)
            found_here = {}
            for ch in remaining.intersection(versions):
                value = self.value(thread, ns, ch, versions[ch])
                if value is not ABSENT:
                    found_here[ch] = value
            for write in reversed(self.ordered_writes(thread, ns, cursor)):
                if write[1] in remaining:
                    collected[write[1]].append(write)
            for ch, value in found_here.items():
                seeds[ch] = value
                remaining.discard(ch)
            cursor = record["parent"]
        result: dict[str, DeltaChannelHistory] = {}
        for ch in channels:
            entry: DeltaChannelHistory = {"writes": list(reversed(collected[ch]))}
            if ch in seeds:
                entry["seed"] = seeds[ch]
            result[ch] = entry
        return result

    # -- removing ------------------------------------------------------------------------

    def keep_latest(self, thread: Thread | None) -> Changes:
        """Plan removing all but each namespace's latest checkpoint (and what it needs)."""
        if thread is None:
            return Changes()
        kept: set[tuple[str, str]] = set()
        for ns in thread.namespaces():
            ids = thread.checkpoint_ids(ns)
            latest = max(ids)
            # A DeltaChannel's value is replayed from ancestors' writes back to the
            # nearest ancestor that stored it: keep that part of the chain.
            unseeded = set(
                self.metadata(thread, ns, latest).get("counters_since_delta_snapshot") or ()
            )
            cursor: str | None = latest
            while cursor is not None and cursor in ids and (ns, cursor) not in kept:
                kept.add((ns, cursor))
                record = thread.records[checkpoint_key(ns, cursor)]
                versions = self.versions(thread, record, cursor)
                unseeded -= {
                    ch
                    for ch in unseeded.intersection(versions)
                    if self.value(thread, ns, ch, versions[ch]) is not ABSENT
                }
                cursor = record["parent"] if unseeded else None
        return self.drop(thread, lambda ns, cid, _: (ns, cid) not in kept)

    def drop(self, thread: Thread | None, doomed: Callable[[str, str, Any], bool]) -> Changes:
        """Plan removing the checkpoints ``doomed`` picks, their writes, and unused values."""
        if thread is None:
            return Changes()
        unset: list[str] = []
        used: set[str] = set()
        kept_any = False
        for ns in thread.namespaces():
            for cid in thread.checkpoint_ids(ns):
                key = checkpoint_key(ns, cid)
                record = thread.records[key]
                if doomed(ns, cid, record):
                    unset.append(key)
                    unset.extend(write.key for write in thread.writes_of(ns, cid))
                    continue
                kept_any = True
                for ch, version in self.versions(thread, record, cid).items():
                    used.update(deltas.bases(thread.records, ns, ch, version))
        if not unset:
            return Changes()
        if not kept_any:  # nothing left in the thread: remove its session
            return Changes(drop=True)
        unset.extend(key for key in thread.blob_keys() if key not in used)
        return Changes(unset=unset)


def _what(thread: Thread) -> str:
    return f"session {thread.session_id} (LangGraph thread {thread.thread_id!r})"
