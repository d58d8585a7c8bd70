"""The HTTP API against the real dev server and Redis: keys decide the tenant, another tenant's
job is a 404 on every endpoint, errors are JSON with stable codes, and the calls do what the
client does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from temporalio.client import Client

from keel.client.api import create_app
from keel.client.api.app import MAX_BODY_BYTES
from keel.client.api.keys import ApiKeys
from tests.conftest import unique


@pytest.fixture
async def keys(redis_client: aioredis.Redis) -> ApiKeys:
    return ApiKeys(redis_client)


@pytest.fixture
async def api(client: Client, keys: ApiKeys, make_worker) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    async with make_worker(client) as worker:
        app = create_app(client, keys, task_queue=worker.task_queue)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://keel.test") as http:
            yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_submit_wait_read_and_list_as_a_tenant(api: httpx.AsyncClient, keys: ApiKeys) -> None:
    tenant = unique("acme")
    key, principal = await keys.create(tenant, user="alice")
    body = {"goal": "What is 6 * 7? use calculator", "tools": ["calculator"]}
    idem = {"Idempotency-Key": unique("order")}
    first = await api.post("/v1/jobs", json=body, headers=bearer(key) | idem)
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    assert job_id.startswith(f"agent-job-{tenant}:")
    assert first.json()["links"]["result"].endswith("/result")
    again = await api.post("/v1/jobs", json=body, headers=bearer(key) | idem, params={"wait": 60})
    assert again.status_code == 200 and again.json()["job_id"] == job_id  # same key, same job
    assert again.json()["result"]["outcome"] == "completed"
    assert "42" in again.json()["result"]["answer"]

    status = await api.get(f"/v1/jobs/{job_id}", headers=bearer(key))
    assert status.status_code == 200 and status.json()["tenant"] == tenant
    result = await api.get(f"/v1/jobs/{job_id}/result", headers=bearer(key))
    assert result.status_code == 200 and result.json()["outcome"] == "completed"
    listed = await api.get("/v1/jobs", headers=bearer(key), params={"tenant": "someone-else"})
    assert listed.status_code == 200 and listed.json() == []
    mine = await api.get("/v1/jobs", headers=bearer(key))
    assert [row["job_id"] for row in mine.json()] == [job_id]
    assert mine.json()[0]["user"] == "alice"  # from the key, not the body
    assert principal.role == "member"


async def test_another_tenants_job_is_not_found_on_every_endpoint(
    api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    acme, _ = await keys.create(unique("acme"))
    globex, _ = await keys.create(unique("globex"))
    operator, _ = await keys.create("ops", role="operator")
    body = {"goal": "Book the usual [sim: ask]", "tools": ["calculator"]}
    job_id = (await api.post("/v1/jobs", json=body, headers=bearer(acme))).json()["job_id"]
    attempts = [
        api.get(f"/v1/jobs/{job_id}", headers=bearer(globex)),
        api.get(f"/v1/jobs/{job_id}/result", headers=bearer(globex)),
        api.post(f"/v1/jobs/{job_id}/answer", json={"text": "mine"}, headers=bearer(globex)),
        api.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(globex)),
    ]
    for attempt in attempts:
        refused = await attempt
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "job_not_found"
    # The job is untouched, and an operator sees it.
    seen = await api.get(f"/v1/jobs/{job_id}", headers=bearer(operator))
    assert seen.status_code == 200
    assert seen.json()["state"] in ("queued", "planning", "waiting_for_input")
    cancelled = await api.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(acme))
    assert cancelled.status_code == 202
    done = await api.get(f"/v1/jobs/{job_id}/result", headers=bearer(acme), params={"wait": 30})
    assert done.json()["outcome"] == "cancelled"


async def test_a_failed_jobs_result_is_returned_as_data(
    api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("acme"))
    body = {"goal": "What is 1 + 1? use calculator [sim: fault=401]"}
    job_id = (await api.post("/v1/jobs", json=body, headers=bearer(key))).json()["job_id"]
    result = await api.get(f"/v1/jobs/{job_id}/result", headers=bearer(key), params={"wait": 30})
    assert result.status_code == 200
    assert result.json()["outcome"] == "failed" and result.json()["error"].startswith("LLMAuth")


async def test_keys_are_checked_and_revocation_is_immediate(
    api: httpx.AsyncClient, keys: ApiKeys, redis_client: aioredis.Redis
) -> None:
    key, principal = await keys.create(unique("acme"))
    assert (await api.get("/v1/jobs")).status_code == 401
    wrong = await api.get("/v1/jobs", headers=bearer(key[:-2] + "xx"))
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert (await api.get("/v1/jobs", headers=bearer(key))).status_code == 200
    assert await keys.revoke(principal.key_id)
    assert (await api.get("/v1/jobs", headers=bearer(key))).status_code == 401
    # Only the key's hash is stored: the secret is nowhere in Redis.
    stored = [await redis_client.get(k) async for k in redis_client.scan_iter("keel:apikey:*")]
    assert all(key not in (value or "") for value in stored)


async def test_bad_input_is_a_4xx_with_the_field_never_a_500(
    api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("acme"))
    cases = [
        ({"goal": ""}, 422, "goal"),
        ({"goal": "hi", "tenant": "globex"}, 422, "tenant"),  # the key decides the tenant
        ({"goal": "hi", "tools": ["rm_rf"]}, 400, "tools"),
        ({"goal": "hi", "budget": {"max_steps": 0}}, 422, "budget.max_steps"),
        ({"goal": "hi", "tier": "premium"}, 422, "tier"),
        ({"goal": "hi", "cache": 1}, 422, "cache"),  # a boolean, not a number
    ]
    for body, status, field in cases:
        refused = await api.post("/v1/jobs", json=body, headers=bearer(key))
        assert refused.status_code == status, (body, refused.text)
        assert refused.json()["error"]["field"] == field, refused.text
    bad_key = await api.post(
        "/v1/jobs", json={"goal": "hi"}, headers=bearer(key) | {"Idempotency-Key": "a b"}
    )
    assert bad_key.status_code == 400
    huge = await api.post("/v1/jobs", content=b"x" * (MAX_BODY_BYTES + 1), headers=bearer(key))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    bad_state = await api.get("/v1/jobs", headers=bearer(key), params={"state": "x"})
    assert bad_state.status_code == 422 and bad_state.json()["error"]["field"] == "state"
    missing = await api.get("/v1/jobs/agent-job-nope:x", headers=bearer(key))
    assert missing.status_code == 404


async def test_daily_job_quota_is_a_429_naming_the_quota(
    api: httpx.AsyncClient, keys: ApiKeys, redis_client: aioredis.Redis
) -> None:
    tenant = unique("capped")
    key, _ = await keys.create(tenant)
    await redis_client.hset("keel:config:quotas", f"jobs_per_day:{tenant}", "2")
    body = {"goal": "Book the usual [sim: ask]"}
    first = await api.post("/v1/jobs", json=body, headers=bearer(key) | {"Idempotency-Key": "a"})
    again = await api.post("/v1/jobs", json=body, headers=bearer(key) | {"Idempotency-Key": "a"})
    second = await api.post("/v1/jobs", json=body, headers=bearer(key))
    third = await api.post("/v1/jobs", json=body, headers=bearer(key))
    assert [r.status_code for r in (first, again, second)] == [202, 202, 202]
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "quota_exceeded"
    assert third.json()["error"]["quota"] == "jobs_per_day"
    assert int(third.headers["Retry-After"]) > 0
    usage = await api.get("/v1/usage", headers=bearer(key), params={"days": 2})
    assert usage.status_code == 200 and usage.json()[0]["jobs"] == 2 and len(usage.json()) == 2
    foreign = await api.get("/v1/usage", headers=bearer(key), params={"tenant": "other"})
    assert [day["jobs"] for day in foreign.json()] == [0] * 7
    for job in (first, second):
        await api.post(f"/v1/jobs/{job.json()['job_id']}/cancel", headers=bearer(key))


async def test_usage_counts_what_the_tenants_model_calls_cost(
    api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    key, _ = await keys.create(unique("metered"))
    body = {"goal": "What is 9 * 9? use calculator", "tools": ["calculator"]}
    done = await api.post("/v1/jobs", json=body, headers=bearer(key), params={"wait": 60})
    result = done.json()["result"]
    assert result["outcome"] == "completed"
    today = (await api.get("/v1/usage", headers=bearer(key))).json()[0]
    assert today["jobs"] == 1 and today["calls"] == 4  # route, plan, answer, verify
    assert today["tokens"] == result["usage"]["tokens"]
    # The job result shows dollars to five decimals; the ledger keeps eight.
    assert today["cost_usd"] == pytest.approx(result["usage"]["cost_usd"], abs=5e-6)


async def test_a_write_awaiting_approval_is_approved_through_the_api(
    api: httpx.AsyncClient, keys: ApiKeys
) -> None:
    import threading

    from tests.activities.test_http_post import Receiver

    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        tenant = unique("approver")
        key, _ = await keys.create(tenant)
        other, _ = await keys.create(unique("intruder"))
        body = {"goal": f"Tell the team with http_post at {receiver.url()}", "tools": ["http_post"]}
        job_id = (await api.post("/v1/jobs", json=body, headers=bearer(key))).json()["job_id"]
        for _ in range(600):
            status = (await api.get(f"/v1/jobs/{job_id}", headers=bearer(key))).json()
            if status["state"] == "waiting_for_input":
                break
            await asyncio.sleep(0.1)
        (write,) = status["writes"]
        path = f"/v1/jobs/{job_id}/writes/{write['id']}"
        foreign = await api.post(path, json={"approve": True}, headers=bearer(other))
        assert foreign.status_code == 404  # another tenant's job is not found
        assert receiver.received == []
        approved = await api.post(path, json={"approve": True, "reason": "ok"}, headers=bearer(key))
        assert approved.status_code == 200, approved.text
        again = await api.post(path, json={"approve": False}, headers=bearer(key))
        assert again.status_code == 409  # decided already
        result = await api.get(
            f"/v1/jobs/{job_id}/result", headers=bearer(key), params={"wait": 60}
        )
        assert result.json()["outcome"] == "completed"
        assert [w["status"] for w in result.json()["writes"]] == ["committed"]
        assert len(receiver.received) == 1
    finally:
        receiver.shutdown()
        receiver.server_close()
