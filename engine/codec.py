"""Record framing and checksums, shared by every store that writes bytes.

A frame is a 24-byte header followed by the body::

    "SV" | format u8 | flags u8 | length u32 | seq u64 | body crc32 u32 | header crc32 u32

The header has its own checksum so that a damaged length field is reported as
corruption instead of being mistaken for a torn (never acknowledged) tail, which
would silently drop every acknowledged record after it.

With flag bit 0 set the body is sealed (``engine.crypto``): data key id (8 bytes),
nonce (12), AES-256-GCM ciphertext and tag, with the session id, the record's
kind (the model's name: ``Session`` or ``Checkpoint``) and ``seq`` as associated
data. The CRCs cover the sealed bytes, so damage is still told from a torn tail
without any key.
"""

from __future__ import annotations

import functools
import gc
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, ParamSpec, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ValidationError

from .crypto import SessionKeys, sealed_key_id
from .errors import CorruptSessionError, DecryptionError, SerializationError

MAGIC = b"SV"
FORMAT = 1
FLAG_ENCRYPTED = 0x01
MAX_RECORD_BYTES = 256 * 1024 * 1024
"""Largest body accepted: a hostile length field must never make us allocate more."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def collector_paused(decode: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``decode`` with Python's cyclic garbage collector paused.

    Rebuilding a long session allocates tens of thousands of objects, none of them
    in cycles; partway through, the collector would walk the whole process's heap
    (a runner's, with every session it runs), which in a busy runner added half
    again to loading a 10,000-step session. A collector already off stays off.
    """

    @functools.wraps(decode)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not gc.isenabled():
            return decode(*args, **kwargs)
        gc.disable()
        try:
            return decode(*args, **kwargs)
        finally:
            gc.enable()

    return paused


