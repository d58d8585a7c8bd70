"""API rate limits hold exactly across processes, answer 429 with Retry-After, and change at
run time without a restart."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from keel.client.api.keys import ApiKeys
from keel.client.api.limits import CONFIG_KEY, Rate, RateLimiter, RateLimits, parse_rate
from keel.workers.cli import app
from tests.conftest import free_port, unique, wait_port


def test_rates_parse_and_refuse_nonsense() -> None:
    assert parse_rate("100/10") == Rate(requests=100, seconds=10)
    assert parse_rate(" 5 / 0.5s ") == Rate(requests=5, seconds=0.5)
    for bad in ("", "100", "0/10", "10/0", "-1/10", "a/b"):
        with pytest.raises(ValueError, match="REQUESTS/SECONDS"):
            parse_rate(bad)


async def test_a_window_admits_its_limit_then_says_when_to_retry(
    redis_client: aioredis.Redis,
) -> None:
    limits = RateLimits(
        per_key=Rate(requests=5, seconds=1), per_tenant=Rate(requests=50, seconds=1)
    )
    limiter = RateLimiter(redis_client, limits)
    tenant, key = unique("t"), unique("k")
    verdicts = [await limiter.admit(key, tenant) for _ in range(7)]
    assert verdicts[:5] == [None] * 5
    for refused in verdicts[5:]:
        assert refused is not None and refused[0] == "per_key" and 0 < refused[1] <= 1
    await asyncio.sleep(1.05)
    assert await limiter.admit(key, tenant) is None  # the window slid on
    # Another key of the same tenant has its own window, the tenant's is shared.
    assert await limiter.admit(unique("k2"), tenant) is None


async def test_limits_change_at_run_time(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client)
    tenant, key = unique("t"), unique("k")
    await redis_client.hset(CONFIG_KEY, "per_key", "2/60")
    try:
        verdicts = [await limiter.admit(key, tenant) for _ in range(3)]
    finally:
        await redis_client.hdel(CONFIG_KEY, "per_key")
    assert verdicts[:2] == [None, None] and verdicts[2] is not None


def test_keel_limits_set_and_show(redis_url: str) -> None:
    runner = CliRunner(env={"REDIS_URL": redis_url})
    try:
        done = runner.invoke(app, ["limits", "set", "--per-tenant", "500/5", "--json"])
        assert done.exit_code == 0, done.output
        assert '"per_tenant": "500/5s"' in done.stdout
        bad = runner.invoke(app, ["limits", "set", "--per-key", "lots"])
        assert bad.exit_code == 2 and "REQUESTS/SECONDS" in bad.output
    finally:
        runner.invoke(app, ["limits", "set", "--per-tenant", "1000/10"])


@pytest.fixture
def api_processes(env: WorkflowEnvironment, redis_url: str) -> Iterator[list[str]]:
    """Four ``keel api`` processes sharing one Redis, as four replicas behind a balancer."""
    proc_env = os.environ | {
        "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": env.client.namespace,
        "REDIS_URL": redis_url,
        "KEEL_API_RATE_PER_KEY": "100/10",
        "KEEL_API_RATE_PER_TENANT": "100000/10",
    }
    ports = [free_port() for _ in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "keel.workers.cli", "api", f"--port={port}"],
            env=proc_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_port(port, proc, "keel api")
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


async def test_four_api_processes_admit_exactly_the_limit(
    api_processes: list[str], redis_client: aioredis.Redis
) -> None:
    key, principal = await ApiKeys(redis_client).create(unique("acme"))
    headers = {"Authorization": f"Bearer {key}"}
    # Another tenant's job ID: a 404 decided before any call to Temporal, so the test measures
    # the limiter, not the server.
    path = "/v1/jobs/agent-job-someone-else:x"
    async with httpx.AsyncClient(timeout=10) as http:

        async def hit(i: int) -> httpx.Response:
            return await http.get(api_processes[i % 4] + path, headers=headers)

        responses = await asyncio.gather(*(hit(i) for i in range(300)))
    codes = [r.status_code for r in responses]
    assert codes.count(404) == 100, codes  # exactly the limit, across four processes
    assert codes.count(429) == 200
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"] == {
        "code": "rate_limited",
        "message": "the per_key request limit is used up",
        "limit": "per_key",
    }
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    assert principal.tenant.startswith("acme")
