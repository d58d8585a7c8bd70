"""Job slots: how many jobs a tenant, and each of its users, may run at once.

Not workflow code: the activities here read and write Redis. A job holds a slot from the
moment it starts working until it ends; the workflow takes it with ``acquire_job_slot`` and
gives it back with ``release_job_slot`` (``workflows/_slots.py``).

- A slot is a lease named by the job ID with an expiry the workflow derives from the job's
  budgets, so a job terminated without giving its slot back frees it when it could no longer
  be running; acquiring again (a retry, a replay) renews it and never takes a second.
- A job with no free slot waits in line, first in first out, per tenant: one Lua script
  admits a waiter only when every waiter before it that could run has been served, and a
  waiter held back only by its own user's limit does not hold up other users. The waiting
  activity asks again every ``poll_seconds`` and heartbeats: waiting spends no retries. A
  waiter that stops asking (its worker died, its job was terminated) leaves the line after
  ``WAITER_TTL_SECONDS``.
- The limits are run-time configuration (``CONCURRENCY_KEY``, changed by ``keel limits
  concurrency``), read at most once a second. The ``refuse`` policy is applied by the HTTP
  API, which reserves the slot when it accepts a job (``reserve_for_submit``) and answers 429
  when none is free; under ``wait`` the job is accepted and queues.
- Redis down: slots are granted unchecked (one warning per outage), never a failed job.

Keys, all of one tenant in one hash slot: ``keel:slots:{tenant}:running`` and
``...:user:{user}`` (sorted sets, job ID -> lease expiry), ``...:queue`` (job ID -> ticket),
``...:seen`` (job ID -> waiter expiry), ``...:who`` (job ID -> user), ``...:ticket``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal, NamedTuple

import structlog
from pydantic import BaseModel, Field
from temporalio import activity

from keel.activities.limits import CONFIG_MAX_AGE_SECONDS, DegradeOpen, RuntimeConfig
from keel.activities.redis_client import KeelRedis
from keel.activities.types import SlotGrant, SlotRelease, SlotRequest

__all__ = [
    "CONCURRENCY_KEY",
    "ConcurrencyLimits",
    "JobSlotActivities",
    "JobSlots",
    "SlotVerdict",
    "concurrency_limits",
    "slots_for",
]

log = structlog.get_logger(__name__)

CONCURRENCY_KEY = "keel:config:concurrency"
"""Redis hash: ``per_tenant``, ``per_user`` (running jobs; 0: none) and ``policy`` (``wait`` or
``refuse``) for every tenant, and ``per_tenant:{tenant}``, ``per_user:{tenant}``,
``policy:{tenant}`` for one."""
RESERVATION_SECONDS = 60.0
"""How long a slot the API reserved at submit stays held until the job's workflow takes it."""
WAITER_TTL_SECONDS = 30.0
"""A queued job that has not asked for this long has left the line."""
POLL_SECONDS = 0.5
"""How often a queued job asks again."""

Policy = Literal["wait", "refuse"]

