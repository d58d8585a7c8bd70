"""Running-job slots against a real Redis: exact under concurrent acquires, first in first
out, a user's limit holding back only that user, leases that expire, run-time config, and
Redis down granting the slot instead of failing the job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from keel.activities.slots import (
    CONCURRENCY_KEY,
    ConcurrencyLimits,
    JobSlots,
    concurrency_limits,
)
from tests.conftest import free_port, unique

LEASE = 600.0


@pytest.fixture
async def tenant(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A fresh tenant; its configuration fields are removed after the test."""
    name = unique("acme")
    yield name
    for field in ("per_tenant", "per_user", "policy"):
        await redis_client.hdel(CONCURRENCY_KEY, f"{field}:{name}")


async def limit(redis: aioredis.Redis, tenant: str, per_tenant: int, per_user: int = 0) -> None:
    await redis.hset(CONCURRENCY_KEY, f"per_tenant:{tenant}", per_tenant)
    await redis.hset(CONCURRENCY_KEY, f"per_user:{tenant}", per_user)


def slots(redis: aioredis.Redis) -> JobSlots:
    return JobSlots(redis, poll_seconds=0.05, config_max_age=0)


def test_limits_read_a_tenants_own_setting_then_everyones() -> None:
    config = {"per_tenant": "4", "per_user": "2", "per_tenant:acme": "1", "policy:acme": "refuse"}
    assert concurrency_limits(config, "acme") == ConcurrencyLimits(
        per_tenant=1, per_user=2, policy="refuse"
    )
    assert concurrency_limits(config, "globex") == ConcurrencyLimits(per_tenant=4, per_user=2)
    assert concurrency_limits({"policy": "sometimes"}, "acme") == ConcurrencyLimits()


async def test_fifty_concurrent_jobs_get_exactly_the_tenants_limit(
    redis_client: aioredis.Redis, tenant: str
) -> None:
    await limit(redis_client, tenant, 5)
    job_slots = slots(redis_client)
    # Fifty at once, over as many connections of the pool: the script is the only arbiter.
    verdicts = await asyncio.gather(
        *(
            job_slots.try_acquire(f"job-{n}", tenant, f"u{n % 7}", LEASE, enqueue=False)
            for n in range(50)
        )
    )
    assert sum(v.granted for v in verdicts) == 5
    refused = next(v for v in verdicts if not v.granted)
    assert (refused.blocked_by, refused.limit) == ("tenant", 5)
    assert await job_slots.counts(tenant) == (5, 0)
    # Acquiring again is idempotent: a job that holds its slot keeps it, and takes no second.
    holder = next(f"job-{n}" for n, v in enumerate(verdicts) if v.granted)
    assert (await job_slots.try_acquire(holder, tenant, "u", LEASE, enqueue=True)).granted
    assert await job_slots.counts(tenant) == (5, 0)


async def test_queued_jobs_get_slots_first_in_first_out(
    redis_client: aioredis.Redis, tenant: str
) -> None:
    await limit(redis_client, tenant, 1)
    job_slots = slots(redis_client)
    assert (await job_slots.try_acquire("a", tenant, "u1", LEASE, enqueue=True)).granted
    for ahead, job in enumerate(["b", "c", "d"]):
        verdict = await job_slots.try_acquire(job, tenant, f"u-{job}", LEASE, enqueue=True)
        assert not verdict.granted and verdict.ahead == ahead
    until = datetime.now(UTC) + timedelta(seconds=20)
    order: list[str] = []

    async def wait(job: str) -> None:
        assert (await job_slots.wait(job, tenant, f"u-{job}", LEASE, until)).granted
        order.append(job)

    # Started in reverse: the line decides, not who asks first.
    waiters = [asyncio.create_task(wait(job)) for job in ["d", "c", "b"]]
    await asyncio.sleep(0.3)
    assert order == []
    # A newcomer does not jump the line, even at the moment a slot frees.
    await job_slots.release("a", tenant, "u1")
    assert not (await job_slots.try_acquire("e", tenant, "u-e", LEASE, enqueue=False)).granted
    for holder in ["b", "c", "d"]:
        while holder not in order:
            await asyncio.sleep(0.02)
        assert order[-1] == holder
        await job_slots.release(holder, tenant, f"u-{holder}")
    await asyncio.gather(*waiters)
    assert order == ["b", "c", "d"]
    assert await job_slots.counts(tenant) == (0, 0)


async def test_a_users_limit_holds_back_only_that_user(
    redis_client: aioredis.Redis, tenant: str
) -> None:
    await limit(redis_client, tenant, 3, per_user=1)
    job_slots = slots(redis_client)
    assert (await job_slots.try_acquire("alice-1", tenant, "alice", LEASE, enqueue=True)).granted
    second = await job_slots.try_acquire("alice-2", tenant, "alice", LEASE, enqueue=True)
    assert not second.granted and (second.blocked_by, second.limit) == ("user", 1)
    # Bob is behind alice-2 in line, but alice-2 waits on alice's limit, not the tenant's.
    assert (await job_slots.try_acquire("bob-1", tenant, "bob", LEASE, enqueue=True)).granted
    await job_slots.release("alice-1", tenant, "alice")
    assert (await job_slots.try_acquire("alice-2", tenant, "alice", LEASE, enqueue=True)).granted


async def test_a_slot_never_given_back_frees_when_its_lease_ends(
    redis_client: aioredis.Redis, tenant: str
) -> None:
    await limit(redis_client, tenant, 1)
    job_slots = slots(redis_client)
    assert (await job_slots.try_acquire("gone", tenant, "u", 0.4, enqueue=False)).granted
    assert not (await job_slots.try_acquire("next", tenant, "u", LEASE, enqueue=False)).granted
    await asyncio.sleep(0.5)
    assert (await job_slots.try_acquire("next", tenant, "u", LEASE, enqueue=False)).granted


async def test_a_submit_reservation_applies_only_under_refuse(
    redis_client: aioredis.Redis, tenant: str
) -> None:
    await limit(redis_client, tenant, 1)
    job_slots = slots(redis_client)
    assert await job_slots.reserve_for_submit("j1", tenant, "u") is None  # policy wait
    await redis_client.hset(CONCURRENCY_KEY, f"policy:{tenant}", "refuse")
    first = await job_slots.reserve_for_submit("j1", tenant, "u")
    assert first is not None and first.granted
    again = await job_slots.reserve_for_submit("j1", tenant, "u")  # a retried submit
    assert again is not None and again.granted
    other = await job_slots.reserve_for_submit("j2", tenant, "u")
    assert other is not None and not other.granted and other.blocked_by == "tenant"


async def test_redis_down_grants_the_slot() -> None:
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    job_slots = JobSlots(dead)
    verdict = await job_slots.try_acquire("j", "acme", "u", LEASE, enqueue=True)
    assert verdict.granted and verdict.degraded
    await job_slots.release("j", "acme", "u")  # a no-op, not an error
    await dead.aclose()
