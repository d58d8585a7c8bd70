"""A job explains itself in Temporal's own tools: the `temporal` CLI and the client API."""

from __future__ import annotations

import asyncio
import json

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from keel.client import AgentJobs, JobRequest
from keel.workflows.search_attributes import KEEL_TIER
from tests.conftest import temporal, unique


async def wait_listed(env: WorkflowEnvironment, query: str, count: int) -> list[dict]:
    for _ in range(100):
        rows = temporal(env, "workflow", "list", "--query", query)
        if isinstance(rows, list) and len(rows) == count:
            return rows
        await asyncio.sleep(0.3)
    raise AssertionError(f"{query!r} did not list {count} workflows")


async def test_search_attributes_summary_and_details(env: WorkflowEnvironment, make_worker) -> None:
    client: Client = env.client
    tenant = unique("acme")
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        done = await jobs.start(
            JobRequest(goal="What is 6 * 7? use calculator", tenant=tenant, mode="batch")
        )
        await jobs.result(done, timeout=60)
        waiting = await jobs.start(JobRequest(goal="Summarise it [sim: ask]", tenant=tenant))

        rows = await wait_listed(env, f"KeelTenant='{tenant}' AND KeelState='waiting_for_input'", 1)
        assert rows[0]["execution"]["workflowId"] == waiting
        rows = await wait_listed(env, f"KeelTenant='{tenant}' AND KeelOutcome='completed'", 1)
        assert rows[0]["execution"]["workflowId"] == done
        listed = await jobs.list_jobs(tenant=tenant, state="waiting_for_input")
        assert [j.job_id for j in listed] == [waiting]

        described = temporal(env, "workflow", "describe", "--workflow-id", done)
        text = json.dumps(described)
        for name in (
            "KeelTenant",
            "KeelUser",
            "KeelState",
            "KeelOutcome",
            "KeelMode",
            "KeelTier",
            "KeelCostUsd",
            "KeelTokens",
        ):
            assert name in text, name
        desc = await client.get_workflow_handle(done).describe()
        attrs = {k.name: v for k, v in desc.typed_search_attributes}  # type: ignore[attr-defined]
        assert attrs["KeelTenant"] == tenant and attrs["KeelMode"] == "batch"
        assert attrs["KeelState"] == "completed" and attrs["KeelOutcome"] == "completed"
        assert attrs["KeelTokens"] > 0 and attrs["KeelCostUsd"] > 0
        assert await desc.static_summary() == "What is 6 * 7? use calculator"
        details = await desc.static_details() or ""
        assert tenant in details and "calculator" in details
        assert "api_key" not in details.lower() and "sim-local-key" not in details

        live = await client.get_workflow_handle(waiting).describe()
        current = await client.get_workflow_handle(waiting).query("__temporal_workflow_metadata")
        assert "waiting_for_input" in current.current_details  # type: ignore[attr-defined]
        assert live.status is not None

        history = await client.get_workflow_handle(done).fetch_history()
        summaries = {
            json.loads(event.user_metadata.summary.data)
            for event in history.events
            if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        }
        # A one-iteration job upserts twice: its tier once the router has picked it, then the
        # rest at the end: KeelState stays "running" while it works (its phase is in the
        # current details) and usage is written with the outcome. No patch marker's
        # ``TemporalChangeVersion`` either: Keel 0.1 carries no patch.
        assert upserts(history) == [
            {"KeelTier"},
            {"KeelState", "KeelOutcome", "KeelCostUsd", "KeelTokens"},
        ]
        assert {
            "route · iteration 1",
            "plan · iteration 1",
            "tool calculator",
            "answer · iteration 1",
            "verify · iteration 1",
        } <= summaries
        await jobs.cancel(waiting)


async def test_mode_picks_the_task_queue(env: WorkflowEnvironment) -> None:
    jobs = AgentJobs(env.client)  # no fixed queue: each job's mode decides
    batch = await jobs.start(JobRequest(goal="What is 1 + 1?", mode="batch"))
    interactive = await jobs.start(JobRequest(goal="What is 1 + 1?"))
    for job_id, queue in ((batch, "keel-batch"), (interactive, "keel-interactive")):
        handle = env.client.get_workflow_handle(job_id)
        assert (await handle.describe()).task_queue == queue
        await handle.terminate("test cleanup")


def upserts(history: WorkflowHistory) -> list[set[str]]:
    """The search attributes each upsert event of a history set."""
    return [
        set(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]


async def test_a_forced_tier_is_set_at_start_not_upserted(client: Client, make_worker) -> None:
    """A caller's tier travels in the start request: one upsert per job (the end), not two."""
    async with make_worker(client) as worker:
        jobs = AgentJobs(client, task_queue=worker.task_queue)
        job_id = await jobs.start(JobRequest(goal="What is 6 * 7? use calculator", tier="fast"))
        running = await client.get_workflow_handle(job_id).describe()
        assert running.typed_search_attributes.get(KEEL_TIER) == "fast"
        result = await jobs.result(job_id, timeout=60)
    assert result.outcome == "completed", result
    history = await client.get_workflow_handle(job_id).fetch_history()
    assert upserts(history) == [{"KeelState", "KeelOutcome", "KeelCostUsd", "KeelTokens"}]
