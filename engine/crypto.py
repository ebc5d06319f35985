"""Encryption at rest: master keys, key rings, per-session data keys, AES-256-GCM.

Everything cryptographic lives here, once, for every store; ``cryptography`` is
imported nowhere else, and none of its exceptions leaves this module.

- A **master key** comes from the user (``encryption_key=``, ``SESSION_ENCRYPTION_KEY``):
  32 raw bytes, a base64 string of 32 bytes, or a passphrase stretched with scrypt
  under a salt the store keeps. Its **key id** is derived from it (HKDF), so
  errors can say which key is missing without revealing anything about it.
- A **key ring** holds one active master key (used for writing) and older ones
  (read only), so keys can be rotated.
- Each session has its own random 256-bit **data key**, wrapped (AES-256-GCM) by
  the active master key and kept apart from the session's records by the store
  (a key file, a table row). Destroying that one small record makes every copy of
  the session's records unreadable: crypto-shredding.
- Each **record** is sealed under the session's data key with a random 96-bit
  nonce; the session id, the record kind and its sequence number are associated
  data, so a record moved to another session or another position fails to open.

A store supplies only storage for wrapped keys (``KeyVault``: get, add-if-absent,
put, delete by name) and calls ``Encryption.keys_for``; see docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import CorruptSessionError, DecryptionError, InvalidArgumentError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ID_BYTES = 8
SEAL_HEADER_BYTES = KEY_ID_BYTES + NONCE_BYTES
"""An encrypted record body starts with its data key's id and its nonce."""
SEAL_OVERHEAD = SEAL_HEADER_BYTES + TAG_BYTES

SALT_NAME = "kdf-salt"
"""The vault name under which a store keeps its passphrase salt (never a session id)."""
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
"""scrypt cost (32 MiB, tens of milliseconds): paid once per store and passphrase."""
SALT_BYTES = 16
MAX_DATA_KEYS = 8
"""Data keys one session may hold at once (more than one only while it is rekeyed)."""

_SALT_MAGIC = b"SVS\x01"
_KEYS_MAGIC = b"SVK"
_KEYS_VERSION = 1
_FLAG_CLEAR_RECORDS = 0x01  # records in clear are still allowed: a conversion in progress
_KEYS_HEAD = struct.Struct("<3sBBB")  # magic, version, flags, count
_ENTRY = struct.Struct(f"<{KEY_ID_BYTES}s{KEY_ID_BYTES}s{NONCE_BYTES}s{KEY_BYTES + TAG_BYTES}s")
_SEQ = struct.Struct("<Q")
MAX_KEY_RECORD_BYTES = _KEYS_HEAD.size + MAX_DATA_KEYS * _ENTRY.size
"""Largest wrapped-key record (614 bytes): anything bigger is damage, refused unparsed."""

ENV_KEY = "SESSION_ENCRYPTION_KEY"
ENV_OLD_KEYS = "SESSION_ENCRYPTION_OLD_KEYS"


