"""Record framing: round trips, torn tails, and damage that must never pass as data."""

from __future__ import annotations

import gc
import struct
import tracemalloc
import zlib
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    SerializationError,
    Session,
    codec,
)
from engine.models import utcnow

BODIES = [b'{"step":"fetch","output":[1,2,3]}', b"", b'{"state":{"k":"\xc3\xa9"}}']


def journal(bodies: list[bytes]) -> bytes:
    return b"".join(codec.encode_frame(seq, body) for seq, body in enumerate(bodies, 1))


def header(length: int, seq: int = 1, flags: int = 0, body_crc: int = 0) -> bytes:
    """A header with a valid header checksum, claiming whatever we like."""
    head = struct.pack("<2sBBIQI", codec.MAGIC, codec.FORMAT, flags, length, seq, body_crc)
    return head + struct.pack("<I", zlib.crc32(head))


def scan_or_error(data: bytes) -> codec.FrameScan | str:
    """Scan ``data``; return the CorruptSessionError's message instead if it raises."""
    try:
        return codec.scan_frames(data, "journal")
    except CorruptSessionError as exc:
        return str(exc)


def test_frames_round_trip() -> None:
    data = journal(BODIES)

    scan = codec.scan_frames(data, "journal")

    assert [(frame.seq, frame.body) for frame in scan.frames] == list(enumerate(BODIES, 1))
    assert [frame.offset for frame in scan.frames] == [
        0,
        codec.HEADER_SIZE + len(BODIES[0]),
        2 * codec.HEADER_SIZE + len(BODIES[0]) + len(BODIES[1]),
    ]
    assert scan.frames[-1].end == len(data) == scan.valid_end
    assert not scan.torn_tail
    assert all(codec.plain_body(frame, "journal") == frame.body for frame in scan.frames)


def test_an_empty_journal_has_no_frames() -> None:
    scan = codec.scan_frames(b"", "journal")

    assert scan.frames == []
    assert scan.valid_end == 0
    assert not scan.torn_tail


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6), st.data(), st.booleans())
def test_a_journal_cut_anywhere_keeps_exactly_the_whole_records_before_the_cut(
    bodies: list[bytes], data: st.DataObject, in_reserved_space: bool
) -> None:
    full = journal(bodies)
    cut = data.draw(st.integers(min_value=0, max_value=len(full)))
    # A write into zeros reserved after the records leaves zeros where it did not reach
    after = bytes(len(full) - cut + 64) if in_reserved_space else b""

    scan = codec.scan_frames(full[:cut] + after, "journal")

    whole = [frame for frame in codec.scan_frames(full, "journal").frames if frame.end <= cut]
    assert scan.frames == whole
    assert scan.valid_end == (whole[-1].end if whole else 0)
    assert scan.torn_tail == (cut + len(after) != scan.valid_end)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_no_single_byte_flip_ever_yields_a_changed_record(mask: int) -> None:
    original = journal(BODIES)
    written = codec.scan_frames(original, "journal").frames
    last = written[-1]

    for offset in range(len(original)):
        damaged = original[:offset] + bytes([original[offset] ^ mask]) + original[offset + 1 :]
        scan = scan_or_error(damaged)
        if isinstance(scan, str):
            assert scan.startswith("journal: ")
            assert "offset" in scan
            continue
        # Not detected as corruption: only the last record may be lost, as a torn tail,
        # and only when the flip fell inside that last record
        assert last.offset <= offset, offset
        assert scan.torn_tail, offset
        assert scan.frames == written[:-1], offset
        assert scan.valid_end == last.offset


def test_a_last_record_whose_header_never_reached_the_disk_is_a_torn_tail() -> None:
    # A write into reserved zeros, cut by a power cut that kept its body's pages only
    original = journal(BODIES)
    written = codec.scan_frames(original, "journal").frames
    last, middle = written[-1], written[1]

    def header_lost(record: codec.Frame) -> bytes:
        start = record.offset + codec.HEADER_SIZE
        return original[: record.offset] + bytes(codec.HEADER_SIZE) + original[start:]

    scan = codec.scan_frames(header_lost(last) + bytes(64), "journal")

    assert scan.frames == written[:-1]
    assert scan.torn_tail
    # But a record after it was written later, so this one had been acknowledged
    with pytest.raises(CorruptSessionError, match=f"offset {middle.offset}"):
        codec.scan_frames(header_lost(middle), "journal")


