"""Hostile input: whatever bytes are on disk, loading never runs code, never hangs,
never allocates without bound, and never raises anything but an ``EngineError``.

Hypothesis drives the record decoder, the key-record parser and the file store's
session loader with random bytes, random JSON, and valid (sealed) records mutated
the way damage or an attacker would (flips, cuts, splices, and header fields
rewritten with fresh checksums). CI runs ``STEPVAULT_FUZZ_EXAMPLES`` examples per
property (default 300); ``benchmarks/fuzz_records.py`` runs 100,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import re
import shutil
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import (
    Checkpoint,
    CorruptSessionError,
    DecryptionError,
    EngineError,
    FileStore,
    Session,
    ToolResult,
    codec,
)
from engine.crypto import Encryption, KeyRing, master_key_ids

EXAMPLES = int(os.environ.get("STEPVAULT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # generous on a busy machine; a hang never passes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SESSION_ID = "7d3c6a0e-5f1b-4c2d-9e8f-0a1b2c3d4e5f"
KEY = bytes(range(32))
ENGINE = Path(__file__).resolve().parents[1] / "engine"


ENCRYPTION = Encryption(KeyRing(KEY))
KEY_RECORD = ENCRYPTION.new_session_record(SESSION_ID)
KEYS = ENCRYPTION.open_session_keys(SESSION_ID, KEY_RECORD)

# -- strategies ------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=16)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=16,
)
timestamps = st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.isoformat())
field_values = timestamps | json_values | st.sampled_from(["running", "completed", SESSION_ID])
session_like = st.fixed_dictionaries(
    {
        "id": st.just(SESSION_ID) | st.text(max_size=40),
        "created_at": field_values,
        "last_activity": field_values,
        "expires_at": field_values,
        "ttl": st.floats() | st.integers() | json_values,
    },
    optional={
        "status": field_values,
        "state": json_values,
        "tool_history": json_values,
        "revision": st.integers(),
        "steps_done": json_values,
    },
)
checkpoint_like = st.fixed_dictionaries(
    {
        "revision": st.integers(-2, 4) | json_values,
        "status": field_values,
        "last_activity": field_values,
        "expires_at": field_values,
    },
    optional={
        "step": field_values,
        "output": json_values,
        "state_set": json_values,
        "state_unset": json_values,
        "tool_results": json_values,
    },
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def records(draw: st.DrawFn) -> list[tuple[int, bytes, bool]]:
    """Several (seq, JSON body, sealed?) records: mostly in order, sometimes not."""
    count = draw(st.integers(0, 4))
    first = draw(st.integers(0, 2))
    body = session_like.map(dumps) if draw(st.booleans()) else checkpoint_like.map(dumps)
    return [
        (draw(st.just(first + i) | st.integers(0, 2**64 - 1)), draw(body), draw(st.booleans()))
        for i in range(count)
    ]


def framed(items: list[tuple[int, bytes, bool]], kind: str) -> bytes:
    return b"".join(
        codec.seal_frame(seq, kind, body, KEYS if sealed else None) for seq, body, sealed in items
    )


def reframe(data: bytes, offset: int, field: str, value: int) -> bytes:
    """Rewrite one header field of the frame at ``offset`` with valid checksums."""
    if len(data) < offset + codec.HEADER_SIZE:
        return data
    fields = list(struct.unpack_from("<2sBBIQI", data, offset))
    index = {"format": 1, "flags": 2, "length": 3, "seq": 4, "crc": 5}[field]
    fields[index] = value % (2**64 if field == "seq" else 2**8 if index < 3 else 2**32)
    head = struct.pack("<2sBBIQI", *fields)
    return data[:offset] + head + struct.pack("<I", zlib.crc32(head)) + data[offset + 24 :]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Apply a few of the changes damage or an attacker makes to ``data``."""
    for _ in range(draw(st.integers(0, 3))):
        size = len(data)
        at = draw(st.integers(0, size))
        action = draw(
            st.sampled_from(["flip", "cut", "insert", "delete", "duplicate", "header", "zero"])
        )
        if action == "flip" and size:
            at = min(at, size - 1)
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif action == "cut":
            data = data[:at]
        elif action == "insert":
            data = data[:at] + draw(st.binary(max_size=64)) + data[at:]
        elif action == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 64)) :]
        elif action == "duplicate":
            data = data[:at] + data[at : at + draw(st.integers(1, 512))] + data[at:]
        elif action == "zero":
            data = data[:at] + bytes(draw(st.integers(1, 64))) + data[at:]
        else:
            field = draw(st.sampled_from(["format", "flags", "length", "seq", "crc"]))
            data = reframe(data, at, field, draw(st.integers(0, 2**64 - 1)))
    return data


moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def valid_snapshot(draw: st.DrawFn) -> bytes:
    """A well-formed snapshot of the fuzzed session, sealed or not."""
    now = draw(moments)
    session = Session(
        id=SESSION_ID,
        created_at=now,
        last_activity=now,
        expires_at=now + timedelta(hours=1),
        ttl=3600,
        state=draw(st.dictionaries(texts, json_values, max_size=3)),
        revision=draw(st.integers(0, 2)),
    )
    keys = KEYS if draw(st.booleans()) else None
    return codec.encode_model(session.revision, session, "fuzz", keys)


@st.composite
def valid_journal(draw: st.DrawFn) -> bytes:
    """Well-formed checkpoints 1, 2, ... of the fuzzed session, sealed or not."""
    parts = []
    keys = KEYS if draw(st.booleans()) else None
    for revision in range(1, draw(st.integers(1, 4))):
        now = draw(moments)
        result = ToolResult(
            name="step", output=draw(json_values), started_at=now, finished_at=now, duration=0
        )
        checkpoint = Checkpoint(
            revision=revision,
            status="running",
            last_activity=now,
            expires_at=now + timedelta(hours=1),
            step=f"step-{revision}",
            output=draw(json_values),
            tool_results=[result],
        )
        parts.append(codec.encode_model(revision, checkpoint, "fuzz", keys))
    return b"".join(parts)


