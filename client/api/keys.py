"""API keys: who is calling, for which tenant, in which role. Stored hashed in Redis.

A key is ``keel_<id>_<secret>``: the ID names it in lists and revocations, the secret is 32
random bytes. Only the key's SHA-256 is stored (a leaked Redis dump yields no usable key), with
the tenant, role and user it acts as. The tenant and user of every API call come from its key,
never from the request body. ``member`` keys act within their tenant; ``operator`` keys see
every tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from keel.activities.redis_client import KeelRedis
from keel.workflows.types import IDENT_RE

__all__ = [
    "KEY_PREFIX",
    "ApiKeys",
    "KeyRecords",
    "Principal",
    "Role",
    "key_records",
    "principal_of",
    "records_agree",
]

KEY_PREFIX = "keel_"
"""Every key starts so, which lets secret scanners recognise a leaked one."""

Role = Literal["member", "operator"]

# Each record is named by what it is looked up by (the key's digest, its ID), so the two hash to
# different Redis Cluster slots and no command or script uses both (issue 16). Their names are
# those of every key issued so far: keys never expire, so renaming them would lose them.
_BY_HASH = "keel:apikey:hash:"
_BY_ID = "keel:apikey:id:"
_KEY_SHAPE = re.compile(r"^keel_([0-9a-f]{1,32})_[A-Za-z0-9_-]{1,160}$")
"""A presented key: the prefix, the key's ID (hex), and its URL-safe secret."""


class Principal(BaseModel):
    """Who a key acts as (immutable: one parsed record serves every request of its key)."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    """Public name of the key (in lists, revocations and logs; never the secret)."""
    tenant: str
    """The tenant every call made with the key belongs to."""
    role: Role = "member"
    """``operator`` sees every tenant; ``member`` only its own."""
    user: str | None = None
    """The user jobs started with the key are recorded for (default: the key's ID)."""
    created_at: datetime
    revoked: bool = False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRecords(NamedTuple):
    """Where a presented key's records would be, for a lookup inside a Redis script."""

    key_id: str
    """The ID the key names (its records must agree)."""
    digest: str
    """The key's SHA-256, which its ID's record must point back at."""
    by_hash: str
    """The Redis key of the principal's record."""
    by_id: str
    """The Redis key of the ID's record."""


def key_records(key: str) -> KeyRecords | None:
    """The Redis keys a presented API key's records live under; None if it is malformed.

    The API's admission (``keel.client.api.limits``) reads them on every request, so a revoked
    key fails on its very next request.
    """
    match = _KEY_SHAPE.match(key)
    if match is None:
        return None
    digest = _digest(key)
    return KeyRecords(match[1], digest, _BY_HASH + digest, _BY_ID + match[1])


def records_agree(records: KeyRecords, stored_digest: str | bytes | None) -> bool:
    """Whether the key's ID record points back at the presented key's digest.

    Compared in constant time, so timing says nothing about a guessed key's digest.
    """
    return stored_digest is not None and hmac.compare_digest(_text(stored_digest), records.digest)


@lru_cache(maxsize=4096)
def principal_of(raw: str | bytes) -> Principal:
    """A key's stored record as a ``Principal``, parsed once per distinct record.

    Every request of a key returns the same record until it changes (a revocation rewrites
    it), so the parse is cached on the record's text; the cache never decides validity.
    """
    return Principal.model_validate_json(raw)


class ApiKeys:
    """Create, look up, list and revoke API keys in Redis."""

    def __init__(self, redis: KeelRedis) -> None:
        self._redis = redis

    @property
    def redis(self) -> KeelRedis:
        """The Redis client the keys live in (the rate limiter shares it)."""
        return self._redis

    async def create(
        self, tenant: str, role: Role = "member", user: str | None = None
    ) -> tuple[str, Principal]:
        """A new key for ``tenant``; returns the key (shown once, never stored) and its record.

        Raises:
            ValueError: If the tenant or user is not an identifier.
        """
        for name, value in (("tenant", tenant), ("user", user)):
            if value is not None and not IDENT_RE.match(value):
                raise ValueError(f"{name} must be 1-64 letters, digits, '.', '_' or '-'")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        principal = Principal(
            key_id=key_id, tenant=tenant, role=role, user=user, created_at=datetime.now(UTC)
        )
        digest = _digest(key)
        # Not MULTI: the records are in different hash slots. A key is valid only when both
        # exist and agree, so a create cut short leaves a record no request can use, and the
        # key was never shown to anyone.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(_BY_HASH + digest, principal.model_dump_json())
            pipe.set(_BY_ID + key_id, digest)
            await pipe.execute()
        return key, principal

    async def lookup(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else."""
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        digest = _digest(key)
        raw = await self._redis.get(_BY_HASH + digest)
        if raw is None:
            return None
        principal = Principal.model_validate_json(raw)
        stored = await self._redis.get(_BY_ID + principal.key_id)
        # The ID's record must point back at this hash (compared in constant time).
        if stored is None or not hmac.compare_digest(_text(stored), digest):
            return None
        return None if principal.revoked else principal

    async def list(self, tenant: str | None = None) -> list[Principal]:
        """Every key's record (never a secret), optionally one tenant's, oldest first."""
        found: list[Principal] = []
        async for name in self._redis.scan_iter(match=_BY_ID + "*", count=500):
            digest = await self._redis.get(name)
            raw = await self._redis.get(_BY_HASH + _text(digest)) if digest else None
            if raw is not None:
                principal = Principal.model_validate_json(raw)
                if tenant is None or principal.tenant == tenant:
                    found.append(principal)
        return sorted(found, key=lambda p: p.created_at)

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by its ID; True if it existed. Its calls fail from the next request."""
        digest = await self._redis.get(_BY_ID + key_id)
        if digest is None:
            return False
        raw = await self._redis.get(_BY_HASH + _text(digest))
        if raw is None:
            return False
        principal = Principal.model_validate_json(raw).model_copy(update={"revoked": True})
        await self._redis.set(_BY_HASH + _text(digest), principal.model_dump_json())
        return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
