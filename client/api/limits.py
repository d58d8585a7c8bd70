"""Admission at the API gateway: the caller's key, and its per-key and per-tenant rate limits.

Each limit is a sliding window kept in Redis as a sorted set of request times. One Lua script
per request (``RateLimiter.check``) looks the presented key up, reads the limits in force, and
checks and updates both windows, all in one round trip and atomically, so any number of API
processes share the limits exactly: a limit of 100 per 10 s admits at most 100 requests in any
10 s, however many replicas serve them (a limiter kept in each process would admit 100 per
replica). Times come from Redis's own clock, so replicas' clocks do not matter. A refused
request counts against neither window, and the caller is told when to retry. Because the key is
read inside the same script, a revoked key is refused from its very next request: nothing about
keys or limits is cached between requests.

The script builds the rate windows' names from the tenant it reads, so it needs its keys on one
Redis (a single server or a primary with replicas, not Redis Cluster), as the rest of Keel does.

The limits are configuration: defaults from the environment (``KEEL_API_RATE_PER_KEY``,
``KEEL_API_RATE_PER_TENANT``, as ``REQUESTS/SECONDS``), overridden at run time by
``keel limits set`` (a Redis hash every request reads), with no restart.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from keel.client.api.keys import Principal, key_records, principal_of

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

# Shared by both scripts. ``rate`` reads a run-time override as ``keel limits set`` stores it
# (``N/S``, validated by ``parse_rate`` first), else the defaults passed in. ``admit`` trims
# both windows, refuses (the tenant's first) if either is full, and otherwise adds the request
# to both, so a refused request is counted nowhere. It returns {the full limit's name or '',
# the milliseconds until its oldest request leaves the window, or 0}.
_WINDOWS = """
local function rate(text, requests, window_ms)
  if text then
    local n, s = string.match(text, '^%s*(%d+)%s*/%s*(%d+%.?%d*)%s*s?%s*$')
    if n and tonumber(n) > 0 and tonumber(s) > 0 then
      return tonumber(n), math.ceil(tonumber(s) * 1000)
    end
  end
  return tonumber(requests), tonumber(window_ms)
end

local function admit(config, tenant_window, key_window, defaults, member)
  local key_n, key_ms = rate(redis.call('HGET', config, 'per_key'), defaults[1], defaults[2])
  local ten_n, ten_ms = rate(redis.call('HGET', config, 'per_tenant'), defaults[3], defaults[4])
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local windows = {{'per_tenant', tenant_window, ten_n, ten_ms},
                   {'per_key', key_window, key_n, key_ms}}
  for _, w in ipairs(windows) do
    redis.call('ZREMRANGEBYSCORE', w[2], '-inf', now_ms - w[4])
    if redis.call('ZCARD', w[2]) >= w[3] then
      local oldest = redis.call('ZRANGE', w[2], 0, 0, 'WITHSCORES')
      return {w[1], math.max(1, tonumber(oldest[2]) + w[4] - now_ms)}
    end
  end
  for _, w in ipairs(windows) do
    redis.call('ZADD', w[2], now_ms, member)
    redis.call('PEXPIRE', w[2], w[4])
  end
  return {'', 0}
end
"""

# KEYS: the limits config, the tenant's window, the key's window. ARGV: per-key requests and
# window (ms), per-tenant requests and window (ms), a unique member.
_ADMIT = (
    _WINDOWS
    + """
return admit(KEYS[1], KEYS[2], KEYS[3], {ARGV[1], ARGV[2], ARGV[3], ARGV[4]}, ARGV[5])
"""
)

# The whole admission of a request, in one round trip. KEYS: the key's record (by hash), its
# ID's record, the limits config, the quotas config. ARGV: the key's digest, its ID, the four
# default limit numbers, a unique member. Returns {0} for an unknown, mismatched or revoked key
# (nothing counted); else {1, the key's record, the full limit's name or '', wait ms, {the
# tenant's quota settings}}. The windows' names come from the record's tenant.
_CHECK = (
    _WINDOWS
    + """
local raw = redis.call('GET', KEYS[1])
if not raw or redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return {0}
end
local record = cjson.decode(raw)
if record['key_id'] ~= ARGV[2] or record['revoked'] == true then
  return {0}
end
local tenant = record['tenant']
local prefix = 'keel:rate:{' .. tenant .. '}:'
local verdict = admit(KEYS[3], prefix .. 'tenant', prefix .. 'key:' .. ARGV[2],
  {ARGV[3], ARGV[4], ARGV[5], ARGV[6]}, ARGV[7])
local quotas = redis.call('HMGET', KEYS[4], 'jobs_per_day:' .. tenant, 'jobs_per_day',
  'usd_per_day:' .. tenant, 'usd_per_day')
return {1, raw, verdict[1], verdict[2], quotas}
"""
)


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

    def __init__(self, redis: aioredis.Redis, defaults: RateLimits | None = None) -> None:
        self._redis = redis
        self._defaults = defaults or default_limits()
        self._admit = redis.register_script(_ADMIT)
        self._check = redis.register_script(_CHECK)
        self._default_args = [
            self._defaults.per_key.requests,
            math.ceil(self._defaults.per_key.seconds * 1000),
            self._defaults.per_tenant.requests,
            math.ceil(self._defaults.per_tenant.seconds * 1000),
        ]

    async def limits(self) -> RateLimits:
        """The limits in force: the defaults with any run-time overrides applied."""
        overrides = await self._redis.hgetall(CONFIG_KEY)
        limits = self._defaults
        for field, value in overrides.items():
            name = _text(field)
            if name in ("per_key", "per_tenant"):
                limits = limits.model_copy(update={name: parse_rate(_text(value))})
        return limits

    async def check(self, api_key: str) -> Admission:
        """Look the presented key up and count the request against its limits, atomically.

        Args:
            api_key: The key as the caller sent it.

        Returns:
            Who the key acts as (None if it is not a valid, unrevoked key; then nothing was
            counted), whether a limit refused the request, and the tenant's quota settings
            (read in the same round trip for the route that starts jobs).
        """
        records = key_records(api_key)
        if records is None:
            return Admission(None)
        reply = await self._check(
            keys=[records.by_hash, records.by_id, CONFIG_KEY, QUOTAS_KEY],
            args=[records.digest, records.key_id, *self._default_args, secrets.token_hex(8)],
        )
        if int(reply[0]) == 0:
            return Admission(None)
        _, raw, limit, wait_ms, settings = reply
        name = _text(limit)
        return Admission(
            principal_of(raw),
            (name, int(wait_ms) / 1000) if name else None,
            tuple(None if value is None else _text(value) for value in settings),
        )

    async def admit(self, key_id: str, tenant: str) -> tuple[str, float] | None:
        """Count one request of a known key against its limits.

        Returns:
            None when the request may proceed; else the full limit's name (the tenant's is
            checked first) and the seconds until it admits again.
        """
        prefix = f"keel:rate:{{{tenant}}}:"
        limit, wait_ms = await self._admit(
            keys=[CONFIG_KEY, prefix + "tenant", prefix + "key:" + key_id],
            args=[*self._default_args, secrets.token_hex(8)],
        )
        name = _text(limit)
        return (name, int(wait_ms) / 1000) if name else None


async def daily_quotas(redis: aioredis.Redis, tenant: str) -> DailyQuotas:
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
