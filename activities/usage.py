"""Tenants' usage per UTC day in Redis: dollars and tokens per model call, jobs as admitted.

The API reads it for ``GET /v1/usage`` and checks daily quotas against it.

Not workflow code. Every write is idempotent and atomic (one Lua script each): a model call is
charged once per ``(run, activity)`` however often Temporal retries the activity, and a job is
counted once per job ID however often its submit is retried, so usage is exact across any
number of workers and API processes. Keys of one tenant and day share a hash slot.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from pydantic import BaseModel

from keel.activities.redis_client import KeelRedis

__all__ = ["DayUsage", "QuotaExceeded", "UsageLedger", "today"]

RETENTION = timedelta(days=40)
"""How long a day's usage is kept: a month of history for ``GET /v1/usage``."""

# KEYS: the day's hash, the day's set of charged call IDs. ARGV: call ID, usd, tokens, ttl (s).
_CHARGE_ONCE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'cost_usd', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'calls', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: the day's hash, the day's set of job IDs. ARGV: job ID, jobs quota (0: none), usd
# quota (0: none), ttl. Returns 1 admitted (or already admitted), -1 over the jobs quota, -2
# over the dollars quota.
_ADMIT_JOB = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 1 end
local jobs_quota = tonumber(ARGV[2])
if jobs_quota > 0 and redis.call('SCARD', KEYS[2]) >= jobs_quota then return -1 end
local usd_quota = tonumber(ARGV[3])
local spent = tonumber(redis.call('HGET', KEYS[1], 'cost_usd') or '0')
if usd_quota > 0 and spent >= usd_quota then return -2 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'jobs', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class DayUsage(BaseModel):
    """One tenant's usage on one UTC day."""

    day: date
    cost_usd: float = 0.0
    tokens: int = 0
    calls: int = 0
    jobs: int = 0


class QuotaExceeded(Exception):
    """A tenant's daily quota is used up; ``args``: (quota name, limit)."""


def _keys(tenant: str, day: date) -> tuple[str, str, str]:
    # The tenant is the keys' hash tag (one slot per tenant, which each script needs); a ':' or
    # a brace in it could make one tenant's keys another's, so it is refused.
    if not tenant or any(c in tenant for c in ":{}"):
        raise ValueError(f"invalid tenant {tenant!r}")
    base = f"keel:usage:{{{tenant}}}:{day.isoformat()}"
    return base, base + ":calls", base + ":jobs"


def today() -> date:
    """The UTC day usage is counted under."""
    return datetime.now(UTC).date()


class UsageLedger:
    """Charge model calls, admit jobs against quotas, and read a tenant's days."""

    def __init__(self, redis: KeelRedis) -> None:
        self._redis = redis
        self.redis = redis
        """The client (the API reads its quota configuration through it too)."""
        self._charge = redis.register_script(_CHARGE_ONCE)
        self._admit = redis.register_script(_ADMIT_JOB)

    async def charge_call(self, tenant: str, call_id: str, cost_usd: float, tokens: int) -> bool:
        """Add one completed call's cost to today's usage; False if it was charged already."""
        day, calls, _ = _keys(tenant, today())
        ttl = int(RETENTION.total_seconds())
        added = await self._charge(
            keys=[day, calls], args=[call_id, f"{max(cost_usd, 0.0):.10f}", max(tokens, 0), ttl]
        )
        return bool(added)

    async def admit_job(
        self, tenant: str, job_id: str, *, jobs_per_day: int = 0, usd_per_day: float = 0.0
    ) -> None:
        """Count a job against today's quotas (once per job ID); 0 means no quota.

        Raises:
            QuotaExceeded: With ``("jobs_per_day", n)`` or ``("usd_per_day", x)``.
        """
        day, _, jobs = _keys(tenant, today())
        ttl = int(RETENTION.total_seconds())
        verdict = int(
            await self._admit(keys=[day, jobs], args=[job_id, jobs_per_day, usd_per_day, ttl])
        )
        if verdict == -1:
            raise QuotaExceeded("jobs_per_day", jobs_per_day)
        if verdict == -2:
            raise QuotaExceeded("usd_per_day", usd_per_day)

    async def days(self, tenant: str, count: int = 7) -> list[DayUsage]:
        """The tenant's last ``count`` UTC days, today first (none used for a non-tenant)."""
        first = today()
        found = []
        for back in range(count):
            day = first - timedelta(days=back)
            try:
                key = _keys(tenant, day)[0]
            except ValueError:
                # Not a tenant (an operator's typo): nothing can have been charged to it.
                found.append(DayUsage(day=day))
                continue
            raw = await self._redis.hgetall(key)
            fields = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode() if isinstance(v, bytes) else v
                )
                for k, v in raw.items()
            }
            found.append(
                DayUsage(
                    day=day,
                    cost_usd=round(float(fields.get("cost_usd", 0)), 8),
                    tokens=int(fields.get("tokens", 0)),
                    calls=int(fields.get("calls", 0)),
                    jobs=int(fields.get("jobs", 0)),
                )
            )
        return found
