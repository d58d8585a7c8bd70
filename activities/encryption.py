"""Payload encryption: AES-GCM under a key ring, for Keel's payload codec (issue 16).

Owns the key ring (loaded from ``KEEL_ENCRYPTION_KEYS`` or ``KEEL_ENCRYPTION_KEYS_FILE``) and
the ``binary/encrypted`` wire format. ``activities.converter.KeelCodec`` compresses a payload
first and then encrypts it here. Not workflow code; not deterministic (every payload gets a
fresh random nonce), which is why it runs only in the codec, outside workflow code.

Wire format: metadata ``encoding: binary/encrypted`` and ``encryption-key-id: <ID>``; data is
a 96-bit nonce followed by the AES-GCM ciphertext and tag of the serialized inner ``Payload``
(its metadata and data, so the inner encoding survives). The key ID is the associated data, so
a payload whose key ID was edited fails authentication instead of decrypting under a key that
did not write it. Keys are never logged, never in history, and never in an error message: a
``KeyRing`` shows only its IDs.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.exceptions import ApplicationError

__all__ = [
    "ENCRYPTED",
    "KEYS_ENV",
    "KEYS_FILE_ENV",
    "KEY_ID_KEY",
    "PAYLOAD_KEY_UNKNOWN",
    "PAYLOAD_TAMPERED",
    "PAYLOAD_TOO_LARGE",
    "KeyRing",
    "decrypt_payload",
    "encrypt_payload",
    "load_key_ring",
]

ENCRYPTED = b"binary/encrypted"
"""The encoding of an encrypted payload."""
KEY_ID_KEY = "encryption-key-id"
"""The metadata entry naming the key that encrypted a payload (an ID, never the key)."""
KEYS_ENV = "KEEL_ENCRYPTION_KEYS"
"""``id1:base64key,id2:base64key``: the first key encrypts, every key decrypts."""
KEYS_FILE_ENV = "KEEL_ENCRYPTION_KEYS_FILE"
"""A file holding the same list, one ``id:base64key`` per line (``#`` starts a comment)."""

# Error types of the payload codec. They live here, not in ``activities/errors.py``, because the
# codec runs on the client path, which must not import that module (its helpers load ``openai``).
PAYLOAD_TOO_LARGE = "PayloadTooLarge"
"""A compressed payload inflates past the codec's limit (a decompression bomb, or a limit set
too low): the same bytes inflate the same way on every retry."""
PAYLOAD_KEY_UNKNOWN = "PayloadKeyUnknown"
"""An encrypted payload names a key ID this process's key ring does not hold: the operator must
put the key back in the ring (a workflow task retries until then; an activity does not)."""
PAYLOAD_TAMPERED = "PayloadTampered"
"""An encrypted payload fails AES-GCM authentication: it was altered, or its key ID names a
different key than the one that wrote it. No retry changes the bytes."""

_NONCE_BYTES = 12
_AAD_PREFIX = b"keel-payload-v1:"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class KeyRing:
    """AES keys by ID, newest first: the first encrypts, any of them decrypts.

    Rotation: put a new key first and keep the old ones after it until no history that needs
    them is kept (the namespace's retention), then drop them.
    """

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        """Build a ring.

        Args:
            keys: ``(key ID, key)`` pairs, the current key first; keys are 16, 24 or 32 bytes.

        Raises:
            ValueError: No keys, a malformed or repeated ID, or a key of the wrong length. The
                message names the ID, never the key.
        """
        if not keys:
            raise ValueError("an encryption key ring needs at least one key")
        self._keys: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID_RE.match(key_id):
                raise ValueError(
                    f"encryption key ID {key_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                )
            if key_id in self._keys:
                raise ValueError(f"encryption key ID {key_id!r} appears twice")
            if len(key) not in (16, 24, 32):
                raise ValueError(
                    f"encryption key {key_id!r} is {len(key)} bytes; AES needs 16, 24 or 32"
                )
            self._keys[key_id] = AESGCM(key)
        self.current_id = keys[0][0]
        """The ID of the key that encrypts."""
        self.current = self._keys[self.current_id]
        """The cipher of the key that encrypts."""

    @property
    def ids(self) -> list[str]:
        """Every key ID, the current one first."""
        return list(self._keys)

    def cipher(self, key_id: str) -> AESGCM | None:
        """The cipher of ``key_id``, or None when the ring does not hold it."""
        return self._keys.get(key_id)

    def __repr__(self) -> str:
        """IDs only: a ring must be safe to print and log."""
        return f"KeyRing(ids={self.ids!r})"

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """A ring from ``id:base64key`` entries separated by commas or new lines.

        Args:
            text: The entries; blank entries and ``#`` comments are skipped.

        Raises:
            ValueError: An entry without an ID, a key that is not base64, or see ``__init__``.
        """
        keys: list[tuple[str, bytes]] = []
        for line in text.splitlines():
            for entry in line.split("#", 1)[0].split(","):
                entry = entry.strip()
                if not entry:
                    continue
                key_id, sep, encoded = entry.partition(":")
                if not sep:
                    raise ValueError("an encryption key entry must read id:base64key")
                try:
                    key = base64.b64decode(encoded.strip(), validate=True)
                except binascii.Error:
                    raise ValueError(
                        f"encryption key {key_id.strip()!r} is not valid base64"
                    ) from None
                keys.append((key_id.strip(), key))
        return cls(keys)


def load_key_ring(environ: Mapping[str, str] | None = None) -> KeyRing | None:
    """The ring the environment configures, or None when encryption is off.

    Args:
        environ: Variables to read (default ``os.environ``): ``KEEL_ENCRYPTION_KEYS`` or
            ``KEEL_ENCRYPTION_KEYS_FILE``, not both.

    Raises:
        ValueError: Both are set, the file cannot be read, or the list is malformed.
    """
    env = os.environ if environ is None else environ
    inline = env.get(KEYS_ENV, "").strip()
    path = env.get(KEYS_FILE_ENV, "").strip()
    if inline and path:
        raise ValueError(f"set {KEYS_ENV} or {KEYS_FILE_ENV}, not both")
    if path:
        try:
            inline = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"{KEYS_FILE_ENV}: cannot read {path}: {err.strerror}") from None
        if not inline.strip():
            raise ValueError(f"{KEYS_FILE_ENV}: {path} holds no keys")
    return KeyRing.parse(inline) if inline else None


def encrypt_payload(payload: Payload, ring: KeyRing) -> Payload:
    """``payload`` (metadata and data) encrypted under the ring's current key."""
    key_id = ring.current_id
    nonce = os.urandom(_NONCE_BYTES)
    sealed = ring.current.encrypt(nonce, payload.SerializeToString(), _AAD_PREFIX + key_id.encode())
    return Payload(
        metadata={"encoding": ENCRYPTED, KEY_ID_KEY: key_id.encode()}, data=nonce + sealed
    )


def decrypt_payload(payload: Payload, ring: KeyRing | None) -> Payload:
    """The payload an encrypted one was made from; any other payload unchanged.

    Args:
        payload: A payload read from history or a client.
        ring: The keys this process holds; None when encryption is not configured.

    Raises:
        ApplicationError: ``PayloadKeyUnknown`` (non-retryable) when the ring lacks the key ID
            the payload names; ``PayloadTampered`` (non-retryable) when it fails
            authentication. Both messages name the key ID, never a key.
    """
    if payload.metadata.get("encoding") != ENCRYPTED:
        return payload
    key_id = payload.metadata.get(KEY_ID_KEY, b"").decode("utf-8", "replace")
    cipher = ring.cipher(key_id) if ring is not None else None
    if cipher is None:
        held = f"keys held: {', '.join(ring.ids)}" if ring else f"{KEYS_ENV} is not set"
        raise ApplicationError(
            f"payload encrypted with key ID {key_id!r}, which this process's key ring does not "
            f"hold ({held}); add that key back to {KEYS_ENV} to read it",
            type=PAYLOAD_KEY_UNKNOWN,
            non_retryable=True,
        )
    nonce, sealed = payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:]
    try:
        plain = cipher.decrypt(nonce, sealed, _AAD_PREFIX + key_id.encode())
    except (InvalidTag, ValueError):
        raise ApplicationError(
            f"payload encrypted with key ID {key_id!r} failed authentication: it was altered, "
            "or that ID now names a different key",
            type=PAYLOAD_TAMPERED,
            non_retryable=True,
        ) from None
    return Payload.FromString(plain)
