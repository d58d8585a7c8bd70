"""Admission at the API gateway: the caller's key, and its per-key and per-tenant rate limits.

Each limit is a sliding window kept in Redis as a sorted set of request times. A request is
admitted in two round trips, in this order (``RateLimiter.check``):

1. The presented key's two records are read (one pipeline, two GETs) and checked: they must
   exist, agree, and not be revoked. Nothing about keys is cached between requests, so a
   revoked key is refused from its very next request.
2. One Lua script over the tenant's two windows (both named with the tenant as their Redis
   Cluster hash tag, ``keel:rate:{tenant}:...``) checks and updates them atomically, so any
   number of API processes share the limits exactly: a limit of 100 per 10 s admits at most 100
   requests in any 10 s, however many replicas serve them. A refused request counts against
   neither window, and the caller is told when to retry. Times come from Redis's own clock.

Why two steps (issue 16): on Redis Cluster a script may only touch keys of one hash slot, and
the key's records (named by the key's digest and ID), the windows (by tenant) and the settings
(global) hash to three. Before, one script read them all in one round trip; the split costs a
round trip per request, and a key revoked between the two steps still has the request it was
checking for admitted. Putting every admission key under one global tag would have kept one
round trip but pinned all admission to one cluster node and renamed the keys' and settings'
permanent records.

The limits and the tenants' quota settings are configuration: defaults from the environment
(``KEEL_API_RATE_PER_KEY``, ``KEEL_API_RATE_PER_TENANT``, as ``REQUESTS/SECONDS``), overridden
at run time by ``keel limits set`` (Redis hashes each process re-reads at most once a second,
as every run-time setting in Keel is), with no restart.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from keel.activities.limits import CONFIG_MAX_AGE_SECONDS, RuntimeConfig
from keel.activities.redis_client import KeelRedis
from keel.client.api.keys import Principal, key_records, principal_of, records_agree

__all__ = [
    "CONFIG_KEY",
    "QUOTAS_KEY",
    "Admission",
    "DailyQuotas",
    "Rate",
    "RateLimiter",
    "RateLimits",
    "daily_quotas",
    "parse_rate",
]

CONFIG_KEY = "keel:config:limits"
"""Redis hash of run-time overrides: field ``per_key`` or ``per_tenant``, value ``N/S``."""
QUOTAS_KEY = "keel:config:quotas"
"""Redis hash of run-time quota settings: ``jobs_per_day`` and ``usd_per_day`` for every
tenant, ``jobs_per_day:{tenant}`` and ``usd_per_day:{tenant}`` for one; 0 means none."""

_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*$")

# KEYS: the tenant's window, the key's window (one hash slot: both carry the tenant's tag).
# ARGV: per-key requests and window (ms), per-tenant requests and window (ms), a unique member.
# Trims both windows, refuses (the tenant's first) if either is full, and otherwise adds the
# request to both, so a refused request is counted nowhere. Returns {the full limit's name or
# '', the milliseconds until its oldest request leaves the window, or 0}.
_ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local windows = {{'per_tenant', KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[4])},
                 {'per_key', KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2])}}
for _, w in ipairs(windows) do
  redis.call('ZREMRANGEBYSCORE', w[2], '-inf', now_ms - w[4])
  if redis.call('ZCARD', w[2]) >= w[3] then
    local oldest = redis.call('ZRANGE', w[2], 0, 0, 'WITHSCORES')
    return {w[1], math.max(1, tonumber(oldest[2]) + w[4] - now_ms)}
  end
end
for _, w in ipairs(windows) do
  redis.call('ZADD', w[2], now_ms, ARGV[5])
  redis.call('PEXPIRE', w[2], w[4])
end
return {'', 0}
"""


def window_keys(tenant: str, key_id: str) -> list[str]:
    """The tenant's window and the key's window, in one hash slot (the tenant's tag).

    Raises:
        ValueError: If ``tenant`` is not an identifier (a brace would move the tag).
    """
    if not tenant or any(c in tenant for c in ":{}"):
        raise ValueError(f"invalid tenant {tenant!r}")
    prefix = f"keel:rate:{{{tenant}}}:"
    return [prefix + "tenant", prefix + "key:" + key_id]


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


class DailyQuotas(BaseModel):
    """A tenant's daily quotas; 0 means none."""

    jobs_per_day: int = Field(default=0, ge=0)
    usd_per_day: float = Field(default=0.0, ge=0)


@dataclass(frozen=True)
class Admission:
    """What the admission script decided about one request."""

    principal: Principal | None
    """Who the key acts as; None for a missing, malformed, unknown or revoked key."""
    refused: tuple[str, float] | None = None
    """The full limit's name and the seconds until it admits again; None if admitted."""
    quota_settings: tuple[str | None, ...] = ()
    """The tenant's quota settings as stored: its own jobs, everyone's jobs, its own USD,
    everyone's USD."""

    def quotas(self) -> DailyQuotas:
        """The tenant's daily quotas: its own setting, else everyone's, else the environment's."""
        return _quotas(self.quota_settings)


