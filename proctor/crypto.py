"""Encryption at rest for face embeddings: AES-256-GCM (cryptography's AESGCM) under a key ring.

A ciphertext is self-describing: b"pe1" | key id (8 hex chars) | 12-byte random nonce | ciphertext and tag.
The key id is the first 8 hex characters of SHA-256 of the key, so any key that was ever current can be
named without storing it. The associated data binds a ciphertext to its row (its embedding or enrollment
id): a vector copied into another row fails to decrypt, as does any changed byte (InvalidTag, loudly).

Keys (docs/operations.md "Face data: the embedding key"):
- PROCTOR_EMBEDDING_KEY: base64 of 32 bytes, the current key; PROCTOR_EMBEDDING_OLD_KEYS: earlier keys,
  comma-separated, still readable.
- Without them, <data_dir>/embedding-keys: created 0600 on first use with one random key; one base64 key a
  line, the first is current, the others readable (`proctor keys rotate-embeddings --new-key` adds one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from livekit_proctor.settings import Settings

MAGIC = b"pe1"
KEY_FILE = "embedding-keys"
_KID_LEN = 8
_NONCE = 12


class DecryptError(Exception):
    """A ciphertext that is damaged, tampered with, bound to another row, or under a key not in the ring."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:_KID_LEN]


def parse_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an embedding key must be base64") from None
    if len(key) != 32:
        raise ValueError(f"an embedding key must be 32 bytes (AES-256), not {len(key)}")
    return key


def new_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, bytes]  # key id -> key: every key that can decrypt
    current: str  # the key id new ciphertexts use

    @classmethod
    def of(cls, current: bytes, *older: bytes) -> KeyRing:
        keys = {key_id(k): k for k in (*older, current)}
        return cls(keys=keys, current=key_id(current))

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        ct = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext, aad)
        return MAGIC + self.current.encode() + nonce + ct

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        kid = self.key_id_of(blob)
        if kid not in self.keys:
            raise DecryptError(f"ciphertext under key {kid}, which is not configured (PROCTOR_EMBEDDING_OLD_KEYS)")
        head = len(MAGIC) + _KID_LEN
        nonce, ct = blob[head : head + _NONCE], blob[head + _NONCE :]
        try:
            return AESGCM(self.keys[kid]).decrypt(nonce, ct, aad)
        except InvalidTag:
            raise DecryptError(f"ciphertext under key {kid} failed authentication (tampered or misplaced)") from None

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        if len(blob) < len(MAGIC) + _KID_LEN + _NONCE + 16 or not blob.startswith(MAGIC):
            raise DecryptError("not an embedding ciphertext")
        return blob[len(MAGIC) : len(MAGIC) + _KID_LEN].decode("ascii", "replace")


def key_file(s: Settings) -> Path:
    return s.data_dir / KEY_FILE


def _read_key_file(path: Path) -> list[bytes]:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        return []
    return [parse_key(ln) for ln in lines]


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Replaces the key file (0600, atomically): the first key is current."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(base64.b64encode(k).decode() + "\n" for k in keys))
    os.replace(tmp, path)


def load_keyring(s: Settings, *, create: bool = True) -> KeyRing:
    """The key ring of these settings; creates the key file (0600) when no key is configured or stored."""
    older = [parse_key(k) for k in s.embedding_old_keys.split(",") if k.strip()]
    stored = _read_key_file(key_file(s))
    if s.embedding_key:
        return KeyRing.of(parse_key(s.embedding_key), *older, *stored)
    if not stored:
        if not create:
            raise DecryptError(f"no embedding key: set PROCTOR_EMBEDDING_KEY or create {key_file(s)}")
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written aside, then linked into place: a process starting at the same time either keeps the first
        # one's key (link fails) or never sees a half-written file.
        tmp = key_file(s).with_name(f"{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key_text() + "\n")
        try:
            os.link(tmp, key_file(s))
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        stored = _read_key_file(key_file(s))
    return KeyRing.of(stored[0], *older, *stored[1:])