# KEYS[1]: the tenant's running set, declared so that a Redis Cluster client sends the script to
# the node of the tenant's hash slot. The other keys are built from ARGV[1], the tenant's
# prefix, because the script reaches the user keys of the waiters it walks; every one carries
# the tenant's hash tag, so they are all in KEYS[1]'s slot, which Redis Cluster requires of
# keys a script does not declare (issue 16). ARGV: prefix, job ID,
# user, tenant limit, user limit (0: none), lease (ms), waiter TTL (ms), '1' to take a place in
# line. Returns {1 granted | 0, the full limit ('tenant', 'user' or ''), jobs ahead}.
_ACQUIRE_SLOT = """
local P, job, user = ARGV[1], ARGV[2], ARGV[3]
local tlimit, ulimit = tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, seen_ttl, enqueue = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local running, queue, seen, who = P..':running', P..':queue', P..':seen', P..':who'
local function ukey(u) return P..':user:'..u end
local function hold()
  local expiry = now + lease
  for _, key in ipairs({running, ukey(user)}) do
    local old = tonumber(redis.call('ZSCORE', key, job) or '0')
    redis.call('ZADD', key, math.max(old, expiry), job)
    if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
  end
  redis.call('ZREM', queue, job)
  redis.call('ZREM', seen, job)
  redis.call('HDEL', who, job)
end
redis.call('ZREMRANGEBYSCORE', running, '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', now)) do
  redis.call('ZREM', queue, gone)
  redis.call('HDEL', who, gone)
end
redis.call('ZREMRANGEBYSCORE', seen, '-inf', now)
if redis.call('ZSCORE', running, job) then
  hold()
  return {1, '', 0}
end
if enqueue then
  if not redis.call('ZSCORE', queue, job) then
    redis.call('ZADD', queue, redis.call('INCR', P..':ticket'), job)
    redis.call('HSET', who, job, user)
  end
  redis.call('ZADD', seen, now + seen_ttl, job)
  for _, key in ipairs({queue, seen, who, P..':ticket'}) do
    redis.call('PEXPIRE', key, seen_ttl * 4)
  end
end
local tfree = math.huge
if tlimit > 0 then tfree = tlimit - redis.call('ZCARD', running) end
local ufree = {}
local function user_free(u)
  if ufree[u] == nil then
    ufree[u] = math.huge
    if ulimit > 0 then
      redis.call('ZREMRANGEBYSCORE', ukey(u), '-inf', now)
      ufree[u] = ulimit - redis.call('ZCARD', ukey(u))
    end
  end
  return ufree[u]
end
local ahead = 0
if tfree > 0 then
  -- Walk the line: every earlier waiter that could run now keeps its place before this job.
  for _, other in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
    if other == job or tfree <= 0 then break end
    local u = redis.call('HGET', who, other) or ''
    if user_free(u) > 0 then
      tfree = tfree - 1
      ufree[u] = ufree[u] - 1
    end
    ahead = ahead + 1
  end
end
if tfree <= 0 then
  local rank = redis.call('ZRANK', queue, job)
  if rank then ahead = rank else ahead = redis.call('ZCARD', queue) end
  return {0, 'tenant', ahead}
end
if user_free(user) <= 0 then return {0, 'user', ahead} end
hold()
return {1, '', ahead}
"""

# KEYS[1]: the tenant's running set (for routing, as above). ARGV: prefix, job ID, user. Leaves
# every set of the tenant (idempotent).
_RELEASE_SLOT = """
local P, job = ARGV[1], ARGV[2]
redis.call('ZREM', P..':running', job)
redis.call('ZREM', P..':user:'..ARGV[3], job)
redis.call('ZREM', P..':queue', job)
redis.call('ZREM', P..':seen', job)
redis.call('HDEL', P..':who', job)
return 1
"""


class ConcurrencyLimits(BaseModel):
    """A tenant's running-job limits (0: none) and what happens to a job over them."""

    per_tenant: int = Field(default=0, ge=0)
    per_user: int = Field(default=0, ge=0)
    policy: Policy = "wait"

    @property
    def limited(self) -> bool:
        """Whether any limit applies (a job then holds a slot while it runs)."""
        return self.per_tenant > 0 or self.per_user > 0


def concurrency_limits(config: Mapping[str, str], tenant: str) -> ConcurrencyLimits:
    """The limits in force for ``tenant``: its own settings, else everyone's, else none.

    Args:
        config: The fields of ``CONCURRENCY_KEY``.
        tenant: The tenant.

    Returns:
        The tenant's limits; an unreadable value counts as absent (and is logged).
    """
    values: dict[str, object] = {}
    for name in ("per_tenant", "per_user", "policy"):
        value = config.get(f"{name}:{tenant}", config.get(name))
        if value is not None:
            values[name] = value
    try:
        return ConcurrencyLimits.model_validate(values)
    except ValueError:
        log.warning("slots.bad_config", tenant=tenant)
        return ConcurrencyLimits()


