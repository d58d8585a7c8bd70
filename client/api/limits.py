"""Request rate limits at the API gateway: per key and per tenant, exact across processes.

Each limit is a sliding window kept in Redis as a sorted set of request times, checked and
updated by one Lua script, so any number of API processes share it exactly: a limit of 100 per
10 s admits at most 100 requests in any 10 s, however many replicas serve them (a limiter kept
in each process would admit 100 per replica). Times come from Redis's own clock, so replicas'
clocks do not matter. A refused request is not counted, and the caller is told when to retry.

The limits are configuration: defaults from the environment (``KEEL_API_RATE_PER_KEY``,
``KEEL_API_RATE_PER_TENANT``, as ``REQUESTS/SECONDS``), overridden at run time by
``keel limits set`` (a Redis hash every request reads), with no restart.
"""

from __future__ import annotations

import math
import os
import re
import uuid

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

__all__ = [
    "CONFIG_KEY",
    "QUOTAS_KEY",
    "Rate",
    "RateLimiter",
    "RateLimits",
    "daily_quotas",
    "parse_rate",
]

CONFIG_KEY = "keel:config:limits"
"""Redis hash of run-time overrides: field ``per_key`` or ``per_tenant``, value ``N/S``."""

_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*$")

# KEYS[1]: the window's sorted set. ARGV: limit, window (ms), a unique member.
# Returns 0 when admitted, else the milliseconds until the oldest request leaves the window.
_SLIDING_WINDOW = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now_ms)
"""


class Rate(BaseModel):
    """At most ``requests`` in any ``seconds``."""

    requests: int = Field(gt=0)
    seconds: float = Field(gt=0)

    def __str__(self) -> str:
        return f"{self.requests}/{self.seconds:g}s"


class RateLimits(BaseModel):
    """The API's request limits."""

    per_key: Rate = Rate(requests=100, seconds=10)
    per_tenant: Rate = Rate(requests=1000, seconds=10)


def parse_rate(text: str) -> Rate:
    """``"100/10"`` or ``"100/10s"`` as a ``Rate``.

    Raises:
        ValueError: If the text is not ``REQUESTS/SECONDS`` with both positive.
    """
    match = _RATE.match(text)
    if not match or int(match[1]) == 0 or float(match[2]) == 0:
        raise ValueError(f"{text!r}: a rate is REQUESTS/SECONDS, both positive, e.g. 100/10")
    return Rate(requests=int(match[1]), seconds=float(match[2]))


def default_limits() -> RateLimits:
    """Limits from the environment, else the built-in defaults."""
    limits = RateLimits()
    for field, env in (
        ("per_key", "KEEL_API_RATE_PER_KEY"),
        ("per_tenant", "KEEL_API_RATE_PER_TENANT"),
    ):
        if value := os.environ.get(env):
            limits = limits.model_copy(update={field: parse_rate(value)})
    return limits


class RateLimiter:
    """Admit or refuse one request against its key's and its tenant's limits."""

    def __init__(self, redis: aioredis.Redis, defaults: RateLimits | None = None) -> None:
        self._redis = redis
        self._defaults = defaults or default_limits()
        self._script = redis.register_script(_SLIDING_WINDOW)

    async def limits(self) -> RateLimits:
        """The limits in force: the defaults with any run-time overrides applied."""
        overrides = await self._redis.hgetall(CONFIG_KEY)
        limits = self._defaults
        for field, value in overrides.items():
            name = field.decode() if isinstance(field, bytes) else field
            text = value.decode() if isinstance(value, bytes) else value
            if name in ("per_key", "per_tenant"):
                limits = limits.model_copy(update={name: parse_rate(text)})
        return limits

    async def admit(self, key_id: str, tenant: str) -> tuple[str, float] | None:
        """None when the request may proceed; else the limit's name and seconds to wait.

        The tenant's window is checked first, then the key's, each atomically; a request
        refused by the key's limit has already counted once against the tenant's, which errs
        on the side of fewer requests, never more.
        """
        limits = await self.limits()
        checks = (
            ("per_tenant", f"keel:rate:{{{tenant}}}:tenant", limits.per_tenant),
            ("per_key", f"keel:rate:{{{tenant}}}:key:{key_id}", limits.per_key),
        )
        for name, redis_key, rate in checks:
            member = uuid.uuid4().hex
            wait_ms = await self._script(
                keys=[redis_key], args=[rate.requests, math.ceil(rate.seconds * 1000), member]
            )
            if int(wait_ms) > 0:
                return name, int(wait_ms) / 1000
        return None


QUOTAS_KEY = "keel:config:quotas"
"""Redis hash of run-time quota settings: ``jobs_per_day`` and ``usd_per_day`` for every
tenant, ``jobs_per_day:{tenant}`` and ``usd_per_day:{tenant}`` for one; 0 means none."""


class DailyQuotas(BaseModel):
    """A tenant's daily quotas; 0 means none."""

    jobs_per_day: int = Field(default=0, ge=0)
    usd_per_day: float = Field(default=0.0, ge=0)


async def daily_quotas(redis: aioredis.Redis, tenant: str) -> DailyQuotas:
    """A tenant's daily quotas: its own setting, else everyone's, else the environment's.

    Returns:
        The quotas in force for ``tenant`` (0: no quota).
    """
    raw = await redis.hgetall(QUOTAS_KEY)
    config = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    quotas: dict[str, str] = {}
    for name, env in (
        ("jobs_per_day", "KEEL_QUOTA_JOBS_PER_DAY"),
        ("usd_per_day", "KEEL_QUOTA_USD_PER_DAY"),
    ):
        value = config.get(f"{name}:{tenant}") or config.get(name) or os.environ.get(env) or "0"
        quotas[name] = value
    return DailyQuotas(
        jobs_per_day=int(float(quotas["jobs_per_day"])), usd_per_day=float(quotas["usd_per_day"])
    )