def generate_key() -> str:
    """Return a new random 256-bit master key as base64, ready for ``SESSION_ENCRYPTION_KEY``."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


# -- master keys and key rings ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Secret:
    """One key as given: 32 raw bytes, or a passphrase still to be stretched."""

    material: bytes = field(repr=False)
    passphrase: bool


def _parse_key(key: object) -> _Secret:
    """Read a key the way API.md fixes: 32 bytes, base64 of 32 bytes, else a passphrase."""
    if isinstance(key, bytes | bytearray):
        if len(key) != KEY_BYTES:
            raise InvalidArgumentError(
                f"an encryption key given as bytes must be {KEY_BYTES} bytes, got {len(key)}"
            )
        return _Secret(bytes(key), passphrase=False)
    if not isinstance(key, str):
        raise InvalidArgumentError(
            f"an encryption key must be bytes or str, got {type(key).__name__}"
        )
    if not key:
        raise InvalidArgumentError("an encryption key must not be empty")
    raw = _base64_key(key.strip())
    if raw is not None:
        return _Secret(raw, passphrase=False)
    try:
        return _Secret(key.encode("utf-8"), passphrase=True)
    except UnicodeEncodeError:
        raise InvalidArgumentError("an encryption passphrase must be valid text") from None


def _base64_key(text: str) -> bytes | None:
    for alphabet in (b"+/", b"-_"):
        try:
            raw = base64.b64decode(text, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEY_BYTES:
            return raw
    return None


class KeyRing:
    """The keys a store is given: one active key for writing, older keys for reading.

    Args:
        active: the key new records are written under.
        old: keys that only read what was written before a rotation.

    Each key is 32 bytes, a base64 string decoding to exactly 32 bytes, or any other
    string, which is a passphrase stretched with scrypt under the store's salt.
    """

    def __init__(self, active: str | bytes, old: Iterable[str | bytes] = ()) -> None:
        self.secrets: tuple[_Secret, ...] = (_parse_key(active), *(_parse_key(k) for k in old))

    def __repr__(self) -> str:
        return f"KeyRing(1 active key, {len(self.secrets) - 1} old)"

    @classmethod
    def of(cls, key: str | bytes | KeyRing) -> KeyRing:
        """Return ``key`` as a key ring (a single key is a ring of one)."""
        return key if isinstance(key, KeyRing) else cls(key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeyRing | None:
        """Read ``SESSION_ENCRYPTION_KEY`` and ``SESSION_ENCRYPTION_OLD_KEYS`` (comma-separated).

        Returns None when no key is set (an empty value counts as unset).

        Raises:
            InvalidArgumentError: old keys are set without an active key.
        """
        env = os.environ if environ is None else environ
        active = env.get(ENV_KEY) or None
        old = [k.strip() for k in (env.get(ENV_OLD_KEYS) or "").split(",") if k.strip()]
        if active is None:
            if old:
                raise InvalidArgumentError(f"{ENV_OLD_KEYS} is set but {ENV_KEY} is not")
            return None
        return cls(active, old)

    @property
    def needs_salt(self) -> bool:
        """Tell whether a passphrase is in the ring (it needs the store's salt)."""
        return any(secret.passphrase for secret in self.secrets)


KeyInput = str | bytes | KeyRing
"""What ``encryption_key=`` accepts."""


@dataclass(frozen=True, slots=True)
class _MasterKey:
    key_id: bytes
    wrapper: AESGCM = field(repr=False)

    @property
    def name(self) -> str:
        return self.key_id.hex()


def _hkdf(secret: bytes, length: int, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose).derive(secret)


def _master_key(secret: bytes) -> _MasterKey:
    # Separate subkeys for wrapping and naming: the id reveals nothing about the other.
    return _MasterKey(
        key_id=_hkdf(secret, KEY_ID_BYTES, b"stepvault key id v1"),
        wrapper=AESGCM(_hkdf(secret, KEY_BYTES, b"stepvault wrap v1")),
    )


def _stretch(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase
    )


def _salt_from(record: bytes) -> bytes:
    if len(record) != len(_SALT_MAGIC) + SALT_BYTES or not record.startswith(_SALT_MAGIC):
        raise DecryptionError(f"the store's passphrase salt ({SALT_NAME}) is damaged")
    return record[len(_SALT_MAGIC) :]


# -- what a store supplies ---------------------------------------------------------------


class KeyVault(Protocol):
    """Storage of wrapped keys by name (a session id, or ``SALT_NAME``), apart from records.

    The only thing a store adds for encryption. Every write is atomic and durable.
    """

    def get_key(self, name: str) -> bytes | None:
        """Return the record stored under ``name``, or None."""
        ...

    def add_key(self, name: str, record: bytes) -> bytes:
        """Store ``record`` unless ``name`` exists; return what is stored either way.

        What it returns is durable, also when it was already there (a process killed
        while writing it may have left it in the page cache only).
        """
        ...

    def put_key(self, name: str, record: bytes) -> None:
        """Store ``record`` under ``name``, replacing any record there."""
        ...

    def delete_key(self, name: str) -> bool:
        """Destroy the record under ``name`` beyond recovery; return whether it existed."""
        ...


@runtime_checkable
class Shredding(Protocol):
    """A store that can crypto-shred a session: destroy its data key, then its records."""

    async def shred(self, session_id: str) -> bool:
        """Destroy the session's data key, then remove it; return whether it existed."""
        ...


RekeyOutcome = Literal["rekeyed", "current", "busy"]


@runtime_checkable
class Rekeying(Protocol):
    """A store that can rewrite a session under the active master key."""

    async def rekey(self, session_id: str) -> RekeyOutcome:
        """Rewrite one session under a new data key wrapped by the active master key."""
        ...


# -- a session's data keys ---------------------------------------------------------------


class SessionKeys:
    """One session's unwrapped data keys: seal and open its records.

    The first key writes; the others (present only while the session is being
    rekeyed) still read. Built once per session and cached by ``Encryption``.
    """

    __slots__ = ("_aad", "_ciphers", "_raw", "_writer", "allows_clear", "key_ids", "session_id")

    def __init__(
        self, session_id: str, keys: list[tuple[bytes, bytes]], *, allows_clear: bool
    ) -> None:
        self.session_id = session_id
        self.key_ids: tuple[bytes, ...] = tuple(key_id for key_id, _ in keys)
        self._raw = dict(keys)
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys}
        self._writer = self.key_ids[0]
        self.allows_clear = allows_clear
        """Records in clear are accepted: the session is being converted to encryption."""
        self._aad = b"stepvault record v1\x00" + session_id.encode("ascii") + b"\x00"

    def __repr__(self) -> str:
        return f"SessionKeys({self.session_id}, data key {self._writer.hex()})"

    @property
    def active_id(self) -> str:
        """Return the id of the data key new records are sealed under."""
        return self._writer.hex()

    def _subset(self, key_ids: set[str]) -> list[tuple[bytes, bytes]]:
        """Return the raw data keys whose ids (hex) are in ``key_ids``: to wrap them again."""
        return [(kid, key) for kid, key in self._raw.items() if kid.hex() in key_ids]

    def seal(self, seq: int, kind: str, plaintext: bytes) -> bytes:
        """Encrypt one record: key id, nonce, then ciphertext and tag."""
        nonce = os.urandom(NONCE_BYTES)
        aad = self._aad + kind.encode("ascii") + b"\x00" + _SEQ.pack(seq)
        return self._writer + nonce + self._ciphers[self._writer].encrypt(nonce, plaintext, aad)

    def open(self, seq: int, kind: str, body: bytes, where: str) -> bytes:
        """Decrypt one record sealed as record ``seq`` of kind ``kind`` of this session.

        Raises:
            CorruptSessionError: the record is damaged, tampered with, or was moved
                here from another session or another position.
        """
        if len(body) < SEAL_OVERHEAD:
            raise CorruptSessionError(f"{where}: encrypted record too short")
        key_id = body[:KEY_ID_BYTES]
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CorruptSessionError(
                f"{where}: sealed under data key {key_id.hex()}, which is not a key of "
                f"session {self.session_id} (moved from another session?)"
            )
        nonce = body[KEY_ID_BYTES:SEAL_HEADER_BYTES]
        aad = self._aad + kind.encode("ascii") + b"\x00" + _SEQ.pack(seq)
        try:
            return cipher.decrypt(nonce, body[SEAL_HEADER_BYTES:], aad)
        except InvalidTag:
            raise CorruptSessionError(
                f"{where}: fails authentication (tampered with, or moved from another "
                "session or position)"
            ) from None