_HEAD = struct.Struct("<2sBBIQI")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HEADER_CRC.size


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded record: where it sits and what it holds."""

    seq: int
    flags: int
    body: bytes
    offset: int
    end: int


@dataclass(frozen=True, slots=True)
class FrameScan:
    """The result of reading a journal: its valid records and where they stop."""

    frames: list[Frame]
    valid_end: int
    torn_tail: bool


_M = TypeVar("_M", bound=BaseModel)


def dump_json(model: BaseModel, what: str) -> bytes:
    """Encode ``model`` as compact JSON, or say clearly what cannot be stored.

    Fields equal to their default are left out (decoding puts them back): most of a
    checkpoint is defaults, and every byte saved is a byte not synced. NaN and the
    infinities stay ``NaN`` / ``Infinity`` (``models.StoredModel``), never ``null``.

    Raises:
        SerializationError: a value is not JSON (arbitrary objects, undecodable
            bytes, a lone surrogate...).
    """
    try:
        return model.__pydantic_serializer__.to_json(model, exclude_defaults=True)
    except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None


def check_record_size(seq: int, size: int) -> None:
    """Refuse a record body of ``size`` bytes before anything is written.

    Raises:
        SerializationError: ``size`` is larger than ``MAX_RECORD_BYTES``.
    """
    if size > MAX_RECORD_BYTES:
        raise SerializationError(
            f"record {seq} of {size} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes"
        )


def encode_frame(seq: int, body: bytes, flags: int = 0) -> bytes:
    """Frame ``body`` as record number ``seq``.

    Raises:
        SerializationError: ``body`` is larger than ``MAX_RECORD_BYTES``.
    """
    check_record_size(seq, len(body))
    head = _HEAD.pack(MAGIC, FORMAT, flags, len(body), seq, zlib.crc32(body))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + body


def scan_frames(buf: bytes, source: str) -> FrameScan:
    """Decode every frame of ``buf``, dropping a torn tail and rejecting corruption.

    A torn tail is what an interrupted, never acknowledged write leaves: a short
    header, a body cut short, zero-filled bytes, a last record whose body fails its
    checksum with nothing but zeros after it, or a damaged header with no record
    after it. A write into a journal's reserved zeros (``engine.stores.file``)
    leaves the file's size as it was, so a power cut may keep any of its pages and
    lose the others, its header's included; only one write is ever unacknowledged,
    the last. Anything else that fails a check raises ``CorruptSessionError``
    naming ``source`` and the byte offset.
    """
    frames: list[Frame] = []
    pos, size = 0, len(buf)
    while pos < size:
        if size - pos < HEADER_SIZE:
            return FrameScan(frames, pos, torn_tail=True)
        head = buf[pos : pos + _HEAD.size]
        (header_crc,) = _HEADER_CRC.unpack_from(buf, pos + _HEAD.size)
        if zlib.crc32(head) != header_crc:
            # Zeros (an append the power cut lost, or reserved space), or the last
            # write in part: no record follows, so nothing from here on was acknowledged.
            if not _header_after(buf, pos + 1):
                return FrameScan(frames, pos, torn_tail=True)
            raise CorruptSessionError(f"{source}: damaged record header at offset {pos}")
        magic, fmt, flags, length, seq, body_crc = _HEAD.unpack(head)
        if magic != MAGIC or fmt != FORMAT or length > MAX_RECORD_BYTES:
            raise CorruptSessionError(f"{source}: unknown record format at offset {pos}")
        start, end = pos + HEADER_SIZE, pos + HEADER_SIZE + length
        if end > size:
            return FrameScan(frames, pos, torn_tail=True)
        body = buf[start:end]
        if zlib.crc32(body) != body_crc:
            if zeros_from(buf, end):  # the last record, written in part
                return FrameScan(frames, pos, torn_tail=True)
            raise CorruptSessionError(f"{source}: checksum mismatch in record at offset {pos}")
        frames.append(Frame(seq, flags, body, pos, end))
        pos = end
    return FrameScan(frames, pos, torn_tail=False)


def _header_after(buf: bytes, start: int) -> bool:
    """Tell whether an intact record header (its own CRC checks) starts at ``start`` or later.

    A JSON body never holds one: a header has zero bytes, which JSON escapes.
    """
    at = buf.find(MAGIC, start)
    while at != -1 and len(buf) - at >= HEADER_SIZE:
        (header_crc,) = _HEADER_CRC.unpack_from(buf, at + _HEAD.size)
        if zlib.crc32(buf[at : at + _HEAD.size]) == header_crc:
            return True
        at = buf.find(MAGIC, at + 1)
    return False


def zeros_from(buf: bytes, start: int) -> bool:
    """Tell whether ``buf`` holds nothing but zero bytes from ``start`` on."""
    return buf.count(0, start) == max(len(buf) - start, 0)


def seal_frame(seq: int, kind: str, body: bytes, keys: SessionKeys | None = None) -> bytes:
    """Frame ``body`` as record ``seq`` of kind ``kind``, sealed under ``keys`` if given.

    Raises:
        SerializationError: the record is larger than ``MAX_RECORD_BYTES``.
    """
    if keys is None:
        return encode_frame(seq, body)
    return encode_frame(seq, keys.seal(seq, kind, body), FLAG_ENCRYPTED)


def encode_model(seq: int, model: BaseModel, what: str, keys: SessionKeys | None = None) -> bytes:
    """Encode ``model`` as record ``seq``: JSON, sealed under ``keys`` if given, framed.

    Raises:
        SerializationError: a value is not JSON, or the record is too large.
    """
    return seal_frame(seq, type(model).__name__, dump_json(model, what), keys)


def plain_body(frame: Frame, source: str, keys: SessionKeys | None = None, kind: str = "") -> bytes:
    """Return a frame's body, decrypted with ``keys`` when it is sealed.

    Raises:
        DecryptionError: the record is sealed and no keys were given (naming its key id).
        CorruptSessionError: unknown flags, a record in clear among sealed ones, or a
            sealed record that fails authentication.
    """
    where = f"{source}: record at offset {frame.offset}"
    if frame.flags & ~FLAG_ENCRYPTED:
        raise CorruptSessionError(f"{source}: unknown record flags at offset {frame.offset}")
    if not frame.flags & FLAG_ENCRYPTED:
        if keys is not None and not keys.allows_clear:
            raise CorruptSessionError(f"{where} is in clear inside an encrypted session")
        return frame.body
    if keys is None:
        key_id = sealed_key_id(frame.body)
        named = f" under data key {key_id}" if key_id else ""
        raise DecryptionError(f"{where} is encrypted{named} and no key was given")
    return keys.open(frame.seq, kind, frame.body, where)


def decode_model(
    model: type[_M],
    frame: Frame,
    source: str,
    keys: SessionKeys | None = None,
    *,
    kind: str | None = None,
) -> _M:
    """Decode a frame's JSON body as ``model`` (decrypting it with ``keys`` if sealed).

    ``kind`` is the record kind it was sealed as, when ``model`` reads only part of
    it (a listing's head of a ``Session``); by default, ``model``'s name.
    Anything undecodable is corruption; a sealed record without keys is a
    ``DecryptionError``.
    """
    body = plain_body(frame, source, keys, kind or model.__name__)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise CorruptSessionError(
            f"{source}: undecodable record at offset {frame.offset}: "
            f"{exc.error_count()} validation error(s)"
        ) from None


def frame_key_id(frame: Frame) -> str | None:
    """Return the data key id a sealed frame names; None for a record in clear."""
    return sealed_key_id(frame.body) if frame.flags & FLAG_ENCRYPTED else None


# -- integrity checks (``stepvault verify``) ---------------------------------------------

Verdict = Literal["ok", "torn tail", "corrupt", "undecryptable", "unreadable"]
"""What ``verify`` found: ``torn tail`` is an interrupted, never acknowledged append
(harmless); ``unreadable`` is an I/O or permission problem, not damage."""

BAD_VERDICTS: frozenset[str] = frozenset({"corrupt", "undecryptable", "unreadable"})


@dataclass(frozen=True, slots=True)
class SessionCheck:
    """The outcome of checking every record of one stored session."""

    session_id: str
    verdict: Verdict
    detail: str = ""


@runtime_checkable
class Checking(Protocol):
    """A store that can check a session record by record and quarantine a corrupt one."""

    async def check(self, session_id: str) -> SessionCheck:
        """Check every live record's checksum and tag; never changes anything."""
        ...

    async def quarantine(self, session_id: str) -> str:
        """Move a corrupt session aside (not deleted); return where it went."""
        ...


def decode_record(
    model: type[_M], record: bytes, source: str, keys: SessionKeys | None = None
) -> _M:
    """Decode a record stored on its own (a database cell) as ``model``.

    A database writes a cell whole or not at all, so unlike a journal's last
    record, a short or failing record here is never a torn write: it is corruption.
    """
    scan = scan_frames(record, source)
    if scan.torn_tail or len(scan.frames) != 1:
        raise CorruptSessionError(f"{source}: damaged record ({len(record)} bytes)")
    return decode_model(model, scan.frames[0], source, keys)