class SlotVerdict(NamedTuple):
    """One answer of the slot script."""

    granted: bool
    blocked_by: Literal["tenant", "user"] | None = None
    limit: int = 0
    ahead: int = 0
    degraded: bool = False


def _prefix(tenant: str) -> str:
    if not tenant or any(c in tenant for c in ":{}"):
        raise ValueError(f"invalid tenant {tenant!r}")
    return f"keel:slots:{{{tenant}}}"


def _routing_keys(prefix: str) -> list[str]:
    """The key the slot scripts declare: the tenant's running set (see ``_ACQUIRE_SLOT``)."""
    return [f"{prefix}:running"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobSlots:
    """Running-job slots per tenant and user, in Redis."""

    def __init__(
        self,
        redis: KeelRedis | None,
        *,
        poll_seconds: float = POLL_SECONDS,
        config_max_age: float = CONFIG_MAX_AGE_SECONDS,
    ) -> None:
        """Bind the slots to a Redis client (None: every job runs at once, unlimited)."""
        self.redis = redis
        self._poll = poll_seconds
        self._degrade = DegradeOpen("job slots")
        if redis is not None:
            self._config = RuntimeConfig(redis, CONCURRENCY_KEY, config_max_age)
            self._acquire = redis.register_script(_ACQUIRE_SLOT)
            self._release = redis.register_script(_RELEASE_SLOT)

    async def limits(self, tenant: str) -> ConcurrencyLimits:
        """The limits in force for ``tenant`` (none when Redis cannot be read)."""
        if self.redis is None:
            return ConcurrencyLimits()
        empty: dict[str, str] = {}
        config = await self._degrade.run(self._config.values, empty)
        return concurrency_limits(config, tenant)

    async def try_acquire(
        self, job_id: str, tenant: str, user: str, lease_seconds: float, *, enqueue: bool
    ) -> SlotVerdict:
        """Take the job's slot if one is free and no one is ahead of it in line.

        Args:
            job_id: The job (its ID names the lease).
            tenant: The job's tenant.
            user: The job's user.
            lease_seconds: How long the slot is held unless given back.
            enqueue: Take a place in line (or keep it) when no slot is free.

        Returns:
            The verdict; granted without a check when Redis is down.
        """
        if self.redis is None:
            return SlotVerdict(granted=True)
        limits = await self.limits(tenant)
        args: list[str | int] = [
            _prefix(tenant),
            job_id,
            user,
            limits.per_tenant,
            limits.per_user,
            math.ceil(lease_seconds * 1000),
            math.ceil(WAITER_TTL_SECONDS * 1000),
            "1" if enqueue else "0",
        ]
        keys = _routing_keys(_prefix(tenant))
        reply = await self._degrade.run(lambda: self._acquire(keys=keys, args=args), None)
        if reply is None:
            return SlotVerdict(granted=True, degraded=True)
        granted, blocked, ahead = int(reply[0]), _text(reply[1]), int(reply[2])
        if granted:
            return SlotVerdict(granted=True, ahead=ahead)
        by: Literal["tenant", "user"] = "tenant" if blocked == "tenant" else "user"
        limit = limits.per_tenant if by == "tenant" else limits.per_user
        return SlotVerdict(granted=False, blocked_by=by, limit=limit, ahead=ahead)

    async def wait(
        self, job_id: str, tenant: str, user: str, lease_seconds: float, until: datetime
    ) -> SlotVerdict:
        """Wait in line for the job's slot until ``until``, heartbeating when in an activity.

        Returns:
            The last verdict: granted, or not when ``until`` passed first.
        """
        while True:
            verdict = await self.try_acquire(job_id, tenant, user, lease_seconds, enqueue=True)
            if verdict.granted:
                return verdict
            left = (until - datetime.now(UTC)).total_seconds()
            if left <= 0:
                return verdict
            if activity.in_activity():
                activity.heartbeat(f"{verdict.ahead} ahead")
            await asyncio.sleep(min(self._poll, left))

    async def release(self, job_id: str, tenant: str, user: str) -> None:
        """Give the job's slot back, or leave the line (idempotent; a no-op when Redis is down)."""
        if self.redis is not None:
            args: list[str | int] = [_prefix(tenant), job_id, user]
            keys = _routing_keys(_prefix(tenant))
            await self._degrade.run(lambda: self._release(keys=keys, args=args), None)

    async def reserve_for_submit(self, job_id: str, tenant: str, user: str) -> SlotVerdict | None:
        """Under the ``refuse`` policy, reserve a slot for a job being submitted.

        The reservation is the job's own slot, held ``RESERVATION_SECONDS`` until its
        workflow takes it for the job's whole life, so concurrent submits are admitted
        exactly up to the limit. The job does not jump the line of jobs already waiting.

        Returns:
            None under the ``wait`` policy (the job will queue if it must), else the verdict.
        """
        if (await self.limits(tenant)).policy != "refuse":
            return None
        return await self.try_acquire(job_id, tenant, user, RESERVATION_SECONDS, enqueue=False)

    async def counts(self, tenant: str) -> tuple[int, int]:
        """The tenant's running (slot-holding) and queued jobs.

        Raises:
            RedisError: When Redis cannot be read (this is for operators, not for calls).
        """
        if self.redis is None:
            return 0, 0
        prefix = _prefix(tenant)
        now_ms = int(time.time() * 1000)
        running = await self.redis.zcount(f"{prefix}:running", now_ms, "+inf")
        queued = await self.redis.zcount(f"{prefix}:seen", now_ms, "+inf")
        return int(running), int(queued)


_BY_CLIENT: weakref.WeakKeyDictionary[KeelRedis, JobSlots] = weakref.WeakKeyDictionary()


def slots_for(redis: KeelRedis) -> JobSlots:
    """One ``JobSlots`` per Redis client, so its configuration copy is shared across requests."""
    slots = _BY_CLIENT.get(redis)
    if slots is None:
        slots = _BY_CLIENT[redis] = JobSlots(redis)
    return slots


class JobSlotActivities:
    """The job-slot activities, bound to the worker's ``JobSlots``."""

    def __init__(self, slots: JobSlots | None) -> None:
        self._slots = slots or JobSlots(None)

    @activity.defn(name="acquire_job_slot")
    async def acquire_job_slot(self, req: SlotRequest) -> SlotGrant:
        """Take the calling job's slot; with ``wait_until``, wait in line for it.

        Safe to repeat: the job's slot is named by its ID, so a retry renews the same one.

        Args:
            req: The job's tenant and user, the lease, and how long to wait.

        Returns:
            Whether the slot is the job's, and if not, which limit is full and its place.
        """
        job_id = activity.info().workflow_id or ""
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=req.tenant):
            slots, lease = self._slots, req.lease_seconds
            if req.wait_until is None:
                verdict = await slots.try_acquire(job_id, req.tenant, req.user, lease, enqueue=True)
            else:
                try:
                    verdict = await slots.wait(job_id, req.tenant, req.user, lease, req.wait_until)
                except asyncio.CancelledError:
                    # The job was cancelled (or this attempt timed out) while it waited: leave
                    # the line now rather than after WAITER_TTL_SECONDS.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(slots.release(job_id, req.tenant, req.user))
                    raise
            log.info(
                "slots.acquire",
                granted=verdict.granted,
                blocked_by=verdict.blocked_by,
                ahead=verdict.ahead,
                degraded=verdict.degraded,
            )
            return SlotGrant(**verdict._asdict())

    @activity.defn(name="release_job_slot")
    async def release_job_slot(self, req: SlotRelease) -> None:
        """Give the calling job's slot back, or take it out of the line (idempotent)."""
        job_id = activity.info().workflow_id or ""
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=req.tenant):
            await self._slots.release(job_id, req.tenant, req.user)
            log.info("slots.released")
