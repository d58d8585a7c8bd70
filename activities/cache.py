"""Keel's caches in Redis: model responses, tool results, embeddings and retrieval hits.

One module, so every cache key is built the same way and scoped the same way:

    keel:cache:{kind}:{tenant}:{sha256 of the canonical JSON of the key's parts}

The tenant is both in the key's text (``{tenant}`` braces keep one tenant's keys in one Redis
Cluster hash slot) and among the hashed parts, so no key of one tenant can ever equal a key of
another. Each cache names the parts that decide its output (``ResponseKey``, ``ToolKey``...);
anything that can change the output belongs in them, and the tests try each one.

A cache is an optimisation, never a dependency: a Redis error, a timeout or an unreadable
entry reads as a miss and a failed write is dropped, both logged and counted
(``keel_cache_errors``). Hits and misses are Temporal metrics on the worker's Prometheus
endpoint (``keel_cache_requests{cache, result}``, ``keel_cache_saved_tokens``,
``keel_cache_saved_usd``), next to the SDK's own.

Not workflow code: every method performs network I/O and is called only from activities. What
an activity returns is the same on a hit as on a miss (plus a ``cached`` flag), so history
records a hit exactly like a miss, and replay never reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from temporalio import activity

from keel.activities.redis_client import KeelRedis

__all__ = ["CacheKind", "CacheSettings", "KeelCache", "Normalization", "normalize_text"]

log = structlog.get_logger(__name__)

KEY_PREFIX = "keel:cache:"
"""Prefix of every cache key."""
OUTAGE_SECONDS = 5.0
"""After a Redis error, lookups are misses without trying Redis for this long."""
MAX_ENTRY_BYTES = 1_000_000
"""Entries larger than this are not stored: a cache must not become a payload store."""


class CacheKind(StrEnum):
    """The caches, each with its own TTL and counters."""

    RESPONSE = "response"
    """Model responses (``activities/llm.py``)."""
    TOOL = "tool"
    """Results of read-only tools (``activities/tools/gateway.py``)."""
    EMBEDDING = "embedding"
    """Embedding vectors per model and text (``activities/embeddings.py``)."""
    RETRIEVAL = "retrieval"
    """Top-k hits per corpus index version, query, filters and k (``activities/retrieval.py``)."""


Normalization = Literal["exact", "whitespace", "casefold"]


class CacheSettings(BaseModel):
    """How the caches behave; built by the worker from its settings (never from job input)."""

    enabled: bool = True
    """Off: every lookup is a miss and nothing is stored."""
    ttl_seconds: dict[CacheKind, float] = Field(
        default_factory=lambda: {
            CacheKind.RESPONSE: 86_400.0,
            # A ceiling: each tool's own TTL (activities/catalog.py) applies below it.
            CacheKind.TOOL: 7 * 86_400.0,
            CacheKind.EMBEDDING: 30 * 86_400.0,
            CacheKind.RETRIEVAL: 86_400.0,
        }
    )
    """Time to live per cache; a kind missing here is not cached. Tools may set shorter TTLs."""
    normalization: Normalization = "casefold"
    """How prompts are normalised before they are hashed into a response key: ``exact``
    (as sent), ``whitespace`` (Unicode NFKC, runs of whitespace collapsed, ends stripped) or
    ``casefold`` (that, and case folded). Casefold makes "What is X?" and "what is  x?" one
    entry; choose ``whitespace`` where case carries meaning (code, identifiers)."""


_SPACE = re.compile(r"\s+")


def normalize_text(text: str, mode: Normalization) -> str:
    """``text`` as a cache key sees it under ``mode`` (see ``CacheSettings.normalization``)."""
    if mode == "exact":
        return text
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    return text.casefold() if mode == "casefold" else text


def _digest(parts: Mapping[str, Any]) -> str:
    canonical = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_tenant(tenant: str) -> str:
    # A tenant is an identifier (workflows/types.py); braces or colons would let one tenant's
    # key text imitate another's hash slot or prefix, so refuse them here too.
    if not tenant or any(c in tenant for c in ":{}"):
        raise ValueError(f"not a tenant: {tenant!r}")
    return tenant


@dataclass
class CacheStats:
    """Counts since the process started, per kind (tests and ``keel bench`` read them)."""

    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def count(self, table: dict[str, int], kind: CacheKind) -> None:
        table[kind.value] = table.get(kind.value, 0) + 1


class KeelCache:
    """Tenant-scoped get and put over Redis, degrading to misses when Redis fails."""

    def __init__(self, redis: KeelRedis | None, settings: CacheSettings | None = None):
        """Bind the caches to a Redis client.

        Args:
            redis: The cache store; None turns every cache off (all misses, no writes).
            settings: TTLs and prompt normalisation; the defaults when None.
        """
        self.redis = redis
        self.settings = settings or CacheSettings()
        self.stats = CacheStats()
        self._down_until = 0.0
        """Monotonic time until which Redis is not tried after an error (``OUTAGE_SECONDS``)."""

    def _down(self, kind: CacheKind) -> bool:
        """Whether a recent error says Redis is out: then a lookup is a miss without trying.

        Without it every model and tool call would wait for a connection to time out (and
        redis-py's retries) twice, once to read and once to write, for as long as Redis is gone.
        """
        if time.monotonic() >= self._down_until:
            return False
        self.stats.count(self.stats.misses, kind)
        _metric("keel_cache_requests", 1, kind, result="miss")
        return True

    def enabled(self, kind: CacheKind) -> bool:
        """Whether ``kind`` is cached at all."""
        return (
            self.redis is not None
            and self.settings.enabled
            and self.settings.ttl_seconds.get(kind, 0) > 0
        )

    def key(self, kind: CacheKind, tenant: str, parts: Mapping[str, Any]) -> str:
        """The key of an entry: its kind and tenant in clear, everything else hashed.

        Args:
            kind: Which cache.
            tenant: Whose entry; also hashed with ``parts``.
            parts: Everything that decides the cached value (JSON-serialisable).
        """
        tenant = _check_tenant(tenant)
        digest = _digest({"kind": kind.value, "tenant": tenant, "parts": dict(parts)})
        return f"{KEY_PREFIX}{kind.value}:{{{tenant}}}:{digest}"

    async def get(self, kind: CacheKind, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None on a miss, an error or an unreadable entry."""
        if not self.enabled(kind) or self._down(kind):
            return None
        assert self.redis is not None  # enabled() checked it
        try:
            raw = await self.redis.get(key)
        except (RedisError, OSError) as err:
            self._error(kind, "get", err)
            return None
        value: Any = None
        if raw is not None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            self.stats.count(self.stats.misses, kind)
            _metric("keel_cache_requests", 1, kind, result="miss")
            return None
        self.stats.count(self.stats.hits, kind)
        _metric("keel_cache_requests", 1, kind, result="hit")
        return value

    async def put(
        self, kind: CacheKind, key: str, value: Mapping[str, Any], ttl: float | None = None
    ) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (the kind's TTL when None).

        Returns:
            True when stored; False when the cache is off, the entry too large, or Redis failed.
        """
        if not self.enabled(kind) or time.monotonic() < self._down_until:
            return False
        assert self.redis is not None
        seconds = (
            self.settings.ttl_seconds[kind]
            if ttl is None
            else min(ttl, self.settings.ttl_seconds[kind])
        )
        raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if seconds <= 0 or len(raw) > MAX_ENTRY_BYTES:
            return False
        try:
            await self.redis.set(key, raw, px=max(1, int(seconds * 1000)))
        except (RedisError, OSError) as err:
            self._error(kind, "put", err)
            return False
        return True

    async def get_many(self, kind: CacheKind, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The entries under ``keys`` in one round trip (MGET), None for each miss.

        Degrades as ``get`` does: a Redis error makes every entry a miss. The keys should be
        one tenant's (they then share a Redis Cluster hash slot, which MGET needs).
        """
        if not keys or not self.enabled(kind) or self._down(kind):
            return [None] * len(keys)
        assert self.redis is not None
        try:
            raws = await self.redis.mget(list(keys))
        except (RedisError, OSError) as err:
            self._error(kind, "get", err)
            return [None] * len(keys)
        values: list[dict[str, Any] | None] = []
        for raw in raws:
            try:
                value: Any = json.loads(raw) if raw is not None else None
            except ValueError:
                value = None
            values.append(value if isinstance(value, dict) else None)
        found = sum(v is not None for v in values)
        for table, n in ((self.stats.hits, found), (self.stats.misses, len(values) - found)):
            table[kind.value] = table.get(kind.value, 0) + n
        _metric("keel_cache_requests", found, kind, result="hit")
        _metric("keel_cache_requests", len(values) - found, kind, result="miss")
        return values

    async def put_many(self, kind: CacheKind, entries: Mapping[str, Mapping[str, Any]]) -> int:
        """Store several entries for the kind's TTL in one round trip (a pipeline, no MULTI).

        Returns:
            How many were sent to Redis (too large ones are skipped); 0 when off or on error.
        """
        if not entries or not self.enabled(kind) or time.monotonic() < self._down_until:
            return 0
        assert self.redis is not None
        ms = max(1, int(self.settings.ttl_seconds[kind] * 1000))
        pipe = self.redis.pipeline(transaction=False)
        sent = 0
        for key, value in entries.items():
            raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            if len(raw) <= MAX_ENTRY_BYTES:
                pipe.set(key, raw, px=ms)
                sent += 1
        try:
            await pipe.execute()
        except (RedisError, OSError) as err:
            self._error(kind, "put", err)
            return 0
        return sent

    def saved(self, kind: CacheKind, tokens: int, usd: float) -> None:
        """Count what a hit saved (tokens and dollars the call would have cost)."""
        if tokens:
            _metric("keel_cache_saved_tokens", tokens, kind)
        if usd > 0:
            # Counters take integers: dollars are counted in millionths.
            _metric("keel_cache_saved_micro_usd", round(usd * 1_000_000), kind)

    def _error(self, kind: CacheKind, op: str, err: BaseException) -> None:
        self._down_until = time.monotonic() + OUTAGE_SECONDS
        self.stats.count(self.stats.errors, kind)
        _metric("keel_cache_errors", 1, kind, op=op)
        log.warning("cache.unavailable", cache=kind.value, op=op, error=type(err).__name__)


_DESCRIPTIONS = {
    "keel_cache_requests": "Cache lookups by cache and result (hit or miss).",
    "keel_cache_errors": "Cache operations that failed and degraded to a miss or no write.",
    "keel_cache_saved_tokens": "Model tokens cache hits saved.",
    "keel_cache_saved_micro_usd": "Millionths of a dollar cache hits saved.",
}


def _metric(name: str, value: int, kind: CacheKind, **attrs: str) -> None:
    """Add to a counter on the worker's Temporal metric meter; nothing outside an activity."""
    if value <= 0 or not activity.in_activity():
        return
    counter = activity.metric_meter().create_counter(name, _DESCRIPTIONS[name])
    counter.add(value, {"cache": kind.value, **attrs})
