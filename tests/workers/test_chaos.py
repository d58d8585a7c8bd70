"""Chaos, bounded for CI (issue 16): the model endpoint goes down while jobs run on two workers.

Real Temporal, Redis and two simulators: the primary endpoint (the suite's simulator, which
fails every request with 503 during an outage and counts them) and a fallback endpoint in its
own process. The workers share their breakers through Redis; the test watches the primary's
breaker there and counts what reached the dead endpoint after it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from keel.activities.breakers import BreakerSettings, breaker_key
from keel.activities.llm import endpoint_name
from keel.client.jobs import AgentJobs
from keel.workflows.types import JobRequest
from tests.conftest import keel_server, unique
from tests.workflows.test_sessions import PINNED

OUTAGE_SECONDS = 6.0
JOBS = 12
BREAKERS = BreakerSettings(
    window_seconds=30, min_calls=4, failure_rate=0.5, open_seconds=2, trial_calls=3
)


@pytest.fixture(scope="module")
def fallback_url() -> Iterator[str]:
    """A second simulator: the endpoint calls go to while the primary's breaker is open."""
    with keel_server("fallback simulator", "sim-llm") as root:
        yield f"{root}/v1"


async def sim(http: httpx.AsyncClient, base: str, path: str, body: dict | None = None) -> dict:
    root = base.removesuffix("/v1")
    response = await (http.post(root + path, json=body) if body else http.get(root + path))
    response.raise_for_status()
    return dict(response.json())


async def test_the_endpoint_down_mid_run_opens_breakers_fleet_wide_and_no_job_fails(
    client: Client, make_worker, sim_url: str, fallback_url: str, redis_url: str
) -> None:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    name = f"llm:{endpoint_name(sim_url)}:sim-small"
    stale = [k async for k in redis.scan_iter(f"{breaker_key(name)}*")]
    if stale:
        await redis.delete(*stale)
    queue, tenant = unique("tq-chaos"), unique("chaos")
    fleet = {"llm_config": PINNED, "breakers": BREAKERS, "fallback_base_url": fallback_url}
    # A second worker process would hold its own connection: so does this second worker.
    second = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=client.data_converter,
    )
    async with (
        httpx.AsyncClient(timeout=10) as http,
        make_worker(client, queue, **fleet),
        make_worker(second, queue, **fleet),
    ):
        before = (await sim(http, sim_url, "/_sim/stats"))["outage_requests"]
        jobs = AgentJobs(client, task_queue=queue, tenant=tenant)
        try:
            await sim(http, sim_url, "/_sim/outage", {"seconds": OUTAGE_SECONDS})
            down_at = time.monotonic()
            request = JobRequest(goal="What is 19 * 3? use calculator", tenant=tenant)
            ids = await asyncio.gather(
                *(jobs.start(request, request_key=unique("j")) for _ in range(JOBS))
            )
            # From the first request the dead endpoint answered (how soon the jobs reach it
            # depends on how busy the machine is) to the breaker's open state in Redis.
            first_failure: float | None = None
            while await redis.hget(breaker_key(name), "state") != "open":
                assert time.monotonic() - down_at < 10, "the breaker never opened"
                if first_failure is None:
                    stats = await sim(http, sim_url, "/_sim/stats")
                    if stats["outage_requests"] > before:
                        first_failure = time.monotonic()
                await asyncio.sleep(0.02)
            opened_after = time.monotonic() - (first_failure or down_at)
            at_open = (await sim(http, sim_url, "/_sim/stats"))["outage_requests"]
            results = await asyncio.gather(*(jobs.result(i, timeout=120) for i in ids))
            # Let the outage end and the breaker's open period pass: the next call is a trial
            # that finds the endpoint back, and closes the breaker for the fleet.
            await asyncio.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
            after_outage = (await sim(http, sim_url, "/_sim/stats"))["outage_requests"]
            await asyncio.sleep(BREAKERS.open_seconds + 0.5)
            recovered = await jobs.result(
                await jobs.start(JobRequest(goal="What is 2 + 3?", tenant=tenant)), timeout=60
            )
            state = await redis.hget(breaker_key(name), "state")
        finally:
            with contextlib.suppress(httpx.HTTPError):
                await sim(http, sim_url, "/_sim/outage", {"seconds": 0})
    histories = await asyncio.gather(*(client.get_workflow_handle(i).fetch_history() for i in ids))
    await redis.aclose()

    # The figures the README quotes (``pytest -s`` shows them).
    print(
        f"chaos: breaker open {opened_after:.2f} s after the first failure; requests to the dead "
        f"endpoint: {at_open - before} before it opened, {after_outage - at_open} after"
    )
    assert [r.outcome for r in results] == ["completed"] * JOBS, [r.error for r in results]
    assert all(r.degraded for r in results)
    # Four failures open it; every worker then reads the state from Redis (test_breakers.py
    # checks that each sees it within ``sync_seconds``).
    assert opened_after < 1.0, opened_after
    # What reached the dead endpoint after the breaker opened: requests already admitted
    # then (at most one per job), and the half-open trials, at most trial_calls per period.
    periods = math.ceil(OUTAGE_SECONDS / BREAKERS.open_seconds) + 1
    assert after_outage - at_open <= JOBS + BREAKERS.trial_calls * periods, (at_open, after_outage)
    assert at_open - before >= BREAKERS.min_calls
    # No call spent its retries against the dead endpoint: the attempt after the failure that
    # opened the breaker went to the fallback.
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for h in histories
        for e in h.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert max(attempts) <= 3, max(attempts)
    # The endpoint's recovery closed the breaker, and the next job ran on it, not degraded.
    assert state == "closed" and recovered.outcome == "completed" and not recovered.degraded
