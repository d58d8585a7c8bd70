"""The gateways' fleet-wide limits against a real Redis: in-flight leases exact across OS
processes, a SIGKILLed holder's lease freed by its expiry, per-minute rates that make a model
call wait (heartbeating, no retry), run-time changes, and Redis down degrading open."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import openai
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from keel.activities import errors
from keel.activities.gateway_limits import GatewayLimits, estimate_tokens
from keel.activities.limits import INFLIGHT_KEY, RATES_KEY, LeaseSemaphore, ModelRates
from keel.activities.llm import LLMActivities, LLMConfig
from keel.activities.types import CHARS_PER_TOKEN, PlanInput
from tests.conftest import free_port, unique


@pytest.fixture
async def config(redis_client: aioredis.Redis) -> AsyncIterator[list[tuple[str, str]]]:
    """Fields a test sets in the shared configuration hashes, removed after it."""
    fields: list[tuple[str, str]] = []
    yield fields
    for key, field in fields:
        await redis_client.hdel(key, field)


async def set_limit(
    redis: aioredis.Redis, fields: list[tuple[str, str]], key: str, field: str, value: int
) -> None:
    await redis.hset(key, field, value)
    fields.append((key, field))


_GRAB = textwrap.dedent(
    """
    import asyncio, sys, time
    import redis.asyncio as aioredis
    from keel.activities.limits import LeaseSemaphore

    async def main(url, key, limit, start):
        redis = aioredis.Redis.from_url(url)
        leases = LeaseSemaphore(redis, ttl_seconds=60)
        await asyncio.sleep(max(0.0, start - time.time()))
        got = await asyncio.gather(
            *(leases.try_acquire(key, f"{sys.argv[5]}-{i}", limit) for i in range(10))
        )
        print(sum(got))
        await redis.aclose()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    """
)


async def test_six_processes_grabbing_sixty_leases_get_exactly_the_limit(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    key = f"keel:gw:{{tool:{unique('grab')}}}:inflight"
    start = time.time() + 1.5  # every process asks at once, after they have all started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GRAB, redis_url, key, "7", str(start), f"p{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    admitted = [int(proc.communicate(timeout=30)[0]) for proc in procs]
    assert sum(admitted) == 7, admitted
    assert await LeaseSemaphore(redis_client).holders(key) == 7


_HOLD = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from keel.activities.gateway_limits import GatewayLimits

    async def main(url, tool):
        limits = GatewayLimits(aioredis.Redis.from_url(url), lease_ttl_seconds=2.0)
        async with limits.tool(tool):
            print("held", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_a_lease_held_by_a_killed_process_frees_by_its_expiry(
    redis_url: str, redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    tool = unique("tool")
    await set_limit(redis_client, config, INFLIGHT_KEY, f"tool:{tool}", 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, redis_url, tool], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        leases = LeaseSemaphore(redis_client, ttl_seconds=60)
        key = f"keel:gw:{{tool:{tool}}}:inflight"
        # Longer than the 2 s TTL: the holder's renewals keep its lease while it runs.
        for _ in range(6):
            assert not await leases.try_acquire(key, "other", 1)
            await asyncio.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not await leases.try_acquire(key, "other", 1):
            assert time.monotonic() - killed < 30, "the dead holder's lease never expired"
            await asyncio.sleep(0.1)
        freed_after = time.monotonic() - killed
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert freed_after <= 2.5  # the TTL, not a timeout of anything else


async def test_an_inflight_limit_holds_concurrent_calls_to_it(
    redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    tool = unique("tool")
    await set_limit(redis_client, config, INFLIGHT_KEY, f"tool:{tool}", 2)
    limits = GatewayLimits(redis_client)
    running, most = 0, 0

    async def call() -> float:
        nonlocal running, most
        async with limits.tool(tool) as ticket:
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.2)
            running -= 1
        return ticket.waited_seconds

    waits = await asyncio.gather(*(call() for _ in range(6)))
    assert most == 2
    assert sorted(waits)[-1] >= 0.35  # the last pair waited for two pairs before it
    leases = await LeaseSemaphore(redis_client).holders(f"keel:gw:{{tool:{tool}}}:inflight")
    assert leases == 0  # every lease was given back


async def test_a_limit_raised_at_run_time_admits_a_waiting_call(
    redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    tool = unique("tool")
    await set_limit(redis_client, config, INFLIGHT_KEY, f"tool:{tool}", 1)
    limits = GatewayLimits(redis_client)
    async with limits.tool(tool):
        waiting = asyncio.create_task(limits.tool(tool).__aenter__())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await redis_client.hset(INFLIGHT_KEY, f"tool:{tool}", 2)
        ticket = await asyncio.wait_for(waiting, timeout=3)  # within the 1 s config refresh
    assert 0.5 <= ticket.waited_seconds < 3


async def test_a_wait_past_the_limit_is_a_retryable_error(
    redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    tool = unique("tool")
    await set_limit(redis_client, config, INFLIGHT_KEY, f"tool:{tool}", 1)
    limits = GatewayLimits(redis_client, max_wait_seconds=0.3)
    async with limits.tool(tool):
        with pytest.raises(ApplicationError) as raised:
            async with limits.tool(tool):
                pass
    assert raised.value.type == errors.LIMIT_WAIT_EXCEEDED and not raised.value.non_retryable


@pytest.fixture
async def llm(sim_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim_url, api_key="sim-local-key", max_retries=0)
    yield client
    await client.close()


async def test_rpm_makes_a_model_call_wait_heartbeating_without_failing(
    llm: openai.AsyncOpenAI, redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    model = unique("sim")
    await set_limit(redis_client, config, RATES_KEY, f"{model}:rpm", 60)
    # Spend the minute's burst of 60 through the same limiter, so the next call waits 1 s.
    rates = ModelRates(redis_client)
    for _ in range(60):
        assert (await rates.reserve(f"model:{model}", 60, 0, 0, 60))[0]
    acts = LLMActivities(
        llm,
        LLMConfig(planner_model=model),
        lambda _: [],
        limits=GatewayLimits(redis_client),
    )
    inp = PlanInput(tenant="t", goal="Compute 2 + 2 with calculator", iteration=0)
    env = ActivityEnvironment()
    beats: list[object] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    started = time.monotonic()
    result = await env.run(acts.plan_step, inp)
    waited = time.monotonic() - started
    assert result.plan is not None  # the call went through, on its first and only attempt
    assert 0.9 <= waited < 5, waited
    assert beats  # the wait heartbeat, so Temporal never took it for a hung attempt


async def test_tokens_are_reserved_at_the_estimate_then_corrected_to_the_usage(
    redis_client: aioredis.Redis, config: list[tuple[str, str]]
) -> None:
    model = unique("sim")
    tpm = 60_000  # one token per millisecond, so a reservation's length in ms is its tokens
    await set_limit(redis_client, config, RATES_KEY, f"{model}:tpm", tpm)
    body = {"messages": [{"role": "user", "content": "x" * 3000}], "max_tokens": 4000}
    assert estimate_tokens(body) == 3000 // CHARS_PER_TOKEN + 4000
    limits = GatewayLimits(redis_client)
    key = f"keel:gw:{{model:{model}}}:tpm"

    class Usage:
        prompt_tokens, completion_tokens = 150, 50

    async with limits.model(model, body) as ticket:
        reserved_ms = await redis_client.pttl(key)
        ticket.settle(Usage())
    corrected_ms = await redis_client.pttl(key)
    assert 4500 <= reserved_ms <= 5002  # 5,000 tokens estimated
    assert 0 < corrected_ms <= 201  # 200 tokens used


async def test_redis_down_lets_calls_through_and_warns_once() -> None:
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1, socket_timeout=1
    )
    limits = GatewayLimits(dead)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    with capture_logs() as logs:
        started = time.monotonic()
        for _ in range(3):
            async with limits.model("sim-small", body), limits.tool("http_get"):
                pass
        elapsed = time.monotonic() - started
    warnings = [entry for entry in logs if entry["event"] == "limits.degraded_open"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert elapsed < 1  # after the first refusal, calls skip the store instead of retrying it
    await dead.aclose()