def test_damage_before_the_last_record_names_the_record_offset() -> None:
    data = bytearray(journal(BODIES))
    second = codec.scan_frames(bytes(data), "journal").frames[1]
    data[second.offset + 6] ^= 0x10  # inside the length field of a non-final record

    with pytest.raises(CorruptSessionError, match=f"journal: .* offset {second.offset}"):
        codec.scan_frames(bytes(data), "journal")


def test_a_length_of_two_gigabytes_does_not_allocate() -> None:
    huge = header(2**31) + b"tiny"
    just_under = header(codec.MAX_RECORD_BYTES) + b"tiny"

    tracemalloc.start()
    try:
        with pytest.raises(CorruptSessionError, match="offset 0"):
            codec.scan_frames(huge, "journal")
        scan = codec.scan_frames(just_under, "journal")  # looks like an append cut short
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert scan.torn_tail
    assert scan.frames == []
    assert peak < 1 << 20


def test_a_zero_filled_tail_is_torn_but_zeros_before_data_are_corruption() -> None:
    good = journal(BODIES[:2])

    tail = codec.scan_frames(good + bytes(100), "journal")
    assert tail.torn_tail
    assert tail.valid_end == len(good)
    assert len(tail.frames) == 2

    with pytest.raises(CorruptSessionError):
        codec.scan_frames(bytes(100) + good, "journal")


def test_an_unknown_format_is_corruption_not_a_torn_tail() -> None:
    body = b"{}"
    head = struct.pack("<2sBBIQI", codec.MAGIC, 99, 0, len(body), 1, zlib.crc32(body))
    record = head + struct.pack("<I", zlib.crc32(head)) + body

    with pytest.raises(CorruptSessionError, match="format"):
        codec.scan_frames(record + journal(BODIES), "journal")


def test_an_encrypted_record_without_a_key_is_a_decryption_error() -> None:
    frame = codec.scan_frames(
        codec.encode_frame(1, b"ciphertext", flags=codec.FLAG_ENCRYPTED), "journal"
    ).frames[0]

    with pytest.raises(DecryptionError, match="journal: record at offset 0 is encrypted"):
        codec.plain_body(frame, "journal")


def test_unknown_record_flags_are_corruption() -> None:
    frame = codec.scan_frames(codec.encode_frame(1, b"{}", flags=0x40), "journal").frames[0]

    with pytest.raises(CorruptSessionError, match="flags"):
        codec.plain_body(frame, "journal")


def test_a_body_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_RECORD_BYTES", 16)

    with pytest.raises(SerializationError, match="record 7 of 17 bytes exceeds"):
        codec.encode_frame(7, b"x" * 17)
    assert codec.scan_frames(codec.encode_frame(7, b"x" * 16), "j").frames[0].body == b"x" * 16


def test_dump_json_refuses_what_json_cannot_hold() -> None:
    now = utcnow()
    session = Session(
        id="s", created_at=now, last_activity=now, expires_at=now, ttl=1, state={"b": b"\xff"}
    )

    with pytest.raises(SerializationError, match="session s"):
        codec.dump_json(session, "session s")


def test_decode_model_reads_what_dump_json_wrote_and_rejects_the_rest() -> None:
    now = utcnow()
    checkpoint = Checkpoint(
        revision=3,
        status="running",
        last_activity=now,
        expires_at=now + timedelta(seconds=5),
        step="s",
        output={"é": [1, None]},
    )
    good = codec.scan_frames(
        codec.encode_frame(3, codec.dump_json(checkpoint, "checkpoint")), "j"
    ).frames[0]
    wrong = codec.scan_frames(codec.encode_frame(3, b'{"revision": "x"}'), "j").frames[0]

    assert codec.decode_model(Checkpoint, good, "j") == checkpoint
    with pytest.raises(CorruptSessionError, match="j: undecodable record at offset 0"):
        codec.decode_model(Checkpoint, wrong, "j")


def test_decoding_pauses_the_garbage_collector_and_leaves_it_as_it_found_it() -> None:
    # Given a decode that looks at the collector, and one that fails
    seen: list[bool] = []

    @codec.collector_paused
    def decode() -> None:
        seen.append(gc.isenabled())

    @codec.collector_paused
    def broken() -> None:
        raise CorruptSessionError("bad record")

    # Then the collector is off while it runs, and on again after, even after a failure
    assert gc.isenabled()
    decode()
    with pytest.raises(CorruptSessionError):
        broken()
    assert seen == [False]
    assert gc.isenabled()

    # And a collector the application turned off stays off
    gc.disable()
    try:
        decode()
        assert not gc.isenabled()
    finally:
        gc.enable()
