"""Record framing and checksums, shared by every store that writes bytes.

A frame is a 24-byte header followed by the body::

    "SV" | format u8 | flags u8 | length u32 | seq u64 | body crc32 u32 | header crc32 u32

The header has its own checksum so that a damaged length field is reported as
corruption instead of being mistaken for a torn (never acknowledged) tail, which
would silently drop every acknowledged record after it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from .errors import CorruptSessionError, DecryptionError, SerializationError

MAGIC = b"SV"
FORMAT = 1
FLAG_ENCRYPTED = 0x01
MAX_RECORD_BYTES = 256 * 1024 * 1024
"""Largest body accepted: a hostile length field must never make us allocate more."""

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
    """Encode ``model`` as JSON, or say clearly what cannot be stored.

    NaN and the infinities are written as ``NaN`` / ``Infinity`` (the extension
    Python's ``json`` writes and pydantic reads back): ``model_dump_json`` would
    silently turn them into ``null``, and a resumed step would get None.

    Raises:
        SerializationError: a value is not JSON (arbitrary objects, undecodable
            bytes, a lone surrogate...).
    """
    try:
        return pydantic_core.to_json(model.model_dump(), inf_nan_mode="constants")
    except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from None


def encode_frame(seq: int, body: bytes, flags: int = 0) -> bytes:
    """Frame ``body`` as record number ``seq``.

    Raises:
        SerializationError: ``body`` is larger than ``MAX_RECORD_BYTES``.
    """
    if len(body) > MAX_RECORD_BYTES:
        raise SerializationError(
            f"record {seq} of {len(body)} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes"
        )
    head = _HEAD.pack(MAGIC, FORMAT, flags, len(body), seq, zlib.crc32(body))
    return head + _HEADER_CRC.pack(zlib.crc32(head)) + body


def scan_frames(buf: bytes, source: str) -> FrameScan:
    """Decode every frame of ``buf``, dropping a torn tail and rejecting corruption.

    A torn tail is what an interrupted, never acknowledged append leaves: a short
    header, a body cut short, zero-filled bytes, or a final record whose body fails
    its checksum. Anything else that fails a check raises ``CorruptSessionError``
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
            if not any(buf[pos:]):  # a zero-filled tail: an append the power cut lost
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
            if end == size:
                return FrameScan(frames, pos, torn_tail=True)
            raise CorruptSessionError(f"{source}: checksum mismatch in record at offset {pos}")
        frames.append(Frame(seq, flags, body, pos, end))
        pos = end
    return FrameScan(frames, pos, torn_tail=False)


def plain_body(frame: Frame, source: str) -> bytes:
    """Return a frame's body, refusing encrypted records this build cannot open."""
    if frame.flags & FLAG_ENCRYPTED:
        raise DecryptionError(
            f"{source}: record at offset {frame.offset} is encrypted and no key was given"
        )
    if frame.flags:
        raise CorruptSessionError(f"{source}: unknown record flags at offset {frame.offset}")
    return frame.body


def decode_model(model: type[_M], frame: Frame, source: str) -> _M:
    """Decode a frame's JSON body as ``model``; anything undecodable is corruption."""
    body = plain_body(frame, source)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise CorruptSessionError(
            f"{source}: undecodable record at offset {frame.offset}: "
            f"{exc.error_count()} validation error(s)"
        ) from None