@st.composite
def record_files(draw: st.DrawFn, kind: str) -> bytes:
    """Random bytes, random JSON records, or valid records: all mutated a little."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(max_size=2048))
    if choice <= 2:
        return draw(mutated(framed(draw(records()), kind)))
    valid = draw(valid_snapshot() if kind == "Session" else valid_journal())
    return draw(mutated(valid))


key_records = st.binary(max_size=800) | st.just(KEY_RECORD) | mutated(KEY_RECORD)


@contextlib.contextmanager
def bounded_memory(size: int) -> Iterator[None]:
    """Fail if the block allocates more than a small multiple of its input at peak."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + (4 << 20), f"{peak} bytes allocated for {size} bytes of input"


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store folder for every loader example (each rewrites the session's files)."""
    return tmp_path_factory.mktemp("fuzz")


# -- the properties ------------------------------------------------------------------------


@FUZZ
@given(
    data=record_files("Checkpoint") | record_files("Session"),
    model=st.sampled_from([Session, Checkpoint]),
    keyed=st.booleans(),
)
def test_the_record_decoder_raises_only_engine_errors_in_bounded_memory(
    data: bytes, model: type[Session] | type[Checkpoint], keyed: bool
) -> None:
    with bounded_memory(len(data)):
        try:
            scan = codec.scan_frames(data, "fuzz")
        except CorruptSessionError:
            return
        assert scan.valid_end <= len(data)
        assert scan.torn_tail == (scan.valid_end < len(data))
        for frame in scan.frames:
            assert frame.end - frame.offset == codec.HEADER_SIZE + len(frame.body)
            with contextlib.suppress(CorruptSessionError, DecryptionError):
                assert isinstance(
                    codec.decode_model(model, frame, "fuzz", KEYS if keyed else None), model
                )


@FUZZ
@given(record=key_records)
def test_key_records_parse_or_raise_a_decryption_error(record: bytes) -> None:
    with bounded_memory(len(record)):
        try:
            keys = ENCRYPTION.open_session_keys(SESSION_ID, record)
        except DecryptionError:
            pass
        else:
            assert keys.key_ids == KEYS.key_ids  # only the genuine record opens
        for check in (ENCRYPTION.is_current, master_key_ids):
            with contextlib.suppress(DecryptionError):
                check(SESSION_ID, record)


@FUZZ
@given(
    snapshot=record_files("Session"),
    journal=st.none() | record_files("Checkpoint"),
    key_record=st.none() | key_records,
    keyed=st.booleans(),
)
def test_the_session_loader_raises_only_engine_errors(
    fuzz_root: Path,
    snapshot: bytes,
    journal: bytes | None,
    key_record: bytes | None,
    keyed: bool,
) -> None:
    # Given whatever bytes in a session's files
    folder = fuzz_root / SESSION_ID
    shutil.rmtree(fuzz_root, ignore_errors=True)
    (fuzz_root / ".keys").mkdir(parents=True)
    folder.mkdir()
    (folder / "snapshot").write_bytes(snapshot)
    if journal is not None:
        (folder / "journal").write_bytes(journal)
    if key_record is not None:
        (fuzz_root / ".keys" / f"{SESSION_ID}.key").write_bytes(key_record)
    before = {p: p.read_bytes() for p in fuzz_root.rglob("*") if p.is_file()}

    async def read() -> tuple[Session | None, str, str]:
        store = FileStore(fuzz_root, encryption_key=KEY if keyed else None, durability="none")
        try:
            try:
                loaded = await store.load(SESSION_ID)
            except EngineError:
                loaded = None
            rows = await store.list()
            check = await store.check(SESSION_ID)
            return loaded, rows[0].id, check.verdict
        finally:
            await store.close()

    # When the store loads, lists and checks it
    loaded, listed, verdict = asyncio.run(read())

    # Then it either loaded the one session or said what is wrong, and changed nothing
    event(f"verdict: {verdict}")  # shown by --hypothesis-show-statistics
    assert listed == SESSION_ID
    assert (loaded is not None) == (verdict in ("ok", "torn tail"))
    if loaded is not None:
        assert loaded.id == SESSION_ID
    after = {p: p.read_bytes() for p in fuzz_root.rglob("*") if p.is_file()}
    assert after == before


# -- no code runs from stored bytes ------------------------------------------------------


class _Planted:
    """An object whose unpickling would create a file: what a pickle-based loader would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("sealed", [False, True])
async def test_a_pickle_planted_in_a_record_is_never_run(tmp_path: Path, sealed: bool) -> None:
    # Given a snapshot whose (valid, checksummed, maybe sealed) body is a pickle
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Planted(marker))
    root = tmp_path / "store"
    (root / SESSION_ID).mkdir(parents=True)
    frame = codec.seal_frame(0, "Session", payload, KEYS if sealed else None)
    (root / SESSION_ID / "snapshot").write_bytes(frame)
    (root / ".keys").mkdir(mode=0o700)
    (root / ".keys" / f"{SESSION_ID}.key").write_bytes(KEY_RECORD)

    # When it is loaded, then it is corruption, and the payload never ran
    with pytest.raises(CorruptSessionError, match="undecodable"):
        await FileStore(root, encryption_key=KEY if sealed else None).load(SESSION_ID)
    assert not marker.exists()


def test_the_storage_layer_has_no_code_running_decoder() -> None:
    forbidden = re.compile(r"\b(pickle|marshal|shelve|eval|exec)\b|yaml\.load")
    sources = [ENGINE / "codec.py", ENGINE / "crypto.py", *sorted((ENGINE / "stores").glob("*.py"))]
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []
