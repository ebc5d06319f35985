"""Channel values as stored records: whole, or as items appended to an earlier value.

A list that only grows (a message history, a reducer like ``operator.add``) is the
usual LangGraph state, and storing it whole at every step costs O(N²) bytes over N
steps. When a value's msgpack encoding is an earlier stored value's encoding with
items appended, only the appended items' bytes are stored, with a link to that
earlier value. Reading rebuilds the exact bytes that were written, so the delta
form can never change what a value decodes to.

Records: ``[type, base64]`` (whole) or ``{"base": version, "count": n, "add":
base64}`` (``n`` items appended to the value at ``version`` of the same channel).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import CorruptSessionError
from ._threads import blob_key

APPENDABLE = "msgpack"
"""The serializer type whose top-level arrays can be extended byte for byte."""


def whole(type_: str, data: bytes) -> list[str]:
    """Return the record of a value stored whole."""
    return [type_, base64.b64encode(data).decode("ascii")]


def appended(base_version: str, old: bytes, new: bytes) -> dict[str, Any] | None:
    """Return a delta record if ``new`` is ``old`` with items appended, else None.

    Both are the msgpack encodings of top-level arrays; item encodings are
    self-delimiting, so equal item bytes up to ``old``'s end mean ``new`` holds
    ``old``'s items followed by its own.
    """
    old_head, new_head = _array_header(old), _array_header(new)
    if old_head is None or new_head is None:
        return None
    (old_count, old_size), (new_count, new_size) = old_head, new_head
    items = old[old_size:]
    if new_count < old_count or not new.startswith(items, new_size):
        return None
    added = new[new_size + len(items) :]
    return {
        "base": base_version,
        "count": new_count - old_count,
        "add": base64.b64encode(added).decode("ascii"),
    }


def value_bytes(
    records: Mapping[str, Any], ns: str, channel: str, version: object, what: str
) -> tuple[str, bytes] | None:
    """Rebuild the ``(type, bytes)`` a channel had at a version, None if it had no value.

    Raises:
        CorruptSessionError: a delta's base is missing or a record is malformed.
    """
    key = blob_key(ns, channel, version)
    record = records.get(key)
    if record is None:
        return None
    parts: list[tuple[int, bytes]] = []
    try:
        while isinstance(record, dict):
            parts.append((int(record["count"]), base64.b64decode(record["add"], validate=True)))
            key = blob_key(ns, channel, record["base"])
            record = records.get(key)
            if record is None or len(parts) > len(records):
                raise CorruptSessionError(f"{what}: channel {channel!r} lost its base value {key}")
        type_, encoded = record
        data = base64.b64decode(encoded, validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSessionError(f"{what}: record {key} is malformed: {exc}") from exc
    if not parts:
        return type_, data
    head = _array_header(data)
    if head is None:
        raise CorruptSessionError(f"{what}: record {key} is not a list but has appended items")
    count, size = head
    total = count + sum(n for n, _ in parts)
    return type_, _header(total) + data[size:] + b"".join(added for _, added in reversed(parts))


def bases(records: Mapping[str, Any], ns: str, channel: str, version: object) -> Iterator[str]:
    """Yield the keys a stored value depends on: its own and its bases', newest first."""
    key = blob_key(ns, channel, version)
    seen: set[str] = set()
    while key not in seen:
        seen.add(key)
        yield key
        record = records.get(key)
        if not isinstance(record, dict) or "base" not in record:
            return
        key = blob_key(ns, channel, record["base"])


def _array_header(data: bytes) -> tuple[int, int] | None:
    """Return ``(item count, header size)`` of a msgpack array, None if not an array."""
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F, 1
    if first == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big"), 3
    if first == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big"), 5
    return None


def _header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")
