"""Running-job slots end to end: real dev server, real Redis, the simulator over HTTP.

A job over its tenant's limit is queued (its status says so), starts when the running job
ends, and its wall-clock budget starts then; a job cancelled in line ends ``cancelled`` and
leaves the line; a worker whose limit store is down still runs jobs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Worker

from keel.activities.llm import LLMConfig
from keel.activities.slots import CONCURRENCY_KEY, JobSlots
from keel.client import AgentJobs, JobRequest
from keel.workers.plugin import KeelPlugin
from keel.workers.registry import build_deps
from tests.conftest import free_port, unique
from tests.workflows.test_agent_loop import replay_own_history


@pytest.fixture
async def tenant(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A tenant allowed one running job; its settings are removed after the test."""
    name = unique("acme")
    await redis_client.hset(CONCURRENCY_KEY, f"per_tenant:{name}", 1)
    yield name
    await redis_client.hdel(CONCURRENCY_KEY, f"per_tenant:{name}")


async def wait_until(check, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)


async def test_a_job_over_the_tenant_limit_queues_then_runs_when_the_first_ends(
    client: Client, make_worker, redis_client: aioredis.Redis, tenant: str
) -> None:
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        # The first job holds the tenant's one slot while it waits for an answer.
        first = await jobs.start(
            JobRequest(goal="Book the usual [sim: ask]", tenant=tenant), job_slot=True
        )
        await wait_until(lambda: _state_is(jobs, first, "waiting_for_input"))
        second = await jobs.start(
            JobRequest(goal="What is 6 * 7? use calculator", tenant=tenant, tools=["calculator"]),
            job_slot=True,
        )
        await wait_until(lambda: _has_event(jobs, second, "queued"))
        queued = await jobs.status(second)
        assert queued.state == "queued"
        event = next(e for e in queued.events if e.kind == "queued")
        assert "tenant's limit of 1 running jobs" in event.detail and "0 ahead" in event.detail
        assert "started" not in {e.kind for e in queued.events}  # its budget has not started
        assert await JobSlots(redis_client).counts(tenant) == (1, 1)

        await jobs.send_input(first, "the usual table")
        assert (await jobs.result(first, timeout=60)).outcome == "completed"
        result = await jobs.result(second, timeout=60)
        status = await jobs.status(second)
        first_events = (await jobs.status(first)).events
    assert result.outcome == "completed" and "42" in (result.answer or "")
    kinds = [e.kind for e in status.events]
    assert kinds.index("queued") < kinds.index("slot_granted") < kinds.index("started")
    first_done = next(e.at for e in first_events if e.kind == "completed")
    started = next(e.at for e in status.events if e.kind == "started")
    assert started >= first_done  # it ran after the first job ended, not beside it
    assert await JobSlots(redis_client).counts(tenant) == (0, 0)  # both slots given back
    history = await client.get_workflow_handle(second).fetch_history()
    # Asked (a local activity: a marker), waited in line (an activity), gave the slot back.
    slot_calls = [name for name in activity_types(history) if "job_slot" in name]
    assert slot_calls == ["local:acquire_job_slot", "acquire_job_slot", "local:release_job_slot"]
    await replay_own_history(client, second)
    await replay_own_history(client, first)


def activity_types(history: WorkflowHistory) -> list[str]:
    """Activity types in order; local activities (read from their markers) as ``local:NAME``."""
    names = []
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            names.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        elif event.marker_recorded_event_attributes.marker_name == "core_local_activity":
            data = event.marker_recorded_event_attributes.details["data"].payloads[0].data
            names.append("local:" + json.loads(data)["activity_type"])
    return names


async def test_a_job_cancelled_in_line_ends_cancelled_and_leaves_the_line(
    client: Client, make_worker, redis_client: aioredis.Redis, tenant: str
) -> None:
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        first = await jobs.start(
            JobRequest(goal="Book the usual [sim: ask]", tenant=tenant), job_slot=True
        )
        await wait_until(lambda: _state_is(jobs, first, "waiting_for_input"))
        second = await jobs.start(
            JobRequest(goal="Book it again [sim: ask]", tenant=tenant), job_slot=True
        )
        await wait_until(lambda: _has_event(jobs, second, "queued"))
        await jobs.cancel(second)
        assert (await jobs.result(second, timeout=30)).outcome == "cancelled"
        assert await JobSlots(redis_client).counts(tenant) == (1, 0)
        await jobs.cancel(first)
        assert (await jobs.result(first, timeout=30)).outcome == "cancelled"
    assert await JobSlots(redis_client).counts(tenant) == (0, 0)
    await replay_own_history(client, second)


async def test_a_worker_whose_limit_store_is_down_still_runs_jobs(
    client: Client, redis_url: str, sim_url: str, tenant: str
) -> None:
    deps = build_deps(
        redis_url=redis_url,
        openai_base_url=sim_url,
        openai_api_key="sim-local-key",
        llm_config=LLMConfig(
            planner_model="sim-small", verifier_model="sim-small", answerer_model="sim-small"
        ),
        http_allowed_hosts=["127.0.0.1:*"],
    )
    # Jobs, tools and usage keep the real Redis; only the limits point at a closed port.
    dead = build_deps(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        openai_base_url=sim_url,
        openai_api_key="unused",
        llm_config=LLMConfig(),
        http_allowed_hosts=[],
    )
    deps.gateway, deps.slots = dead.gateway, dead.slots
    dead.gateway = dead.slots = None
    await dead.aclose()
    worker = Worker(
        client,
        task_queue=f"tq-{uuid.uuid4()}",
        plugins=[KeelPlugin(deps, tracing=False, close_deps=True)],
        max_cached_workflows=0,
    )
    async with worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(
            JobRequest(goal="What is 6 * 7? use calculator", tenant=tenant, tools=["calculator"]),
            job_slot=True,
        )
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed" and "42" in (result.answer or "")


async def _state_is(jobs: AgentJobs, job_id: str, state: str) -> bool:
    return (await jobs.status(job_id)).state == state


async def _has_event(jobs: AgentJobs, job_id: str, kind: str) -> bool:
    return kind in {e.kind for e in (await jobs.status(job_id)).events}


async def test_continue_as_new_keeps_the_slot_it_took_in_the_first_run(
    client: Client, make_worker, redis_client: aioredis.Redis, tenant: str
) -> None:
    from keel.workflows.agent_loop import AgentLoopWorkflow
    from keel.workflows.types import AgentLoopInput

    req = JobRequest(goal="What is 9 * 9? [sim: fail_verify=2]", tenant=tenant)
    async with make_worker(client) as worker:
        handle = await client.start_workflow(
            AgentLoopWorkflow.run,
            AgentLoopInput(request=req, continue_as_new_after=1, job_slot=True),
            id=f"agent-job-{tenant}:{unique('can')}",
            task_queue=worker.task_queue,
        )
        result = await handle.result()
    assert result.outcome == "completed" and result.iterations == 3
    runs = []
    async for execution in client.list_workflows(f"WorkflowId = '{handle.id}'"):
        history = await client.get_workflow_handle(
            handle.id, run_id=execution.run_id
        ).fetch_history()
        names = activity_types(history)
        runs.append((names.count("local:acquire_job_slot"), names.count("local:release_job_slot")))
    # Taken once in the first run, given back once by the run that finished.
    assert sorted(runs) == [(0, 0), (0, 1), (1, 0)]
    assert await JobSlots(redis_client).counts(tenant) == (0, 0)
