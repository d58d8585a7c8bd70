"""The usage ledger: a call is charged once however often it is retried, a job is counted once
however often its submit is retried, and quotas refuse the first job past them."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from keel.activities.usage import QuotaExceeded, UsageLedger
from tests.conftest import unique


async def test_a_call_is_charged_once_per_call_id(redis_client: aioredis.Redis) -> None:
    ledger, tenant = UsageLedger(redis_client), unique("acme")
    charged = await asyncio.gather(
        *(ledger.charge_call(tenant, "run-1:7", 0.25, 100) for _ in range(10))
    )
    assert charged.count(True) == 1  # ten concurrent retries of one call: one charge
    assert await ledger.charge_call(tenant, "run-1:8", -1.0, -5)  # clamped at zero
    (today, yesterday) = await ledger.days(tenant, 2)
    assert (today.cost_usd, today.tokens, today.calls) == (0.25, 100, 2)
    assert yesterday.calls == 0 and yesterday.day < today.day


async def test_quotas_refuse_the_first_job_past_them(redis_client: aioredis.Redis) -> None:
    ledger, tenant = UsageLedger(redis_client), unique("acme")
    await ledger.admit_job(tenant, "job-1", jobs_per_day=2)
    await ledger.admit_job(tenant, "job-1", jobs_per_day=2)  # a retried submit: counted once
    await ledger.admit_job(tenant, "job-2", jobs_per_day=2)
    with pytest.raises(QuotaExceeded) as refused:
        await ledger.admit_job(tenant, "job-3", jobs_per_day=2)
    assert refused.value.args == ("jobs_per_day", 2)
    await ledger.admit_job(tenant, "job-2", jobs_per_day=2)  # an admitted job stays admitted
    assert (await ledger.days(tenant, 1))[0].jobs == 2

    spender = unique("spender")
    await ledger.charge_call(spender, "r:1", 1.5, 10)
    with pytest.raises(QuotaExceeded) as broke:
        await ledger.admit_job(spender, "job-x", usd_per_day=1.0)
    assert broke.value.args == ("usd_per_day", 1.0)


async def test_concurrent_submits_never_pass_the_quota(redis_client: aioredis.Redis) -> None:
    ledger, tenant = UsageLedger(redis_client), unique("acme")

    async def submit(i: int) -> bool:
        try:
            await ledger.admit_job(tenant, f"job-{i}", jobs_per_day=5)
            return True
        except QuotaExceeded:
            return False

    admitted = await asyncio.gather(*(submit(i) for i in range(50)))
    assert admitted.count(True) == 5