class RateLimiter:
    """Admit or refuse one request: its key, and its key's and its tenant's limits."""

    def __init__(
        self,
        redis: KeelRedis,
        defaults: RateLimits | None = None,
        *,
        config_max_age: float = CONFIG_MAX_AGE_SECONDS,
    ) -> None:
        """Bind the limiter to the API's Redis.

        Args:
            redis: Where keys, windows and settings live.
            defaults: The limits when no run-time override is set (else the environment's).
            config_max_age: How stale this process's copy of the settings may be (seconds).
        """
        self._redis = redis
        self._defaults = defaults or default_limits()
        self._admit = redis.register_script(_ADMIT)
        self._config = RuntimeConfig(redis, CONFIG_KEY, config_max_age)
        self._quota_config = RuntimeConfig(redis, QUOTAS_KEY, config_max_age)

    async def limits(self) -> RateLimits:
        """The limits in force: the defaults with any run-time overrides applied.

        Raises:
            ValueError: If an override is not ``REQUESTS/SECONDS``.
        """
        overrides = await self._redis.hgetall(CONFIG_KEY)
        limits = self._defaults
        for field, value in overrides.items():
            name = _text(field)
            if name in ("per_key", "per_tenant"):
                limits = limits.model_copy(update={name: parse_rate(_text(value))})
        return limits

    async def _window_args(self) -> list[int]:
        """The admission script's limit arguments: overrides that parse, else the defaults."""
        overrides = await self._config.values()
        args: list[int] = []
        for name in ("per_key", "per_tenant"):
            rate: Rate = getattr(self._defaults, name)
            try:
                rate = parse_rate(overrides[name])
            except (KeyError, ValueError):
                pass  # None set, or one `keel limits set` would have refused: the default.
            args += [rate.requests, math.ceil(rate.seconds * 1000)]
        return args

    async def _principal(self, api_key: str) -> Principal | None:
        """Step 1: the presented key's principal, if its records exist, agree and are live."""
        records = key_records(api_key)
        if records is None:
            return None
        # The two records hash to different slots, so they are read in a pipeline, not MULTI.
        # Nothing is lost: a revocation rewrites only the first, so either read of it decides.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(records.by_hash)
            pipe.get(records.by_id)
            raw, stored_digest = await pipe.execute()
        if raw is None or not records_agree(records, stored_digest):
            return None
        principal = principal_of(raw)
        return None if principal.revoked or principal.key_id != records.key_id else principal

    async def check(self, api_key: str) -> Admission:
        """Look the presented key up, then count the request against its limits.

        Args:
            api_key: The key as the caller sent it.

        Returns:
            Who the key acts as (None if it is not a valid, unrevoked key; then nothing was
            counted), whether a limit refused the request, and the tenant's quota settings
            (at most ``config_max_age`` old, for the routes that start jobs).
        """
        principal = await self._principal(api_key)
        if principal is None:
            return Admission(None)
        refused = await self.admit(principal.key_id, principal.tenant)
        quotas = await self._quota_config.values()
        tenant = principal.tenant
        fields = (f"jobs_per_day:{tenant}", "jobs_per_day", f"usd_per_day:{tenant}", "usd_per_day")
        return Admission(principal, refused, tuple(quotas.get(field) for field in fields))

    async def admit(self, key_id: str, tenant: str) -> tuple[str, float] | None:
        """Step 2: count one request of a known key against its and its tenant's windows.

        Returns:
            None when the request may proceed; else the full limit's name (the tenant's is
            checked first) and the seconds until it admits again.
        """
        limit, wait_ms = await self._admit(
            keys=window_keys(tenant, key_id),
            args=[*await self._window_args(), secrets.token_hex(8)],
        )
        name = _text(limit)
        return (name, int(wait_ms) / 1000) if name else None


async def daily_quotas(redis: KeelRedis, tenant: str) -> DailyQuotas:
    """A tenant's daily quotas: its own setting, else everyone's, else the environment's.

    Returns:
        The quotas in force for ``tenant`` (0: no quota).
    """
    fields = ["jobs_per_day:" + tenant, "jobs_per_day", "usd_per_day:" + tenant, "usd_per_day"]
    settings = await redis.hmget(QUOTAS_KEY, fields)
    return _quotas(tuple(None if value is None else _text(value) for value in settings))


def _quotas(settings: Sequence[str | None]) -> DailyQuotas:
    own_jobs, all_jobs, own_usd, all_usd = (*settings, None, None, None, None)[:4]
    jobs = own_jobs or all_jobs or os.environ.get("KEEL_QUOTA_JOBS_PER_DAY") or "0"
    usd = own_usd or all_usd or os.environ.get("KEEL_QUOTA_USD_PER_DAY") or "0"
    return DailyQuotas(jobs_per_day=int(float(jobs)), usd_per_day=float(usd))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
