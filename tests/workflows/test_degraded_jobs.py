"""Jobs behind open circuit breakers (issue 16): fallbacks serve, jobs say they were degraded.

Real Temporal, Redis and the simulator. The dead model endpoint is a real HTTP server on
loopback that answers every request with 503 and counts them, so the test sees how many
requests reached it after its breaker opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.activities.breakers import Breakers, BreakerSettings
from keel.activities.llm import LLMConfig, endpoint_name
from keel.client.jobs import AgentJobs
from keel.workflows.types import Budget, JobRequest
from tests.conftest import unique
from tests.workflows.test_sessions import PINNED

TIERED = LLMConfig(
    tier_models={"router": "sim-small", "fast": "sim-small", "deep": "sim-large"},
    job_header=True,
)
"""Roles follow their tier (no model pinned per role), so a tier's model is its own."""
BREAKERS = BreakerSettings(
    window_seconds=30, min_calls=4, failure_rate=0.5, open_seconds=60, trial_calls=3
)


class DeadEndpoint:
    """An HTTP server that fails every request with 503 (Retry-After: 0) and counts them."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            await reader.readexactly(length)
            self.requests += 1
            body = b'{"error": {"message": "down", "type": "server_error"}}'
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 0\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def dead() -> AsyncIterator[DeadEndpoint]:
    endpoint = DeadEndpoint()
    endpoint.server = await asyncio.start_server(endpoint._serve, "127.0.0.1", 0)
    yield endpoint
    endpoint.server.close()
    await endpoint.server.wait_closed()


async def open_breaker(fleet: Breakers, redis: aioredis.Redis, name: str) -> None:
    """Open ``name`` as failing calls on another worker would: a clean window, then failures."""
    await redis.delete(*[k async for k in redis.scan_iter(f"keel:breaker:{{{name}}}*")], "x")
    for _ in range(BREAKERS.min_calls):
        await fleet.record(await fleet.admit(name), "fail")


async def test_a_dead_endpoint_trips_its_breaker_and_the_fallback_serves_every_job(
    client: Client, make_worker, dead: DeadEndpoint, sim_url: str
) -> None:
    tenant = unique("brk")
    async with make_worker(
        client, base_url=dead.url, llm_config=PINNED, breakers=BREAKERS, fallback_base_url=sim_url
    ) as w:
        jobs = AgentJobs(client, task_queue=w.task_queue, tenant=tenant)
        ids = [
            await jobs.start(
                JobRequest(goal=f"What is {n} + 5? use calculator", tenant=tenant),
                request_key=unique("j"),
            )
            for n in range(4)
        ]
        results = await asyncio.gather(*(jobs.result(i, timeout=90) for i in ids))
        reached = dead.requests
        # More jobs while the breaker is open: none of their calls reaches the dead endpoint.
        later = await jobs.start(JobRequest(goal="What is 1 + 1?", tenant=tenant))
        last = await jobs.result(later, timeout=60)
        status = await jobs.status(later)
    assert all(r.outcome == "completed" for r in [*results, last]), [r.error for r in results]
    # The breaker opened after min_calls failures (the four jobs' first calls, about at once);
    # a few attempts already in flight may follow, never the jobs' ten attempts each.
    assert BREAKERS.min_calls <= reached <= BREAKERS.min_calls + 4, reached
    assert dead.requests == reached
    for result in [*results, last]:
        assert result.degraded
        assert any(
            f"circuit open; served by sim-small at {endpoint_name(sim_url)}" in reason
            for reason in result.degraded_reasons
        ), result.degraded_reasons
    assert status.degraded == last.degraded_reasons
    desc = await client.get_workflow_handle(later).describe()
    attrs = {k.name: v for k, v in desc.typed_search_attributes}  # type: ignore[attr-defined]
    assert attrs["KeelDegraded"] is True


async def test_an_open_fast_tier_without_fallback_moves_calls_to_the_deep_tier(
    client: Client, make_worker, sim_url: str, redis_url: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    fleet = Breakers(redis, BREAKERS)
    # Another worker found the fast tier's model failing: its breaker is open fleet-wide.
    fast = f"llm:{endpoint_name(sim_url)}:sim-small"
    await open_breaker(fleet, redis, fast)
    tenant = unique("brk")
    try:
        async with make_worker(client, llm_config=TIERED, breakers=BREAKERS) as w:
            jobs = AgentJobs(client, task_queue=w.task_queue, tenant=tenant)
            job = await jobs.start(
                JobRequest(goal="What is 2 + 2?", tenant=tenant, tier="fast", budget=Budget())
            )
            result = await jobs.result(job, timeout=90)
    finally:
        await redis.delete(f"keel:breaker:{{{fast}}}")
        await fleet.aclose()
    assert result.outcome == "completed"
    assert result.degraded and any(
        "fast tier" in r and "served by the deep tier" in r for r in result.degraded_reasons
    ), result.degraded_reasons
    assert set(result.usage.by_tier) <= {"deep"}, result.usage.by_tier


async def test_an_open_tool_breaker_fails_the_step_fast_and_the_job_goes_on(
    client: Client, make_worker, redis_url: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    fleet = Breakers(redis, BREAKERS)
    name = "tool:calculator"
    await open_breaker(fleet, redis, name)
    tenant = unique("brk")
    try:
        async with make_worker(client, llm_config=PINNED, breakers=BREAKERS) as w:
            jobs = AgentJobs(client, task_queue=w.task_queue, tenant=tenant)
            job = await jobs.start(JobRequest(goal="What is 6 * 7? use calculator", tenant=tenant))
            result = await jobs.result(job, timeout=90)
    finally:
        await redis.delete(f"keel:breaker:{{{name}}}")
        await fleet.aclose()
    assert result.outcome in ("completed", "budget_exhausted"), result.error
    assert result.degraded
    assert "tool calculator: circuit open; proceeded without it" in result.degraded_reasons
    assert result.usage.tool_calls >= 1