def sealed_key_id(body: bytes) -> str | None:
    """Return the data key id an encrypted record body names, None if too short."""
    return body[:KEY_ID_BYTES].hex() if len(body) >= SEAL_OVERHEAD else None


# -- the wrapped-key record --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Wrapped:
    data_key_id: bytes
    master_id: bytes
    nonce: bytes
    wrapped: bytes


def _parse_keys_record(session_id: str, record: bytes) -> tuple[int, list[_Wrapped]]:
    """Split a wrapped-key record into its flags and entries; damage is a DecryptionError."""
    damaged = f"session {session_id}: its key record is damaged"
    if not _KEYS_HEAD.size <= len(record) <= MAX_KEY_RECORD_BYTES:
        raise DecryptionError(f"{damaged} ({len(record)} bytes)")
    magic, version, flags, count = _KEYS_HEAD.unpack_from(record)
    if magic != _KEYS_MAGIC or version != _KEYS_VERSION or flags & ~_FLAG_CLEAR_RECORDS:
        raise DecryptionError(f"{damaged} (unknown format)")
    if not 1 <= count <= MAX_DATA_KEYS or len(record) != _KEYS_HEAD.size + count * _ENTRY.size:
        raise DecryptionError(f"{damaged} (wrong length)")
    entries = [
        _Wrapped(*_ENTRY.unpack_from(record, _KEYS_HEAD.size + index * _ENTRY.size))
        for index in range(count)
    ]
    return flags, entries


