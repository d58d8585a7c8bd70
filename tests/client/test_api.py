"""The HTTP API's read endpoints against the real dev server, and the CLI's fast path over it."""

from __future__ import annotations

import httpx
from temporalio.client import Client

from keel.client import AgentJobs, JobRequest
from keel.client.api import create_app
from tests.conftest import unique


def api_client(jobs: AgentJobs) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(jobs))
    return httpx.AsyncClient(transport=transport, base_url="http://keel.test")


async def test_job_status_and_list_match_the_client(client: Client, make_worker) -> None:
    tenant = unique("api")
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="What is 5 * 5? use calculator", tenant=tenant))
        await jobs.result(job_id, timeout=120)
        async with api_client(jobs) as http:
            got = await http.get(f"/v1/jobs/{job_id}")
            assert got.status_code == 200
            assert got.json() == (await jobs.status(job_id)).model_dump(mode="json")
            listed = await http.get("/v1/jobs", params={"tenant": tenant})
    assert listed.status_code == 200
    assert [row["job_id"] for row in listed.json()] == [job_id]
    assert listed.json()[0]["tenant"] == tenant


async def test_errors_are_json_with_a_stable_code_and_the_right_status(client: Client) -> None:
    async with api_client(AgentJobs(client)) as http:
        missing = await http.get("/v1/jobs/agent-job-does-not-exist")
        bad_state = await http.get("/v1/jobs", params={"state": "sleeping"})
        bad_tenant = await http.get("/v1/jobs", params={"tenant": "x' OR 1=1"})
        bad_limit = await http.get("/v1/jobs", params={"limit": 0})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "job_not_found"
    assert bad_state.status_code == 400
    assert bad_state.json()["error"] == {
        "code": "invalid_request",
        "field": "state",
        "message": bad_state.json()["error"]["message"],
    }
    assert bad_tenant.status_code == 400 and bad_tenant.json()["error"]["field"] == "tenant"
    assert bad_limit.status_code == 422
