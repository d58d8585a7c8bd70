"""Tenancy is a boundary: two tenants' request keys never meet, and a scoped client sees only
its own tenant's jobs. Another tenant's job is "not found", never "forbidden"."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from keel.client import AgentJobs, InvalidJobRequest, JobNotFound, JobRequest
from keel.workflows.types import job_id_for, tenant_of
from tests.conftest import unique


def test_job_ids_name_exactly_one_tenant_and_key() -> None:
    assert job_id_for("acme", "order-42") == "agent-job-acme:order-42"
    assert tenant_of("agent-job-acme:order-42") == "acme"
    assert tenant_of("agent-job-a.b-c:k") == "a.b-c"
    assert tenant_of("agent-job-order-42") is None  # the shape before tenants were in IDs
    assert tenant_of("other-acme:x") is None


async def test_same_request_key_two_tenants_two_jobs(client: Client, make_worker) -> None:
    key = unique("order")
    async with make_worker(client) as worker:
        acme = AgentJobs(client, task_queue=worker.task_queue, tenant=unique("acme"))
        globex = AgentJobs(client, task_queue=worker.task_queue, tenant=unique("globex"))
        acme_job = await acme.start(
            JobRequest(goal="What is 2 * 3? use calculator"), request_key=key
        )
        globex_job = await globex.start(
            JobRequest(goal="What is 7 * 8? use calculator"), request_key=key
        )
        assert acme_job != globex_job
        acme_result = await acme.result(acme_job, timeout=120)
        globex_result = await globex.result(globex_job, timeout=120)
        assert "6" in (acme_result.answer or "") and "56" in (globex_result.answer or "")

        # Every per-job call of one tenant on the other's job: not found, and nothing done.
        for call in (
            globex.status(acme_job),
            globex.result(acme_job, timeout=5),
            globex.cancel(acme_job),
            globex.send_input(acme_job, "yes"),
            globex.signal_input(acme_job, "yes"),
        ):
            with pytest.raises(JobNotFound):
                await call
        assert (await acme.status(acme_job)).state == "completed"
        assert [j.job_id for j in await globex.list_jobs()] == [globex_job]
        assert await globex.list_jobs(tenant=acme.tenant) == []
        # An operator's client (no scope) sees both.
        everyone = AgentJobs(client)
        assert (await everyone.status(acme_job)).tenant == acme.tenant


async def test_a_scoped_client_cannot_start_a_job_for_another_tenant(client: Client) -> None:
    jobs = AgentJobs(client, tenant="acme")
    with pytest.raises(InvalidJobRequest) as refused:
        await jobs.start(JobRequest(goal="hi", tenant="globex"))
    assert refused.value.field == "tenant"


async def test_jobs_carry_priority_by_mode_and_fairness_by_tenant(client: Client) -> None:
    tenant = unique("acme")
    jobs = AgentJobs(client, task_queue=unique("idle"), fairness_weights={tenant: 2.5})
    interactive = await jobs.start(JobRequest(goal="hi", tenant=tenant))
    batch = await jobs.start(JobRequest(goal="hi", tenant=tenant, mode="batch"))
    for job_id, key in ((interactive, 1), (batch, 3)):
        handle = client.get_workflow_handle(job_id)
        info = (await handle.describe()).raw_description.workflow_execution_info
        assert info.priority.priority_key == key
        assert info.priority.fairness_key == tenant
        assert info.priority.fairness_weight == pytest.approx(2.5)
        await handle.terminate("test over")  # no worker polls the idle queue


async def test_a_scoped_client_may_notify_only_its_own_jobs(client: Client) -> None:
    jobs = AgentJobs(client, tenant="acme", task_queue=unique("idle"))
    for target in ("agent-job-globex:k", "payments-workflow", "agent-job-order-42"):
        with pytest.raises(InvalidJobRequest) as refused:
            await jobs.start(JobRequest(goal="hi", notify_workflow=target))
        assert refused.value.field == "notify_workflow"
    job_id = await jobs.start(JobRequest(goal="hi", notify_workflow="agent-job-acme:parent"))
    await client.get_workflow_handle(job_id).terminate("test over")