def _wrap_aad(session_id: str, head: bytes, index: int, data_key_id: bytes) -> bytes:
    # The whole header (flags, count) and the entry's place are authenticated too.
    return (
        b"stepvault data key v1\x00"
        + session_id.encode("ascii")
        + head
        + bytes([index])
        + data_key_id
    )


def master_key_ids(session_id: str, record: bytes) -> list[str]:
    """Return the ids of the master keys a wrapped-key record needs (no key required)."""
    _, entries = _parse_keys_record(session_id, record)
    return sorted({entry.master_id.hex() for entry in entries})


# -- a store's encryption --------------------------------------------------------------


class Encryption:
    """A store's encryption: its master keys and a cache of unwrapped session keys.

    One per store. Master keys are derived once (a passphrase only after the store's
    salt is known); each session's data keys are unwrapped once and cached, so the
    hot path costs one AES-GCM operation per record.
    """

    CACHE_SIZE = 4096

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._masters: list[_MasterKey] | None = None
        self._lock = threading.Lock()  # one derivation of the master keys
        self._cache_lock = threading.Lock()  # stores call from several worker threads
        self._cache: OrderedDict[str, SessionKeys] = OrderedDict()
        if not ring.needs_salt:
            self._derive(b"")

    def __repr__(self) -> str:
        return f"Encryption({self.ring!r})"

    @classmethod
    def of(cls, key: str | bytes | KeyRing | None) -> Encryption | None:
        """Build a store's encryption from its ``encryption_key`` argument (None: none)."""
        return None if key is None else cls(KeyRing.of(key))

    # master keys

    def _derive(self, salt: bytes) -> None:
        masters: dict[bytes, _MasterKey] = {}
        for secret in self.ring.secrets:
            raw = _stretch(secret.material, salt) if secret.passphrase else secret.material
            master = _master_key(raw)
            masters.setdefault(master.key_id, master)
        self._masters = list(masters.values())

    @property
    def prepared(self) -> bool:
        """Tell whether the master keys are derived (a ring of raw keys is from the start)."""
        return self._masters is not None

    def new_salt_record(self) -> bytes:
        """Return a fresh salt record, for a store that has none under ``SALT_NAME``."""
        return _SALT_MAGIC + os.urandom(SALT_BYTES)

    def use_salt(self, record: bytes) -> None:
        """Derive the master keys with the store's salt record (once; later calls do nothing).

        Raises:
            DecryptionError: the salt record is damaged.
        """
        with self._lock:
            if self._masters is None:
                self._derive(_salt_from(record))

    def prepare(self, vault: KeyVault) -> None:
        """Derive the master keys once, fetching (or creating) the store's salt if needed."""
        if self._masters is None:
            record = vault.get_key(SALT_NAME)
            if record is None:
                record = vault.add_key(SALT_NAME, self.new_salt_record())
            self.use_salt(record)

    def _ready(self) -> list[_MasterKey]:
        if self._masters is None:  # a store forgot prepare(): a bug, not a user error
            raise RuntimeError("Encryption.prepare() must run before keys are used")
        return self._masters

    @property
    def active_key_id(self) -> str:
        """Return the id of the active master key (``prepare`` must have run)."""
        return self._ready()[0].name

    # wrapped-key records

    def _record(self, session_id: str, keys: list[tuple[bytes, bytes]], flags: int) -> bytes:
        active = self._ready()[0]
        head = _KEYS_HEAD.pack(_KEYS_MAGIC, _KEYS_VERSION, flags, len(keys))
        parts = [head]
        for index, (data_key_id, key) in enumerate(keys):
            nonce = os.urandom(NONCE_BYTES)
            aad = _wrap_aad(session_id, head, index, data_key_id)
            parts.append(
                _ENTRY.pack(
                    data_key_id, active.key_id, nonce, active.wrapper.encrypt(nonce, key, aad)
                )
            )
        return b"".join(parts)

    def new_session_record(self, session_id: str) -> bytes:
        """Return the wrapped-key record of a new session: one fresh data key."""
        return self._record(session_id, [_new_data_key()], 0)

    def open_session_keys(self, session_id: str, record: bytes) -> SessionKeys:
        """Unwrap a session's data keys.

        Raises:
            DecryptionError: a master key it needs is not in the ring (naming its id),
                or the record is damaged.
        """
        flags, entries = _parse_keys_record(session_id, record)
        masters = {master.key_id: master for master in self._ready()}
        head = record[: _KEYS_HEAD.size]
        keys = []
        for index, entry in enumerate(entries):
            master = masters.get(entry.master_id)
            if master is None:
                raise DecryptionError(
                    f"session {session_id}: its data key is wrapped under master key "
                    f"{entry.master_id.hex()}, which this store was not given (its keys: "
                    f"{', '.join(m.name for m in masters.values())}); pass it as the key "
                    f"or as an old key ({ENV_OLD_KEYS})"
                )
            aad = _wrap_aad(session_id, head, index, entry.data_key_id)
            try:
                key = master.wrapper.decrypt(entry.nonce, entry.wrapped, aad)
            except InvalidTag:
                raise DecryptionError(
                    f"session {session_id}: its key record fails authentication under "
                    f"master key {master.name} (damaged, or copied from another session)"
                ) from None
            keys.append((entry.data_key_id, key))
        return SessionKeys(session_id, keys, allows_clear=bool(flags & _FLAG_CLEAR_RECORDS))

    def is_current(self, session_id: str, record: bytes) -> bool:
        """Tell whether a session needs no rekey: one data key, under the active master key."""
        flags, entries = _parse_keys_record(session_id, record)
        return not flags and len(entries) == 1 and entries[0].master_id == self._ready()[0].key_id

    def begin_rekey(
        self, session_id: str, current: SessionKeys | None, in_use: set[str], clear_in_use: bool
    ) -> tuple[SessionKeys, bytes]:
        """Start moving a session to a fresh data key under the active master key.

        Returns the keys to rewrite the session with (the new data key first, then
        the old ones its records still use) and the record to store before rewriting;
        a crash at any point leaves every record readable.
        """
        kept = [] if current is None else current._subset(in_use)
        keys = [_new_data_key(), *kept][:MAX_DATA_KEYS]
        flags = _FLAG_CLEAR_RECORDS if clear_in_use else 0
        record = self._record(session_id, keys, flags)
        return SessionKeys(session_id, keys, allows_clear=clear_in_use), record

    def finish_rekey(self, session_id: str, keys: SessionKeys) -> tuple[SessionKeys, bytes]:
        """Return the session's keys and record once its records use only the new key."""
        only = keys._subset({keys.active_id})
        return SessionKeys(session_id, only, allows_clear=False), self._record(session_id, only, 0)

    # the cache

    def keys_for(
        self, vault: KeyVault, session_id: str, *, create: bool = False
    ) -> SessionKeys | None:
        """Return a session's data keys: cached, unwrapped from the vault, or new.

        None when the session has no data key and ``create`` is false: a session
        written in clear before encryption was turned on. With ``create`` (a new
        session's first record is about to be written) the cache is skipped, since
        the id may belong to a session removed elsewhere since it was cached, and
        the key returned is durable, whether new or left by an earlier attempt.
        """
        if not create:
            cached = self.cached(session_id)
            if cached is not None:
                return cached
        self.prepare(vault)
        if create:
            record: bytes | None = vault.add_key(session_id, self.new_session_record(session_id))
        else:
            record = vault.get_key(session_id)
        if record is None:
            return None
        keys = self.open_session_keys(session_id, record)
        self.remember(keys)
        return keys

    def cached(self, session_id: str) -> SessionKeys | None:
        """Return a session's cached keys, or None."""
        with self._cache_lock:
            keys = self._cache.get(session_id)
            if keys is not None:
                self._cache.move_to_end(session_id)
            return keys

    def remember(self, keys: SessionKeys) -> None:
        """Cache a session's keys (the least recently used are dropped past ``CACHE_SIZE``)."""
        with self._cache_lock:
            self._cache[keys.session_id] = keys
            self._cache.move_to_end(keys.session_id)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop a session's cached keys: they may have changed, or been destroyed."""
        with self._cache_lock:
            self._cache.pop(session_id, None)


def _new_data_key() -> tuple[bytes, bytes]:
    return os.urandom(KEY_ID_BYTES), AESGCM.generate_key(bit_length=KEY_BYTES * 8)
