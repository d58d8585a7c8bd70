"""Fleet-wide limit primitives in Redis: run-time configuration, leases, per-minute rates.

Not workflow code: every method reads or writes Redis. The gateways' limits
(``activities/gateway_limits.py``) and the running-job slots (``activities/slots.py``) are
built from these. This module owns:

- ``RuntimeConfig``: a Redis hash of limits an operator changes with ``keel limits``; every
  process re-reads it at most once a second, so a change applies within about a second and no
  worker restarts.
- ``LeaseSemaphore``: at most N calls in flight per tool or model. A lease is a member of a
  sorted set scored by its expiry; acquire, renew and release are Lua scripts, so any number of
  processes share the limit exactly. The holder renews its lease while the call runs, so the
  lease of a worker killed mid-call frees itself within ``LEASE_TTL_SECONDS``.
- ``ModelRates``: requests and tokens per minute per model, as GCRA (a bucket holding one
  minute's worth, refilled evenly: a burst up to the limit, then calls spaced 60/N s apart,
  the way providers meter RPM and TPM). A call reserves its place and waits the delay the
  script returns; tokens are reserved at an estimate and corrected with the actual usage.
- ``DegradeOpen``: when Redis cannot be reached the call proceeds unlimited and one warning
  is logged per outage; a limit store that is down never fails a job.

Times come from Redis's own clock (``TIME``), so the processes' clocks do not matter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError

from keel.activities.redis_client import KeelRedis

__all__ = [
    "CONFIG_MAX_AGE_SECONDS",
    "INFLIGHT_KEY",
    "LEASE_TTL_SECONDS",
    "RATES_KEY",
    "DegradeOpen",
    "LeaseSemaphore",
    "ModelRates",
    "RuntimeConfig",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

INFLIGHT_KEY = "keel:config:inflight"
"""Redis hash of in-flight limits: ``tool:{name}`` or ``model:{name}`` -> N, and ``tool:*`` /
``model:*`` for every tool or model without its own; 0 or absent means none."""
RATES_KEY = "keel:config:model_rates"
"""Redis hash of per-model rates: ``{model}:rpm`` and ``{model}:tpm`` -> N per minute, and
``*:rpm`` / ``*:tpm`` for every model without its own; 0 or absent means none."""
CONFIG_MAX_AGE_SECONDS = 1.0
"""How stale a process's copy of a configuration hash may be."""
LEASE_TTL_SECONDS = 20.0
"""Life of an in-flight lease without renewal; the holder renews it every quarter of this."""
DOWN_SKIP_SECONDS = 5.0
"""After Redis fails, calls skip the limits for this long instead of each paying a timeout."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RuntimeConfig:
    """One Redis hash of run-time settings, read at most once per ``max_age`` seconds."""

    def __init__(self, redis: KeelRedis, key: str, max_age: float = CONFIG_MAX_AGE_SECONDS) -> None:
        self._redis, self.key, self._max_age = redis, key, max_age
        self._values: dict[str, str] = {}
        self._read_at = -math.inf

    async def values(self) -> dict[str, str]:
        """The hash's fields and values (decoded), from this process's copy if fresh.

        Raises:
            RedisError: When the copy is stale and Redis cannot be read.
        """
        if time.monotonic() - self._read_at >= self._max_age:
            raw = await self._redis.hgetall(self.key)
            self._values = {_text(k): _text(v) for k, v in raw.items()}
            self._read_at = time.monotonic()
        return self._values


class DegradeOpen:
    """Runs limit operations; when Redis fails it warns once and lets calls through."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._skip_until = 0.0
        self._down = False

    async def run(self, op: Callable[[], Awaitable[T]], fallback: T) -> T:
        """``op()``, or ``fallback`` when Redis fails (and for a few seconds after).

        Args:
            op: One limit operation against Redis.
            fallback: What the caller gets instead: the answer that lets its call proceed.

        Returns:
            What ``op`` returned, or ``fallback``.
        """
        if time.monotonic() < self._skip_until:
            return fallback
        try:
            result = await op()
        except (RedisError, OSError) as err:
            self._skip_until = time.monotonic() + DOWN_SKIP_SECONDS
            if not self._down:
                self._down = True
                log.warning("limits.degraded_open", limits=self._what, error=str(err)[:200])
            return fallback
        if self._down:
            self._down = False
            log.info("limits.restored", limits=self._what)
        return result


