"""Large payloads by reference: a Redis driver for Temporal's external payload storage (issue 16).

Owns ``keel:payload:`` keys. Keel's data converter (``activities.converter``) hands every
payload of at least ``PayloadStoreSettings.threshold_bytes`` (after compression and encryption)
to ``RedisPayloadDriver`` through the SDK's ``ExternalStorage``; history then holds a small
reference (driver name and key) in place of the payload, and every reader fetches it back from
Redis. Keel's own bounds keep payloads far below the threshold (tool outputs go to blobs,
retrieval hits and model replies are capped), so this is the safety net for what slips past
them, never the way data normally travels.

Keys are ``keel:payload:{tenant}:{workflow ID}:{sha256 of the payload}``: scoped to the job
that wrote them (the tenant in braces, a Redis Cluster hash tag, as ``activities/store.py``
does), and content-addressed, so a retried or replayed write of the same payload sets the same
key again (refreshing its TTL) and is safe to run twice. What is stored is the encoded payload,
so with a key ring configured Redis holds ciphertext only.

Every key expires after ``ttl_seconds``; a history that still needs it after that (replayed
after the TTL, or a job running longer) fails to read with ``PayloadExpired``. The default TTL,
30 days, is meant to outlast the namespace's retention; set it at least that long.

Not workflow code: the driver performs network I/O, and the SDK calls it while it encodes and
decodes payloads, outside workflow code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    StorageDriver,
    StorageDriverActivityInfo,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
    StorageDriverWorkflowInfo,
)
from temporalio.exceptions import ApplicationError

if TYPE_CHECKING:
    from keel.activities.redis_client import KeelRedis

__all__ = [
    "DRIVER_NAME",
    "KEY_PREFIX",
    "PAYLOAD_EXPIRED",
    "PAYLOAD_STORE_UNAVAILABLE",
    "PayloadStoreSettings",
    "RedisPayloadDriver",
    "payload_key",
]

KEY_PREFIX = "keel:payload:"
"""Prefix of every key the driver writes; it reads no other keys."""
DRIVER_NAME = "keel-redis"
"""The driver's name in every reference it writes: part of the wire format, never changed."""

# Error types of the payload store. Like the codec's, they live beside the code that raises them
# rather than in ``activities/errors.py``: the converter runs on the client path.
PAYLOAD_EXPIRED = "PayloadExpired"
"""Non-retryable: a reference names a payload Redis no longer holds (its TTL ran out, or the key
was deleted); no retry brings it back."""
PAYLOAD_STORE_UNAVAILABLE = "PayloadStoreUnavailable"
"""Retryable: Redis refused or timed out while a payload was stored or read."""

STORE_ENV = "KEEL_PAYLOAD_STORE"
"""``on`` or ``off`` (the default): whether large payloads travel by reference.

Off by default because a reference makes a history readable only while Redis holds its key:
every reader (workers replaying, ``keel`` commands, the API, the UI's codec server) then needs
Redis, and a Redis that evicts keys under memory pressure or loses them on restart turns a
running job unreadable (``PayloadExpired``). Turn it on where Redis is persistent
(``appendonly yes``, ``maxmemory-policy noeviction``) and every reader shares it. With it off,
Keel's bounds keep payloads small and the codec refuses one that is not (``PayloadTooLarge``).
"""
STORE_URL_ENV = "KEEL_PAYLOAD_STORE_URL"
"""The Redis URL of the store; by default ``REDIS_URL`` (or ``KEEL_REDIS_URL``)."""
THRESHOLD_ENV = "KEEL_PAYLOAD_STORE_THRESHOLD"
"""Encoded size in bytes from which a payload is stored by reference (default 256 KiB)."""
TTL_ENV = "KEEL_PAYLOAD_STORE_TTL"
"""Seconds a stored payload is kept (default 30 days)."""

DEFAULT_URL = "redis://127.0.0.1:6379/0"
"""The same default as the worker's ``REDIS_URL`` (``workers/settings.py``)."""
DEFAULT_THRESHOLD = 256 * 1024
"""Half the server's 512 KB warning size: payloads from here on leave history."""
DEFAULT_TTL = 30 * 86400
"""Thirty days: longer than Keel's blobs (seven), because a reference is needed for as long as
the history holding it may be replayed, which is the namespace's retention."""


