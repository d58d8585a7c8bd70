"""Circuit breakers shared by the fleet in Redis (issue 16), on a real Redis server.

Two ``Breakers`` on one Redis stand for two workers; a clock the test moves stands for time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from temporalio.exceptions import ApplicationError

from keel.activities import errors
from keel.activities.breakers import (
    Breakers,
    BreakerSettings,
    CircuitOpen,
    breaker_key,
    outcome_of,
)
from tests.conftest import free_port, unique

SETTINGS = BreakerSettings(
    window_seconds=30, min_calls=4, failure_rate=0.5, open_seconds=10, trial_calls=3
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fleet(redis_url: str) -> AsyncIterator[tuple[Breakers, Breakers, Clock]]:
    clock = Clock()
    a = Breakers(aioredis.Redis.from_url(redis_url, decode_responses=True), SETTINGS, clock=clock)
    b = Breakers(aioredis.Redis.from_url(redis_url, decode_responses=True), SETTINGS, clock=clock)
    yield a, b, clock
    await a.aclose()
    await b.aclose()


async def fail(breakers: Breakers, name: str, n: int) -> None:
    for _ in range(n):
        await breakers.record(await breakers.admit(name), "fail")


async def half_open(breakers: Breakers, clock: Clock) -> str:
    """A new breaker, opened by four failures and left until its open period (10 s) is over."""
    name = unique("llm:sim")
    await fail(breakers, name, 4)
    clock.now += 10.5
    return name


async def test_failures_open_the_breaker_for_every_worker_and_a_new_one(
    fleet: tuple[Breakers, Breakers, Clock], redis_url: str
) -> None:
    a, b, clock = fleet
    name = unique("llm:sim")
    await a.record(await a.admit(name), "ok")
    await fail(a, name, 2)
    await b.admit(name)  # 1 ok, 2 fails: under min_calls, still closed
    await fail(b, name, 1)  # 4 calls, 3 failed (75% >= 50%): open
    # ``a`` read the breaker closed an instant ago and trusts that for ``sync_seconds``; ``b``
    # saw it open. Within the interval every worker sees it open.
    assert not (await a.admit(name)).local
    clock.now += SETTINGS.sync_seconds
    for worker in (a, b):
        with pytest.raises(CircuitOpen) as refused:
            await worker.admit(name)
        assert refused.value.name == name and 9 < refused.value.retry_in <= 10
    # A worker that starts now reads the fleet's state; it does not reset it.
    fresh = Breakers(
        aioredis.Redis.from_url(redis_url, decode_responses=True), SETTINGS, clock=clock
    )
    with pytest.raises(CircuitOpen):
        await fresh.admit(name)
    await fresh.aclose()
    assert (await a.states())[name]["state"] == "open"


async def window_calls(redis_client: aioredis.Redis, name: str) -> dict[str, int]:
    counts = await redis_client.hgetall(f"{breaker_key(name)}:window")
    totals = {"ok": 0, "fail": 0}
    for field, n in counts.items():
        totals[str(field).split(":")[0]] += int(n)
    return totals


async def test_successes_go_in_batches_and_a_failure_carries_the_batch(
    fleet: tuple[Breakers, Breakers, Clock], redis_client: aioredis.Redis
) -> None:
    a, _, clock = fleet
    name = unique("llm:sim")
    for _ in range(5):
        await a.record(await a.admit(name), "ok")
    # The first success went at once; the next four wait for the interval to end.
    assert await window_calls(redis_client, name) == {"ok": 1, "fail": 0}
    await fail(a, name, 4)  # the first failure brings the four with it: 9 calls, 4 failed
    assert await window_calls(redis_client, name) == {"ok": 5, "fail": 4}
    assert not (await a.admit(name)).local  # 44% < 50%: closed (lost successes would open it)
    clock.now += SETTINGS.sync_seconds
    await a.record(await a.admit(name), "ok")
    await a.record(await a.admit(name), "ok")  # within the interval again: held
    assert await window_calls(redis_client, name) == {"ok": 6, "fail": 4}


async def test_old_failures_leave_the_window(fleet: tuple[Breakers, Breakers, Clock]) -> None:
    a, _, clock = fleet
    name = unique("llm:sim")
    await fail(a, name, 3)
    clock.now += 40  # past the 30 s window: those failures no longer count
    await a.record(await a.admit(name), "ok")
    await a.record(await a.admit(name), "ok")
    await fail(a, name, 1)
    await a.admit(name)  # 3 calls in the window, 1 failed: closed


async def test_half_open_lets_three_trials_through_fleet_wide_and_one_success_closes(
    fleet: tuple[Breakers, Breakers, Clock],
) -> None:
    a, b, clock = fleet
    name = await half_open(a, clock)
    trials = [await a.admit(name), await b.admit(name), await a.admit(name)]
    assert all(t.trial for t in trials)
    for worker in (a, b):
        with pytest.raises(CircuitOpen):  # a fourth trial, on any worker, waits
            await worker.admit(name)
    await b.record(trials[1], "ok")  # the endpoint is back
    assert (await a.admit(name)).trial is None and (await b.admit(name)).trial is None
    assert (await a.states())[name]["state"] == "closed"


async def test_a_failed_trial_opens_it_again_and_a_dead_trial_gives_its_lease_back(
    fleet: tuple[Breakers, Breakers, Clock],
) -> None:
    a, b, clock = fleet
    name = await half_open(a, clock)
    trial = await a.admit(name)
    await a.record(trial, "fail")
    with pytest.raises(CircuitOpen) as refused:
        await b.admit(name)
    assert refused.value.retry_in > 9  # open for a full period again
    clock.now += 10.5
    held = [await a.admit(name) for _ in range(3)]  # three trials whose workers then die
    with pytest.raises(CircuitOpen):
        await b.admit(name)
    clock.now += SETTINGS.trial_lease_seconds + 1  # their leases end on their own
    assert (await b.admit(name)).trial is not None
    assert all(h.trial for h in held)


async def test_refusals_of_keels_own_never_count_against_the_provider(
    fleet: tuple[Breakers, Breakers, Clock],
) -> None:
    a, _, _ = fleet
    name = unique("llm:sim")
    refusals = [
        ApplicationError("over budget", type=errors.BUDGET_EXHAUSTED, non_retryable=True),
        ApplicationError("bad request", type=errors.LLM_REJECTED, non_retryable=True),
        ApplicationError("no such tool", type=errors.TOOL_NOT_ALLOWED, non_retryable=True),
        ApplicationError("wait too long", type=errors.LIMIT_WAIT_EXCEEDED),
    ]
    for _ in range(5):
        for refusal in refusals:
            await a.record(await a.admit(name), outcome_of(refusal))
    await a.admit(name)  # twenty refusals later, still closed
    assert outcome_of(ApplicationError("503", type=errors.LLM_TRANSIENT)) == "fail"
    assert outcome_of(ApplicationError("429", type=errors.LLM_RATE_LIMITED)) == "fail"
    assert outcome_of(ApplicationError("timeout", type=errors.TOOL_TRANSIENT)) == "fail"
    assert outcome_of(None) == "ok"


async def test_without_redis_each_worker_keeps_its_own_breaker_and_never_waits() -> None:
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0",
        decode_responses=True,
        socket_connect_timeout=0.25,
        socket_timeout=0.25,
    )
    clock = Clock()
    local = Breakers(dead, SETTINGS, clock=clock)
    name = unique("llm:sim")
    started = time.perf_counter()
    admission = await local.admit(name)  # Redis refused: decided locally, at once
    assert admission.local
    await local.record(admission, "fail")
    await fail(local, name, 3)
    with pytest.raises(CircuitOpen):
        await local.admit(name)
    clock.now += 10.5
    trial = await local.admit(name)
    assert trial.trial is not None and trial.local
    await local.record(trial, "ok")
    assert (await local.admit(name)).trial is None
    assert time.perf_counter() - started < 2.0  # one failed connect, then none for 5 s
    await local.aclose()


async def test_keys_carry_the_breaker_name_as_their_cluster_hash_tag(
    fleet: tuple[Breakers, Breakers, Clock], redis_client: aioredis.Redis
) -> None:
    a, _, _ = fleet
    name = unique("tool:http_get:example.com:443")
    await fail(a, name, 4)
    keys = {str(k) for k in await redis_client.keys(f"{breaker_key(name)}*")}
    assert keys and all(f"{{{name}}}" in k for k in keys)
    assert all([await redis_client.ttl(k) > 0 for k in keys])  # nothing lives forever