# KEYS[1]: the gate's leases (sorted set: lease ID -> expiry, ms). ARGV: limit, lease ID, TTL
# (ms). 1 when the lease is held (it already was, or a place was free), else 0.
_ACQUIRE_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
return 0
"""

# KEYS[1]: the gate's leases. ARGV: lease ID, TTL (ms). 1 when renewed, 0 when it was lost.
_RENEW_LEASE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class LeaseSemaphore:
    """At most N leases per key, each expiring unless renewed."""

    def __init__(self, redis: KeelRedis, ttl_seconds: float = LEASE_TTL_SECONDS) -> None:
        self._redis = redis
        self.ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        self._acquire = redis.register_script(_ACQUIRE_LEASE)
        self._renew = redis.register_script(_RENEW_LEASE)

    async def try_acquire(self, key: str, lease_id: str, limit: int) -> bool:
        """Take a lease if fewer than ``limit`` are live (or renew it if already held)."""
        return bool(await self._acquire(keys=[key], args=[limit, lease_id, self.ttl_ms]))

    async def renew(self, key: str, lease_id: str) -> bool:
        """Extend a held lease by the TTL; False when it had expired and was given away."""
        return bool(await self._renew(keys=[key], args=[lease_id, self.ttl_ms]))

    async def release(self, key: str, lease_id: str) -> None:
        """Give a lease back (idempotent)."""
        await self._redis.zrem(key, lease_id)

    async def holders(self, key: str) -> int:
        """Live leases on ``key``."""
        now_ms = (await self._redis.time())[0] * 1000
        return int(await self._redis.zcount(key, now_ms, "+inf"))


# KEYS[1]: requests' theoretical arrival time (TAT, ms), KEYS[2]: tokens'. ARGV: rpm, tpm (0:
# none), tokens, longest wait (ms). Returns {1, wait ms} with the place reserved, or
# {0, wait ms} with nothing changed when the wait would be longer than allowed.
_RESERVE_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local costs = {1, math.min(tonumber(ARGV[3]), limits[2])}
local tats = {}
local wait = 0
for i = 1, 2 do
  if limits[i] > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    tats[i] = math.max(tat, now) + costs[i] * window / limits[i]
    wait = math.max(wait, tats[i] - window - now)
  end
end
if wait > tonumber(ARGV[4]) then return {0, math.ceil(wait)} end
for i = 1, 2 do
  if tats[i] then
    redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1)
  end
end
return {1, math.ceil(wait)}
"""

# KEYS[1]: tokens' TAT. ARGV: tpm, tokens to add back (negative) or charge (positive).
_ADJUST_TOKENS = """
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
local tpm = tonumber(ARGV[1])
if not tat or tpm <= 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
tat = tat + tonumber(ARGV[2]) * 60000 / tpm
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
return 1
"""


class ModelRates:
    """Requests and tokens per minute per model (GCRA), reserved atomically."""

    def __init__(self, redis: KeelRedis) -> None:
        self._reserve = redis.register_script(_RESERVE_RATE)
        self._adjust = redis.register_script(_ADJUST_TOKENS)

    @staticmethod
    def _keys(gate: str) -> list[str]:
        return [f"keel:gw:{{{gate}}}:rpm", f"keel:gw:{{{gate}}}:tpm"]

    async def reserve(
        self, gate: str, rpm: int, tpm: int, tokens: int, max_wait_seconds: float
    ) -> tuple[bool, float]:
        """Reserve one call of ``tokens`` tokens.

        Returns:
            Whether the place was reserved, and the seconds until it starts (when not
            reserved: how long the caller would have had to wait).
        """
        args = [rpm, tpm, max(0, tokens), math.floor(max_wait_seconds * 1000)]
        reserved, wait_ms = await self._reserve(keys=self._keys(gate), args=args)
        return bool(reserved), int(wait_ms) / 1000

    async def adjust(self, gate: str, tpm: int, tokens: int) -> None:
        """Charge (positive) or give back (negative) tokens against the model's TPM."""
        if tpm > 0 and tokens:
            await self._adjust(keys=self._keys(gate)[1:], args=[tpm, tokens])