@dataclass(frozen=True)
class PayloadStoreSettings:
    """Where large payloads go and for how long."""

    url: str = DEFAULT_URL
    """The Redis URL."""
    threshold_bytes: int = DEFAULT_THRESHOLD
    """Encoded size from which a payload is stored by reference."""
    ttl_seconds: int = DEFAULT_TTL
    """How long Redis keeps a stored payload."""

    def __post_init__(self) -> None:
        """Refuse settings that cannot work."""
        if self.threshold_bytes < 1:
            raise ValueError("the payload store's threshold must be positive")
        if self.ttl_seconds < 1:
            raise ValueError("the payload store's TTL must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PayloadStoreSettings | None:
        """The settings the environment configures, or None when the store is turned off.

        Raises:
            ValueError: A malformed switch, threshold or TTL.
        """
        env = os.environ if environ is None else environ
        switch = env.get(STORE_ENV, "").strip().lower()
        if switch in ("off", "false", "0", "no", ""):
            return None
        if switch not in ("on", "true", "1", "yes"):
            raise ValueError(f"{STORE_ENV} must be on or off")
        url = (
            env.get(STORE_URL_ENV, "").strip()
            or env.get("REDIS_URL", "").strip()
            or env.get("KEEL_REDIS_URL", "").strip()
            or DEFAULT_URL
        )
        return cls(
            url=url,
            threshold_bytes=_positive_int(env, THRESHOLD_ENV, DEFAULT_THRESHOLD),
            ttl_seconds=_positive_int(env, TTL_ENV, DEFAULT_TTL),
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
    if value < 1:
        raise ValueError(f"{name} must be positive")
    return value


def payload_key(workflow_id: str, payload: Payload) -> str:
    """The key of ``payload`` written on behalf of ``workflow_id``.

    Args:
        workflow_id: The job (workflow ID) the payload belongs to; empty outside a workflow.
        payload: The encoded payload.

    Returns:
        ``keel:payload:{tenant}:{workflow ID}:{sha256}``; the tenant is ``-`` for a workflow ID
        that names none (not a Keel job or session).
    """
    digest = hashlib.sha256(payload.SerializeToString(deterministic=True)).hexdigest()
    return f"{KEY_PREFIX}{{{_tenant(workflow_id)}}}:{workflow_id or '-'}:{digest}"


def _tenant(workflow_id: str) -> str:
    """The tenant of a job or session ID (``agent-job-{tenant}:...``), or ``-``."""
    # The prefixes are the workflows' (workflows/types.py, session_types.py), repeated here
    # because activities must not import workflows; a tenant never holds ':' or braces.
    for prefix in ("agent-job-", "agent-session-"):
        if workflow_id.startswith(prefix) and ":" in workflow_id:
            tenant = workflow_id[len(prefix) :].split(":", 1)[0]
            if tenant and "{" not in tenant and "}" not in tenant:
                return tenant
    return "-"


def _target_workflow(context: StorageDriverStoreContext) -> str:
    """The workflow a payload is stored for (the activity's ID for a standalone activity)."""
    target = context.target
    if isinstance(target, StorageDriverWorkflowInfo):
        return target.id or ""
    if isinstance(target, StorageDriverActivityInfo):
        return f"activity-{target.id}" if target.id else ""
    return ""


class RedisPayloadDriver(StorageDriver):
    """Temporal's ``StorageDriver`` on Redis: payloads under job-scoped keys with a TTL."""

    def __init__(self, settings: PayloadStoreSettings) -> None:
        """Build the driver; it connects on first use.

        Args:
            settings: The Redis URL and the TTL (the threshold is the converter's).
        """
        self.settings = settings
        self._redis: KeelRedis | None = None

    def name(self) -> str:
        """See base class; ``keel-redis`` in every reference."""
        return DRIVER_NAME

    def type(self) -> str:
        """See base class."""
        return "keel.redis"

    def _client(self) -> KeelRedis:
        if self._redis is None:
            # Imported here: building a converter must not cost a process that never meets a
            # large payload (every ``keel status``) the import of the Redis client.
            from keel.activities.redis_client import connect

            self._redis = connect(self.settings.url, socket_connect_timeout=5, socket_timeout=5)
        return self._redis

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        """Write ``payloads`` under their keys with the TTL; see the module docstring.

        Raises:
            ApplicationError: ``PayloadStoreUnavailable`` (retryable) when Redis fails.
        """
        import redis.exceptions

        workflow_id = _target_workflow(context)
        keys = [payload_key(workflow_id, p) for p in payloads]
        try:
            async with self._client().pipeline(transaction=False) as pipe:
                for key, payload in zip(keys, payloads, strict=True):
                    pipe.set(key, payload.SerializeToString(), ex=self.settings.ttl_seconds)
                await pipe.execute()
        except redis.exceptions.RedisError as err:
            raise ApplicationError(
                f"cannot store a payload in Redis: {type(err).__name__}",
                type=PAYLOAD_STORE_UNAVAILABLE,
            ) from None
        return [StorageDriverClaim(claim_data={"key": key}) for key in keys]

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        """Read the payloads ``claims`` name.

        Raises:
            ApplicationError: ``PayloadExpired`` (non-retryable) when a key is gone or is not a
                payload key; ``PayloadStoreUnavailable`` (retryable) when Redis fails.
        """
        import redis.exceptions
        from redis.asyncio.cluster import RedisCluster

        keys = [c.claim_data.get("key", "") for c in claims]
        for key in keys:
            if not key.startswith(KEY_PREFIX):
                # Only this driver writes references that name it, and it writes only these
                # keys; anything else is a crafted reference and reads nothing.
                raise ApplicationError(
                    "a stored-payload reference names no payload key",
                    type=PAYLOAD_EXPIRED,
                    non_retryable=True,
                )
        client = self._client()
        try:
            if isinstance(client, RedisCluster):
                # One retrieve's claims normally share a tenant's slot, but nothing makes a
                # history's references do so; on a cluster a plain MGET of two slots fails.
                values = await client.mget_nonatomic(keys)
            else:
                values = await client.mget(keys)
        except redis.exceptions.RedisError as err:
            raise ApplicationError(
                f"cannot read a stored payload from Redis: {type(err).__name__}",
                type=PAYLOAD_STORE_UNAVAILABLE,
            ) from None
        payloads = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                raise ApplicationError(
                    f"stored payload {key} is gone (its TTL of "
                    f"{self.settings.ttl_seconds} s ran out, or it was deleted)",
                    type=PAYLOAD_EXPIRED,
                    non_retryable=True,
                )
            payloads.append(
                Payload.FromString(value if isinstance(value, bytes) else value.encode())
            )
        return payloads

    async def aclose(self) -> None:
        """Close the Redis connections, if any were opened."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
