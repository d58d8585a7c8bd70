"""Running-job limits at the API and in ``keel limits``: the ``refuse`` policy answers 429
``concurrency_limited`` with Retry-After, exactly at the limit, and the CLI shows and sets the
limits (and the gateways') at run time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from temporalio.client import Client
from typer.testing import CliRunner

from keel.activities.limits import INFLIGHT_KEY, RATES_KEY
from keel.activities.slots import CONCURRENCY_KEY
from keel.client.api import create_app
from keel.client.api.keys import ApiKeys
from keel.workers.cli import app as cli
from tests.conftest import unique


@pytest.fixture
async def tenant(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    name = unique("acme")
    yield name
    for field in ("per_tenant", "per_user", "policy"):
        await redis_client.hdel(CONCURRENCY_KEY, f"{field}:{name}")


@pytest.fixture
async def api(
    client: Client, redis_client: aioredis.Redis, make_worker
) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    async with make_worker(client) as worker:
        app = create_app(client, ApiKeys(redis_client), task_queue=worker.task_queue)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel.test") as http:
            yield http


async def test_refuse_answers_429_at_the_tenants_limit_and_admits_after_a_job_ends(
    api: httpx.AsyncClient, redis_client: aioredis.Redis, tenant: str
) -> None:
    key, _ = await ApiKeys(redis_client).create(tenant, user="alice")
    auth = {"Authorization": f"Bearer {key}"}
    await redis_client.hset(CONCURRENCY_KEY, f"per_tenant:{tenant}", 1)
    await redis_client.hset(CONCURRENCY_KEY, f"policy:{tenant}", "refuse")
    body = {"goal": "Book the usual [sim: ask]", "tools": ["calculator"]}
    first_key = {"Idempotency-Key": unique("first")}
    first = await api.post("/v1/jobs", json=body, headers=auth | first_key)
    assert first.status_code == 202, first.text
    refused = await api.post("/v1/jobs", json=body, headers=auth)
    assert refused.status_code == 429
    assert refused.json()["error"] == {
        "code": "concurrency_limited",
        "message": "the per_tenant limit of 1 running jobs is reached",
        "limit": "per_tenant",
    }
    assert int(refused.headers["Retry-After"]) >= 1
    # A retried submit of the running job is that job, not a second one.
    again = await api.post("/v1/jobs", json=body, headers=auth | first_key)
    assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]

    job_id = first.json()["job_id"]
    assert (await api.post(f"/v1/jobs/{job_id}/cancel", headers=auth)).status_code == 202
    ended = await api.get(f"/v1/jobs/{job_id}/result", headers=auth, params={"wait": 30})
    assert ended.json()["outcome"] == "cancelled"
    later = await api.post("/v1/jobs", json=body, headers=auth)
    assert later.status_code == 202, later.text
    await api.post(f"/v1/jobs/{later.json()['job_id']}/cancel", headers=auth)


async def test_wait_accepts_every_job_over_the_limit(
    api: httpx.AsyncClient, redis_client: aioredis.Redis, tenant: str, client: Client
) -> None:
    key, _ = await ApiKeys(redis_client).create(tenant)
    auth = {"Authorization": f"Bearer {key}"}
    body = {"goal": "What is 2 + 2? use calculator", "tools": ["calculator"]}
    free = await api.post("/v1/jobs", json=body, headers=auth, params={"wait": 30})
    assert free.json()["result"]["outcome"] == "completed"
    await redis_client.hset(CONCURRENCY_KEY, f"per_tenant:{tenant}", 1)
    await asyncio.sleep(1.2)  # the API re-reads limits at most once a second
    body = {"goal": "Book the usual [sim: ask]", "tools": ["calculator"]}
    accepted = [await api.post("/v1/jobs", json=body, headers=auth) for _ in range(2)]
    assert [r.status_code for r in accepted] == [202, 202]  # the second queues in its job
    first, second = (f"/v1/jobs/{r.json()['job_id']}" for r in accepted)
    for _ in range(300):
        replies = [await api.get(url, headers=auth) for url in (first, second)]
        states = [str(r.json().get("state")) for r in replies]  # an error reply: "None"
        # Whichever job's workflow asked first runs; the other waits in line.
        if sorted(states) == ["queued", "waiting_for_input"]:
            break
        await asyncio.sleep(0.25)  # under the key's rate limit
    assert sorted(states) == ["queued", "waiting_for_input"]
    running = accepted[states.index("waiting_for_input")].json()["job_id"]
    for response in accepted:
        await api.post(f"/v1/jobs/{response.json()['job_id']}/cancel", headers=auth)
    # Only jobs a limit covers make slot calls: the job started before the limit made none.
    unlimited = await client.get_workflow_handle(free.json()["job_id"]).fetch_history()
    limited = await client.get_workflow_handle(running).fetch_history()
    assert "acquire_job_slot" not in unlimited.to_json()
    markers = [e.marker_recorded_event_attributes.marker_name for e in limited.events]
    assert "core_local_activity" in markers


def test_keel_limits_concurrency_shows_and_sets_a_tenants_limits(
    redis_url: str, tenant: str
) -> None:
    runner = CliRunner(env={"REDIS_URL": redis_url})
    args = ["limits", "concurrency", "--tenant", tenant, "--json"]
    done = runner.invoke(cli, [*args, "--per-tenant", "3", "--per-user", "1", "--policy", "refuse"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {
        "per_tenant": 3,
        "per_user": 1,
        "policy": "refuse",
        "running": 0,
        "queued": 0,
    }
    shown = runner.invoke(cli, args)
    assert json.loads(shown.stdout)["per_tenant"] == 3
    bad = runner.invoke(cli, [*args, "--policy", "sometimes"])
    assert bad.exit_code == 2 and "wait or refuse" in bad.output
    bad = runner.invoke(cli, [*args, "--per-user", "-1"])
    assert bad.exit_code == 2 and "whole number" in bad.output


def test_keel_limits_gateway_sets_and_clears_in_flight_and_rates(redis_url: str) -> None:
    runner = CliRunner(env={"REDIS_URL": redis_url})
    tool, model = unique("tool"), unique("model")
    done = runner.invoke(
        cli,
        ["limits", "gateway", "--tool", f"{tool}=4", "--model", f"{model}=8"]
        + ["--rpm", f"{model}=60", "--tpm", f"{model}=100000", "--json"],
    )
    assert done.exit_code == 0, done.output
    shown = json.loads(done.stdout)
    assert shown["in_flight"][f"tool:{tool}"] == 4 and shown["in_flight"][f"model:{model}"] == 8
    assert shown["per_minute"][f"{model}:rpm"] == 60
    assert shown["per_minute"][f"{model}:tpm"] == 100_000
    store = redis.Redis.from_url(redis_url)  # the hashes every worker reads each second
    assert store.hget(INFLIGHT_KEY, f"tool:{tool}") == b"4"
    assert store.hget(RATES_KEY, f"{model}:tpm") == b"100000"
    cleared = runner.invoke(
        cli,
        ["limits", "gateway", "--tool", f"{tool}=0", "--model", f"{model}=0"]
        + ["--rpm", f"{model}=0", "--tpm", f"{model}=0", "--json"],
    )
    after = json.loads(cleared.stdout)
    assert f"tool:{tool}" not in after["in_flight"] and f"{model}:rpm" not in after["per_minute"]
    bad = runner.invoke(cli, ["limits", "gateway", "--tool", "http_get"])
    assert bad.exit_code == 2 and "NAME=N" in bad.output
    assert store.hget(INFLIGHT_KEY, f"tool:{tool}") is None
    store.close()
